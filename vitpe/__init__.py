"""vitpe: vision Transformers with a swappable 2D positional strategy.

``import vitpe`` registers its models with timm::

    import timm, vitpe
    model = timm.create_model("vitpe_vit_small_patch16_224", pos="peg+rope_mixed", num_classes=10)
"""
from . import pos
from .models import VisionTransformer

__version__ = "0.1.0"
__all__ = ["VisionTransformer", "pos", "__version__"]
