"""Multi-head self-attention through ``scaled_dot_product_attention``, with rotary q/k and an
additive logits bias taken from the positional strategy.

A bias shared by the batch (``rpb``) keeps ``scaled_dot_product_attention`` off its flash kernels:
only the memory-efficient kernel takes a bias that needs a gradient, and it writes that gradient
for every image before summing. Under ``torch.compile`` on a GPU the bias goes instead through
FlexAttention, whose generated flash-style kernel adds it inside the tile loop and accumulates its
gradient in place; ``BIAS_KERNEL`` chooses (``"auto"``: FlexAttention where it applies, ``"sdpa"``:
never).
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

try:
    from torch.nn.attention.flex_attention import flex_attention
except ImportError:  # torch without FlexAttention: every bias goes through SDPA
    flex_attention = None

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
    if pos.bias is not None and use_flex(q, pos.bias, dropout_p):
        return flex_with_bias(q, k, v, pos.bias)
    mask = None if pos.bias is None else pos.bias.to(q.dtype)  # (heads, T, S), broadcast over B
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


BIAS_KERNEL: Literal["auto", "sdpa"] = "auto"


def use_flex(q: Tensor, bias: Tensor, dropout_p: float) -> bool:
    """FlexAttention for a batch-shared ``(heads, T, S)`` bias, only inside a compiled CUDA graph:
    eager FlexAttention is an unfused reference, and it has no dropout."""
    return (BIAS_KERNEL == "auto" and flex_attention is not None and q.is_cuda and bias.dim() == 3
            and dropout_p == 0.0 and torch.compiler.is_compiling())


def flex_with_bias(q: Tensor, k: Tensor, v: Tensor, bias: Tensor) -> Tensor:
    """``softmax(q k^T / sqrt(D) + bias) v`` with ``bias`` ``(heads, T, S)`` read in float32 inside
    the kernel; its gradient is accumulated in float32 too."""
    bias = bias.float()

    def add_bias(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return score + bias[h, q_idx, kv_idx]

    return flex_attention(q, k, v, score_mod=add_bias)
