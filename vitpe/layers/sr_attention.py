"""Efficient self-attention with spatial reduction (PVT, SegFormer): every token queries, but keys
and values come from the token grid shrunk by a strided convolution, so the cost is ``T x T/R^2``."""
from __future__ import annotations

import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ..pos.base import BlockPos, Grid
from ..pos.functional import from_map, to_map
from .attention import attend


class SRAttention(nn.Module):
    """Queries ``q`` from every token; keys and values ``kv`` from the grid reduced by ``sr_ratio``
    (``sr`` convolution, kernel = stride = ``sr_ratio``, then ``norm``). Key names follow SegFormer's
    (``q``, ``kv``, ``sr``, ``norm``, ``proj``); with ``sr_ratio`` 1 there is no ``sr``/``norm``.

    The positional context must be built with ``kv_stride=sr_ratio`` so that rotary tables and
    biases are made for the reduced key grid (``functional.reduced_grid``).
    """

    def __init__(self, dim: int, num_heads: int, sr_ratio: int = 1, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads, self.sr_ratio, self.attn_drop = num_heads, sr_ratio, attn_drop
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.sr = nn.Conv2d(dim, dim, sr_ratio, stride=sr_ratio) if sr_ratio > 1 else None
        self.norm = nn.LayerNorm(dim) if sr_ratio > 1 else None
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def reduce(self, x: Tensor, grid: Grid, num_prefix: int) -> Tensor:
        """``(B, P + H*W, C)`` -> ``(B, P + h*w, C)`` with ``(h, w) = reduced_grid(grid, sr_ratio)``;
        a remainder row/column is dropped (as SegFormer does), a side shorter than the ratio padded."""
        if self.sr is None:
            return x
        prefix, maps = to_map(x, grid, num_prefix)  # maps (B, C, H, W)
        s = self.sr_ratio
        pad_h, pad_w = max(s - maps.shape[-2], 0), max(s - maps.shape[-1], 0)
        if pad_h or pad_w:  # tiny inputs: keep at least one key cell
            maps = F.pad(maps, (0, pad_w, 0, pad_h))
        reduced = from_map(prefix, self.sr(maps))  # (B, P + h*w, C)
        return self.norm(reduced)

    def forward(self, x: Tensor, pos: BlockPos) -> Tensor:
        """``x`` ``(B, P + H*W, C)`` -> ``(B, P + H*W, C)``."""
        h = self.num_heads
        q = rearrange(self.q(x), "b t (h d) -> b h t d", h=h)
        kv = self.kv(self.reduce(x, pos.grid, pos.num_prefix))
        # split at the (two) axis of (B, S, 2, heads, D): its backward stacks the key and value
        # gradients straight into kv's layout, one copy instead of a stack and a reshape copy
        k, v = (t.transpose(1, 2) for t in kv.unflatten(-1, (2, h, -1)).unbind(2))  # each (B, heads, S, D)
        out = attend(q, k, v, pos, self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(rearrange(out, "b h t d -> b t (h d)")))
