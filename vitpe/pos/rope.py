"""2D rotary embeddings on q and k (Heo et al., "Rotary Position Embedding for Vision Transformer").

``rope_axial``: fixed frequencies, half of each head's pairs turn with the column, half with the row.
``rope_mixed``: every block and head learns its own 2D frequency vectors, so one pair can turn with
any direction of the grid. Both are recomputed for any grid (positions in patch units; ``rope_axial``
can rescale them to span a reference grid, as EVA does) and leave prefix tokens unrotated, so
``q_m . k_n`` depends only on the offset between patches m and n.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from .base import Grid, PosContext, PosStrategy, check_positive
from .functional import grid_coords, reduced_grid, rope_tables


class _Rope(PosStrategy):
    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        if self.head_dim % 4:
            raise ValueError(f"{self.name}: head width {self.head_dim} must be divisible by 4")

    def tables(self, grid: Grid, num_prefix: int, stride: int = 1, full: Grid | None = None) -> tuple[Tensor, Tensor]:
        """``full``: the grid of the queries when ``grid`` is the keys' reduced one."""
        raise NotImplementedError

    def context(self, grid: Grid, num_prefix: int, kv_stride: int = 1) -> PosContext:
        """Queries at the grid's cells; with ``kv_stride`` > 1 the keys at the centres of the
        reduced grid's cells (same units), so ``q . k`` still depends only on their offset."""
        rope_k = None
        if kv_stride > 1:
            rope_k = self.tables(reduced_grid(grid, kv_stride), num_prefix, kv_stride, full=grid)
        return PosContext(grid, num_prefix, rope=self.tables(grid, num_prefix), kv_stride=kv_stride, rope_k=rope_k)


class RopeAxial(_Rope):
    name = "rope_axial"

    def __init__(self, *, theta: float = 100.0, ref_grid: Sequence[int] | None = None, **kw: Any) -> None:
        """``ref_grid`` ``(rows, cols)``: positions rescaled so that every grid spans this one, as
        EVA's rotary embedding (timm's ``ref_feat_shape``) does: at a grid of ``H x W`` the row of
        token ``i`` is ``i * rows / H``. Without it (the default, as RoPE-ViT) positions are the
        tokens' indices at every grid, so a larger grid reaches angles never seen in training."""
        super().__init__(**kw)
        check_positive(self.name, theta=theta)
        if ref_grid is not None:
            ref_grid = tuple(ref_grid)
            if len(ref_grid) != 2 or not all(isinstance(v, int) and v > 0 for v in ref_grid):
                raise ValueError(f"{self.name}: ref_grid must be two positive whole numbers (rows, cols); "
                                 f"got {ref_grid}")
        self.theta, self.ref_grid = theta, ref_grid
        self.register_buffer("freqs", self._freqs(None), persistent=False)

    def _freqs(self, device: torch.device | None) -> Tensor:
        q = self.head_dim // 4
        return self.theta ** (-torch.arange(0, self.head_dim, 4, dtype=torch.float32, device=device)[:q] / self.head_dim)

    def _apply(self, fn: Any, recurse: bool = True) -> RopeAxial:
        """Moved or cast with the model (``.to``, ``.half()``), the fixed frequencies are made again
        in float32 on the new device, as timm keeps its bands: a cast would round them for good."""
        super()._apply(fn, recurse)
        self.freqs = self._freqs(self.freqs.device)
        self._cache.clear()
        return self

    def tables(self, grid: Grid, num_prefix: int, stride: int = 1, full: Grid | None = None) -> tuple[Tensor, Tensor]:
        """``(cos, sin)`` each ``(1, 1, P + H*W, D)``; ``stride``: see ``grid_coords``; ``full``:
        the queries' grid, which ``ref_grid`` rescales by (default ``grid``)."""
        full = full or grid

        def make() -> tuple[Tensor, Tensor]:
            rows, cols = grid_coords(grid, self.freqs.device, stride)
            if self.ref_grid is not None:
                rows, cols = rows * (self.ref_grid[0] / full[0]), cols * (self.ref_grid[1] / full[1])
            # (N, D/2): first D/4 angles follow the column, the next D/4 the row
            angles = torch.cat([cols[:, None] * self.freqs, rows[:, None] * self.freqs], dim=1)
            cos, sin = rope_tables(angles, num_prefix)
            return cos[None, None], sin[None, None]

        return self._cache.get((grid, full, num_prefix, stride, self.freqs.device), make)


class RopeMixed(_Rope):
    name = "rope_mixed"

    def __init__(self, *, theta: float = 10.0, **kw: Any) -> None:
        super().__init__(**kw)
        check_positive(self.name, theta=theta)
        self.freqs = nn.Parameter(self.init_freqs(theta))  # (2, depth, heads, D/2): x and y parts

    def init_freqs(self, theta: float) -> Tensor:
        """Magnitudes as in the axial case, each head's directions rotated by a random angle."""
        q = self.head_dim // 4
        mag = theta ** (-torch.arange(0, self.head_dim, 4, dtype=torch.float32)[:q] / self.head_dim)
        phase = torch.rand(self.depth, self.num_heads, 1) * 2 * math.pi
        fx = torch.cat([mag * torch.cos(phase), mag * torch.cos(phase + math.pi / 2)], dim=-1)
        fy = torch.cat([mag * torch.sin(phase), mag * torch.sin(phase + math.pi / 2)], dim=-1)
        return torch.stack([fx, fy])

    def tables(self, grid: Grid, num_prefix: int, stride: int = 1, full: Grid | None = None) -> tuple[Tensor, Tensor]:
        """``(cos, sin)`` each ``(depth, heads, P + H*W, D)``; ``stride``: see ``grid_coords``."""
        def make() -> tuple[Tensor, Tensor]:
            rows, cols = grid_coords(grid, self.freqs.device, stride)
            fx, fy = self.freqs.float()
            # (depth, heads, N, D/2)
            angles = cols[:, None] * fx[:, :, None, :] + rows[:, None] * fy[:, :, None, :]
            return rope_tables(angles, num_prefix)

        key = (grid, num_prefix, stride, self.freqs.device)
        return self._cache.get(key, make, (self.freqs,))
