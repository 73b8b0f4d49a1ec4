"""Absolute encodings added to the tokens once, after patch embedding: ``sincos2d`` and ``learned``."""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Grid, GridShapedStrategy, PosStrategy
from .functional import resample_table, sincos_2d


class SinCos2d(PosStrategy):
    """Fixed 2D sine-cosine (MAE, "Simple ViT"): half the channels encode the column, half the
    row, in MAE's order (``sincos_2d``).
    Recomputed, then cached, for any grid; prefix tokens get no encoding."""

    name = "sincos2d"

    def __init__(self, *, temperature: float = 10000.0, **kw: Any) -> None:
        super().__init__(**kw)
        self.temperature = temperature

    def table(self, grid: Grid, num_prefix: int, device: torch.device) -> Tensor:
        """``(1, P + H*W, C)`` float32, zeros on the prefix rows."""
        def make() -> Tensor:
            t = sincos_2d(grid, self.dim, self.temperature, device)
            return F.pad(t, (0, 0, num_prefix, 0))[None]

        return self._cache.get((grid, num_prefix, device), make)

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

    def grid_from_table(self, table: Tensor, key: str) -> Grid:
        """timm's checkpoints hold no grid: their tables are square."""
        n = table.shape[1] - self.table_prefix
        side = math.isqrt(max(n, 0))
        if side * side != n:
            raise ValueError(f"{key} has {n} patch positions, which is not a square grid; save the "
                             f"checkpoint with its 'grid' entry or resample it yourself")
        return (side, side)

    def adapt_state_dict(self, state_dict: dict[str, Tensor], prefix: str, old_grid: Grid) -> None:
        key, p = prefix + "pos_embed", self.table_prefix
        if key not in state_dict:
            return
        t = state_dict[key]
        patches = resample_table(t[:, p:].float(), old_grid, self.native_grid).to(t.dtype)
        state_dict[key] = torch.cat([t[:, :p], patches], dim=1)
