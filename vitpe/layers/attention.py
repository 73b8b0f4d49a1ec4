"""Multi-head self-attention through ``scaled_dot_product_attention``, with rotary q/k and an
additive logits bias taken from the positional strategy."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..kernels import attention as bias_kernel
from ..kernels import rope as rope_kernel
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
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, C // self.num_heads)
        rotate = pos.rope is not None and pos.rope_k is None and rope_kernel.available(qkv, pos.rope[0])
        if rotate:  # rotated q, k (and v) straight from the projection, in one pass each way
            q, k, v = rope_kernel.rope_qkv(qkv, *pos.rope)
        else:
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, T, D)
        x = attend(q, k, v, pos, self.attn_drop if self.training else 0.0, rotated=rotate)
        x = x.transpose(1, 2).reshape(B, T, C)
        return self.proj_drop(self.proj(x))


def attend(q: Tensor, k: Tensor, v: Tensor, pos: BlockPos, dropout_p: float = 0.0,
           rotated: bool = False) -> Tensor:
    """Attention of ``q`` ``(B, heads, T, D)`` over ``k``, ``v`` ``(B, heads, S, D)`` with the
    strategy's rotation (unless the caller has ``rotated`` q and k) and bias; ``S`` differs from
    ``T`` when keys come from a reduced grid."""
    if pos.rope is not None and not rotated:
        cos, sin = pos.rope  # (heads or 1, T, D)
        cos_k, sin_k = pos.rope_k if pos.rope_k is not None else pos.rope
        if cos_k.shape[-2] != k.shape[-2]:
            raise ValueError(f"rotary tables for {cos_k.shape[-2]} keys, attention has {k.shape[-2]}: keys on a "
                             f"reduced grid need a context built with the attention's kv_stride")
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos_k, sin_k)
    mask = pos.bias  # (heads, T, S), broadcast over B
    chunks = query_chunks(q.shape[-2], k.shape[-2]) if q.is_cuda and (mask is None or mask.dim() == 3) else 1
    if chunks > 1:
        return chunked_sdpa(q, k, v, mask, dropout_p, chunks)
    return sdpa(q, k, v, mask, dropout_p)


def sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, dropout_p: float) -> Tensor:
    """``scaled_dot_product_attention``, or, for a ``(heads, T, S)`` bias shared by the batch,
    vitpe's fused kernel (torch's fused kernels refuse such a bias or take it at about three times
    the cost of attention without one)."""
    if bias_kernel.available(q, mask, dropout_p):
        return bias_kernel.attention_with_bias(q, k, v, mask)  # the bias in its own dtype, gradient too
    mask = None if mask is None else mask.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


def query_chunks(queries: int, keys: int, max_chunks: int = 16) -> int:
    """How many pieces to cut the queries into (on a GPU) when they far outnumber the keys.

    The fused kernels' backward passes run one block of threads per block of keys (per image and
    head). With spatial-reduction attention (MiT's first stage: 16384 queries, 256 keys, one head)
    that is a few dozen blocks for the whole GPU, and the backward takes 30 % of a training step.
    Cut into pieces of at least 4x the key count, the queries become more heads over the same keys.
    """
    n = 1
    while 2 * n <= max_chunks and queries % (2 * n) == 0 and queries // (2 * n) >= 4 * keys:
        n *= 2
    return n


def chunked_sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, dropout_p: float, n: int) -> Tensor:
    """``scaled_dot_product_attention`` with the ``T`` queries cut into ``n`` consecutive pieces, each
    attending, as its own head, to every key: ``(B, heads, T, D)`` in and out, the same result."""
    B, h, T, D = q.shape

    def per_piece(t: Tensor) -> Tensor:  # keys and values repeated for every piece (they are few)
        return t[:, :, None].expand(B, h, n, *t.shape[-2:]).reshape(B, h * n, *t.shape[-2:])

    q = q.reshape(B, h * n, T // n, D)
    if mask is not None:  # (heads, T, S) -> (heads * n, T / n, S)
        mask = mask.reshape(h * n, T // n, mask.shape[-1])
    out = sdpa(q, per_piece(k), per_piece(v), mask, dropout_p)
    return out.reshape(B, h, T, out.shape[-1])
