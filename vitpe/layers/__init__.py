from .attention import Attention
from .block import Block
from .mlp import Mlp
from .patch_embed import PatchEmbed

__all__ = ["Attention", "Block", "Mlp", "PatchEmbed"]
