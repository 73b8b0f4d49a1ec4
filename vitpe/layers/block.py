"""Pre-norm transformer block with stochastic depth; the strategy reaches it only through ``BlockPos``."""
from __future__ import annotations

import torch
from timm.layers import DropPath
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..pos.base import BlockPos
from .attention import Attention
from .mlp import Mlp


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 mixer: nn.Module | None = None, drop: float = 0.0, attn_drop: float = 0.0,
                 drop_path: float = 0.0, norm_eps: float = 1e-6, attn: nn.Module | None = None) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        # ``attn`` replaces the default attention (MiT's spatial-reduction attention)
        self.attn = attn if attn is not None else Attention(dim, num_heads, qkv_bias, attn_drop, drop)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), mixer, drop)
        self.drop_path = DropPath(drop_path)
        self.grad_checkpointing = False  # recompute the block in the backward (the models' set_grad_checkpointing)

    def forward(self, x: Tensor, pos: BlockPos) -> Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():  # keeps only x; the RNG (drop path) is replayed
            return checkpoint(self._forward, x, pos, use_reentrant=False)
        return self._forward(x, pos)

    def _forward(self, x: Tensor, pos: BlockPos) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), pos))
        return x + self.drop_path(self.mlp(self.norm2(x), pos))
