"""Absolute encodings added to the tokens once, after patch embedding: ``sincos2d`` and ``learned``."""
from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Grid, GridShapedStrategy, PosStrategy, check_positive
from .functional import resample_table, sincos_2d

_logger = logging.getLogger(__name__)




class SinCos2d(PosStrategy):
    """Fixed 2D sine-cosine (MAE, "Simple ViT"): half the channels encode the column, half the
    row, in MAE's order (``sincos_2d``); prefix tokens get no encoding.
    The native grid's table is made once, a buffer that is not saved (``native_table``); other
    grids' tables are computed, then cached (under ``torch.compile``, in the graph)."""

    name = "sincos2d"

    def __init__(self, *, temperature: float = 10000.0, **kw: Any) -> None:
        super().__init__(**kw)
        check_positive(self.name, temperature=temperature)
        self.temperature = temperature
        # Compiled, a table computed in the graph is fused by inductor into the addition to the
        # tokens, so its sines and cosines are computed again for every image of the batch; the
        # buffer is read instead (ViT-S/16 inference at batch 256 on an H200 ran at 0.90 of
        # `learned` with the table in the graph).
        self.register_buffer("native_table", self._make(self.native_grid, self.num_prefix, None), persistent=False)

    def _apply(self, fn: Any, recurse: bool = True) -> SinCos2d:
        """Moved or cast with the model, the native table is made again in float32 (a cast would
        round it for good, and it would then differ from every other grid's table)."""
        super()._apply(fn, recurse)
        self.native_table = self._make(self.native_grid, self.num_prefix, self.native_table.device)
        self._cache.clear()
        return self

    def _make(self, grid: Grid, num_prefix: int, device: torch.device | None) -> Tensor:
        t = sincos_2d(grid, self.dim, self.temperature, device)
        return F.pad(t, (0, 0, num_prefix, 0))[None]

    def table(self, grid: Grid, num_prefix: int, device: torch.device) -> Tensor:
        """``(1, P + H*W, C)``, zeros on the prefix rows; float32, whatever the model's dtype."""
        native = self.native_table
        if tuple(grid) == self.native_grid and num_prefix == self.num_prefix and native.device == device:
            return native
        return self._cache.get((grid, num_prefix, device), lambda: self._make(grid, num_prefix, device))

    def embed(self, x: Tensor, grid: Grid, num_prefix: int) -> Tensor:
        return x + self.table(grid, num_prefix, x.device).to(x.dtype)


class Learned(GridShapedStrategy):
    """A learned absolute table (ViT/DeiT) for ``P + H*W`` tokens, stored as timm stores it
    (``pos_embed``, ``(1, P + H*W, C)``). For another grid the patch part is resampled bicubically
    with antialiasing; the prefix rows are kept apart and never resampled."""

    name = "learned"

    def __init__(self, *, prefix_pos: bool = True, **kw: Any) -> None:
        super().__init__(**kw)
        # Prefix tokens have their own learned rows, as in timm's ViT (no_embed_class=False).
        self.table_prefix = self.num_prefix if prefix_pos else 0
        n = self.native_grid[0] * self.native_grid[1]
        self.pos_embed = nn.Parameter(torch.zeros(1, self.table_prefix + n, self.dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def resampled(self, grid: Grid) -> Tensor:
        """``(1, P' + H*W, C)`` for ``grid``; identity (no copy) at the native grid."""
        if grid == self.native_grid:
            return self.pos_embed
        p = self.table_prefix

        def make() -> Tensor:
            patches = resample_table(self.pos_embed[:, p:], self.native_grid, grid)
            return torch.cat([self.pos_embed[:, :p], patches], dim=1)

        return self._cache.get((grid, self.pos_embed.device, self.pos_embed.dtype), make, (self.pos_embed,))

    def embed(self, x: Tensor, grid: Grid, num_prefix: int) -> Tensor:
        table = self.resampled(grid).to(x.dtype)
        if self.table_prefix == num_prefix:
            return x + table
        if self.table_prefix != 0:
            raise ValueError(f"the learned table has {self.table_prefix} prefix rows but the input has "
                             f"{num_prefix} prefix tokens")
        return torch.cat([x[:, :num_prefix], x[:, num_prefix:] + table], dim=1)

    table_key = "pos_embed"

    def _grid_of(self, n: int) -> Grid | None:
        """The grid of a table of ``n`` patch rows without a ``grid`` entry, as timm's loader takes
        it: the model's own grid if it has ``n`` cells (kept as it is), else a square one if ``n``
        is a square, else None. (``vit_convert.checkpoint_filter_fn`` first writes the grid the checkpoint's
        image size gives, where that accounts for every row, as timm does: 14x14 rows from a 224
        checkpoint go to a 7x28 model resampled, not reshaped.)"""
        if n == self.native_grid[0] * self.native_grid[1]:
            return self.native_grid
        side = math.isqrt(max(n, 0))
        return (side, side) if side * side == n else None

    def grid_from_table(self, table: Tensor, key: str) -> Grid:
        n = table.shape[1] - self.table_prefix
        grid = self._grid_of(n)
        if grid is None:
            hint = "save the checkpoint with its 'grid' entry or resample it yourself"
            if self.table_prefix == 0 and self._grid_of(n - self.num_prefix) is not None:
                hint = (f"its first {self.num_prefix} row(s) look like prefix-token positions (timm's "
                        f"no_embed_class=False); build the model with pos_kwargs={{'learned': "
                        f"{{'prefix_pos': True}}}}")
            raise ValueError(f"{key} has {n} patch positions, neither the model's {self.native_grid[0]}x"
                             f"{self.native_grid[1]} grid nor a square one; {hint}")
        return grid

    def _lacks_prefix_rows(self, rows: int, grid: Tensor | None) -> bool:
        """Whether a table of ``rows`` rows has none for the prefix tokens: a vitpe table's ``grid``
        entry says so; without one, the rows make a grid only without prefix rows."""
        if grid is not None and grid.numel() == 2:
            return rows == int(grid[0]) * int(grid[1])
        return self._grid_of(rows - self.table_prefix) is None and self._grid_of(rows) is not None

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):  # type: ignore[override]
        key, p = prefix + "pos_embed", self.table_prefix
        t, g = state_dict.get(key), state_dict.get(prefix + "grid")
        if p and t is not None and t.dim() == 3 and self._lacks_prefix_rows(t.shape[1], g):
            # a timm table without prefix rows (no_embed_class=True: DeiT III, the RoPE ViTs' "ape"
            # tables): its prefix tokens got no position, which zero prefix rows give exactly
            _logger.info("%s: %d rows, a grid without prefix rows (timm's no_embed_class); the "
                         "%d prefix row(s) are set to zero, which adds no position to those tokens",
                         key, t.shape[1], p)
            state_dict[key] = F.pad(t, (0, 0, p, 0))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                       unexpected_keys, error_msgs)

    def adapt_state_dict(self, state_dict: dict[str, Tensor], prefix: str, old_grid: Grid) -> None:
        key, p = prefix + "pos_embed", self.table_prefix
        if key not in state_dict:
            return
        t = state_dict[key]
        patches = resample_table(t[:, p:].float(), old_grid, self.native_grid).to(t.dtype)
        state_dict[key] = torch.cat([t[:, :p], patches], dim=1)
