"""``rpb``: a learned relative position bias on the attention logits (Swin, BEiT).

Each block has, per head, a table over 2D offsets ``(2H-1) x (2W-1)``; the bias between patches m
and n is the entry at their offset. For another grid the table is resized (``resize``):

- ``bicubic`` (the default): resampled as a map, with antialiasing (``resample_map``, as the
  learned table), so every offset scales with the grid: the bias between two patches depends on
  their offset as a fraction of the grid. Swin's fine-tuning resizes this way, without the
  antialiasing (which, shrinking, averages neighbouring offsets).
- ``geometric``: BEiT's and timm's (``resize_rel_pos_bias_table``): the near offsets keep their
  values (an offset of one patch is still one patch), the far ones are spread out to reach the new
  grid's edges, or, on a smaller grid, kept about where they were.

Prefix tokens (class and register tokens) get zero bias by default; with ``prefix_bias`` they get
BEiT's three learned entries per block and head: one for a prefix token attending to a patch, one
for a patch attending to a prefix token, one between prefix tokens (the same at every grid).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Grid, GridShapedStrategy, PosContext
from .functional import grid_coords, reduced_grid, resize_offset_table

RESIZE_MODES = ("bicubic", "geometric")


def relative_index(grid: Grid, device: torch.device | None = None) -> Tensor:
    """``(N, N)`` long: flat index into a ``(2H-1) x (2W-1)`` offset table for every pair."""
    h, w = grid
    rows, cols = grid_coords(grid, device)
    dr = (rows[:, None] - rows[None, :]).long() + h - 1
    dc = (cols[:, None] - cols[None, :]).long() + w - 1
    return dr * (2 * w - 1) + dc


def relative_offsets(grid: Grid, kv_stride: int, device: torch.device | None = None) -> Tensor:
    """``(1, N, S, 2)``: the (column, row) offset between each query of ``grid`` and each key of the
    grid reduced by ``kv_stride`` (keys at their cells' centres), scaled so that the offset table's
    ends are -1 and 1, as ``grid_sample`` with ``align_corners=True`` reads them."""
    h, w = grid
    rq, cq = grid_coords(grid, device)
    rk, ck = grid_coords(reduced_grid(grid, kv_stride), device, kv_stride)
    dr = (rq[:, None] - rk[None, :]) / max(h - 1, 1)
    dc = (cq[:, None] - ck[None, :]) / max(w - 1, 1)
    return torch.stack([dc, dr], dim=-1)[None]


def with_prefix(bias: Tensor, entries: Tensor, num_prefix: int) -> Tensor:
    """``(heads, N, S)`` patch-to-patch bias -> ``(heads, P + N, P + S)`` with BEiT's entries
    ``(heads, 3)`` for the ``P`` prefix tokens: prefix to patch, patch to prefix, prefix to prefix."""
    heads, n, s = bias.shape
    e = entries.to(bias.dtype)[:, :, None, None]  # (heads, 3, 1, 1)
    top = torch.cat([e[:, 2].expand(heads, num_prefix, num_prefix), e[:, 0].expand(heads, num_prefix, s)], dim=-1)
    rest = torch.cat([e[:, 1].expand(heads, n, num_prefix), bias], dim=-1)
    return torch.cat([top, rest], dim=-2)


class RelativeBias(GridShapedStrategy):
    name = "rpb"

    def __init__(self, *, shared: bool = False, resize: str = "bicubic", prefix_bias: bool = False,
                 **kw: Any) -> None:
        super().__init__(**kw)
        if resize not in RESIZE_MODES:
            raise ValueError(f"{self.name}: resize must be one of {RESIZE_MODES}; got {resize!r}")
        self.resize = resize
        h, w = self.native_grid
        layers = 1 if shared else self.depth
        self.tables = nn.Parameter(torch.zeros(layers, self.num_heads, 2 * h - 1, 2 * w - 1))
        nn.init.trunc_normal_(self.tables, std=0.02)
        # BEiT's class-token entries: prefix -> patch, patch -> prefix, prefix -> prefix
        self.prefix_tables = nn.Parameter(torch.zeros(layers, self.num_heads, 3)) if prefix_bias else None
        if self.prefix_tables is not None:
            nn.init.trunc_normal_(self.prefix_tables, std=0.02)

    def tables_for(self, grid: Grid) -> Tensor:
        """``(layers, heads, (2h-1)*(2w-1))`` for ``grid``."""
        def make() -> Tensor:
            size = (2 * grid[0] - 1, 2 * grid[1] - 1)
            return resize_offset_table(self.tables, size, self.resize).flatten(2)

        if grid == self.native_grid:
            return self.tables.flatten(2)
        return self._cache.get((grid, self.tables.device), make, (self.tables,))

    def context(self, grid: Grid, num_prefix: int, kv_stride: int = 1) -> PosContext:
        """With ``kv_stride`` > 1 the keys sit between the grid's cells (reduced-grid centres), so
        the table is read bilinearly at those fractional offsets: ``(heads, N, S)`` per block."""
        dev = self.tables.device
        tables = self.tables_for(grid)
        if kv_stride == 1:
            index = self._cache.get(("index", grid, dev), lambda: relative_index(grid, dev))

            def lookup(t: Tensor) -> Tensor:
                return t[:, index]  # (heads, N, N)
        else:
            offsets = self._cache.get(("offsets", grid, kv_stride, dev), lambda: relative_offsets(grid, kv_stride, dev))
            size = (2 * grid[0] - 1, 2 * grid[1] - 1)

            def lookup(t: Tensor) -> Tensor:
                maps = t.reshape(1, -1, *size).float()
                out = F.grid_sample(maps, offsets, mode="bilinear", padding_mode="border", align_corners=True)
                return out[0].to(t.dtype)  # (heads, N, S)

        def bias(i: int) -> Tensor:
            b = lookup(tables[i if tables.shape[0] > 1 else 0])
            if not num_prefix:
                return b
            if self.prefix_tables is None:
                return F.pad(b, (num_prefix, 0, num_prefix, 0))
            return with_prefix(b, self.prefix_tables[i if self.prefix_tables.shape[0] > 1 else 0], num_prefix)

        return PosContext(grid, num_prefix, bias_terms=[bias], kv_stride=kv_stride)

    table_key = "tables"

    def grid_from_table(self, table: Tensor, key: str) -> Grid:
        """From the table's ``(2h-1) x (2w-1)`` offsets."""
        rows, cols = table.shape[-2:]
        if rows % 2 == 0 or cols % 2 == 0:
            raise ValueError(f"{key} has {rows}x{cols} offsets; a relative-bias table has an odd number "
                             f"(2h-1) x (2w-1)")
        return (rows + 1) // 2, (cols + 1) // 2

    def adapt_state_dict(self, state_dict: dict[str, Tensor], prefix: str, old_grid: Grid) -> None:
        key = prefix + "tables"
        if key in state_dict:
            h, w = self.native_grid
            state_dict[key] = resize_offset_table(state_dict[key], (2 * h - 1, 2 * w - 1), self.resize)
