"""Multi-head self-attention through ``scaled_dot_product_attention``, with rotary q/k and an
additive logits bias taken from the positional strategy."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..pos.base import BlockPos
from ..pos.functional import apply_rope


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor, pos: BlockPos) -> Tensor:
        B, T, C = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, T, D)
        x = attend(q, k, v, pos, self.attn_drop if self.training else 0.0)
        x = x.transpose(1, 2).reshape(B, T, C)
        return self.proj_drop(self.proj(x))


def attend(q: Tensor, k: Tensor, v: Tensor, pos: BlockPos, dropout_p: float = 0.0) -> Tensor:
    """Attention of ``q`` ``(B, heads, T, D)`` over ``k``, ``v`` ``(B, heads, S, D)`` with the
    strategy's rotation and bias; ``S`` differs from ``T`` when keys come from a reduced grid."""
    if pos.rope is not None:
        cos, sin = pos.rope  # (heads or 1, T, D)
        cos_k, sin_k = pos.rope_k if pos.rope_k is not None else pos.rope
        if cos_k.shape[-2] != k.shape[-2]:
            raise ValueError(f"rotary tables for {cos_k.shape[-2]} keys, attention has {k.shape[-2]}: keys on a "
                             f"reduced grid need a context built with the attention's kv_stride")
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos_k, sin_k)
    mask = None if pos.bias is None else pos.bias.to(q.dtype)  # (heads, T, S), broadcast over B
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
