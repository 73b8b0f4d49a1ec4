"""Positional strategies of the DETR encoder, chosen by name from ``DETR_STRATEGIES``.

DETR differs from a ViT in two ways: images in a batch are padded to a common size (a mask says
where), and an additive encoding goes into the queries and keys of every attention layer, never
into the values. So the additive strategies here take the padding mask and return a per-image
table through ``qk_embed``; the others are vitpe's own strategies reused unchanged:

- ``sine``: DETR's normalised sine, computed from the mask: positions run over the unpadded
  region only, so an image's encoding is the same whatever it was padded to;
- ``learned``: learned row and column tables (DETR's ``PositionEmbeddingLearned``), resampled to
  each image's unpadded rows and columns, so any grid works (no cap at 50);
- ``none``, ``rope_axial``, ``rope_mixed`` (on the encoder's q and k, in feature-cell units, which
  padding at the bottom and right does not shift), ``peg`` (after chosen encoder layers), and
  combinations written with ``+`` (``sine+peg``).
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from einops import rearrange, repeat
from torch import Tensor, nn

from ..registry import Registry
from . import STRATEGIES, build
from .base import Grid, PosStrategy, check_positive
from .functional import filter_weights, sincos_1d


class AdditiveQK(PosStrategy):
    """A strategy whose encoding is added to the queries and keys of every attention layer."""

    def qk_embed(self, mask: Tensor) -> Tensor:
        """``mask`` ``(B, H, W)`` True on padding -> ``(B, H*W, C)`` float32."""
        raise NotImplementedError

    def point_embed(self, points: Tensor) -> Tensor:
        """``points`` ``(..., 2)`` as ``(x, y)`` in ``[0, 1]`` of the unpadded image -> ``(..., C)``
        float32: the encoding a feature cell at that place gets from ``qk_embed``."""
        raise NotImplementedError


def valid_sizes(mask: Tensor) -> Tensor:
    """``(B, H, W)`` padding mask (True on padding, valid region top-left) -> ``(B, 2)`` rows, cols."""
    valid = ~mask
    return torch.stack([valid.any(2).sum(1), valid.any(1).sum(1)], dim=1)


def resampling_weights(lengths: Tensor, size: int, padded: int) -> Tensor:
    """``(B,)`` lengths -> ``(B, padded, size)``: per row of the output, the weights that resample
    a ``size``-long table to that length as ``resample_map`` does (antialiased bicubic, PIL's
    filter), zero rows past the length. Computed on the device from the lengths as tensors."""
    length = lengths.to(torch.float32).clamp(min=1)[:, None, None]
    scale = size / length
    stretch = torch.where(scale > 1, 1 / scale, torch.ones_like(scale))  # the filter widens when shrinking
    w = filter_weights(scale, stretch, padded, size, "bicubic", lengths.device)
    rows = torch.arange(padded, device=lengths.device, dtype=torch.float32)[:, None]
    return torch.where(rows < length, w, 0.0)


def _resample(table: Tensor, lengths: Tensor, padded: int) -> Tensor:
    """``(L, C)`` table -> ``(B, padded, C)`` float32, resampled to each length (a weighted sum
    written out, not a product, which autocast would run in bf16)."""
    weights = resampling_weights(lengths, table.shape[0], padded)  # (B, padded, L)
    return (weights[..., None] * table.float()).sum(-2)


class SineMasked(AdditiveQK):
    """DETR's ``PositionEmbeddingSine`` with ``normalize=True``: row and column positions are
    counted over the unpadded cells and scaled to ``(0, scale]``; half the channels encode the row."""

    name = "sine"

    def __init__(self, *, temperature: float = 10000.0, scale: float = 2 * math.pi, **kw: Any) -> None:
        super().__init__(**kw)
        if self.dim % 4:
            raise ValueError(f"sine: width {self.dim} must be divisible by 4")
        check_positive(self.name, temperature=temperature, scale=scale)
        self.temperature, self.scale = temperature, scale

    def qk_embed(self, mask: Tensor) -> Tensor:
        valid = (~mask).float()
        rows, cols = valid.cumsum(1), valid.cumsum(2)  # (B, H, W): 1-based positions in the valid region
        eps = 1e-6
        rows = rows / (rows[:, -1:, :] + eps) * self.scale
        cols = cols / (cols[:, :, -1:] + eps) * self.scale
        return rearrange(self._encode(rows.flatten(), cols.flatten()), "(b n) c -> b n c", b=mask.shape[0])

    def _encode(self, rows: Tensor, cols: Tensor) -> Tensor:
        """``(N,)`` scaled row and column positions -> ``(N, C)``, the row in the first half, each half
        with its sines and cosines interleaved as DETR lays them out (so DETR's weights load)."""
        half = self.dim // 2
        return torch.cat([sincos_1d(rows, half, self.temperature, interleave=True),
                          sincos_1d(cols, half, self.temperature, interleave=True)], dim=1)

    def point_embed(self, points: Tensor) -> Tensor:
        flat = points.reshape(-1, 2).float() * self.scale
        return self._encode(flat[:, 1], flat[:, 0]).reshape(*points.shape[:-1], self.dim)


class LearnedRowCol(AdditiveQK):
    """Learned row and column tables of ``native_grid`` length, ``C/2`` channels each. Every image
    gets them resampled to its own unpadded rows and columns (identity at the native size), so the
    table spans the image as DETR's normalised sine does; padded cells get zeros."""

    name = "learned"

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        if self.dim % 2:
            raise ValueError(f"learned: width {self.dim} must be even")
        self.row_embed = nn.Parameter(torch.empty(self.native_grid[0], self.dim // 2))
        self.col_embed = nn.Parameter(torch.empty(self.native_grid[1], self.dim // 2))
        nn.init.uniform_(self.row_embed)  # as DETR
        nn.init.uniform_(self.col_embed)

    def qk_embed(self, mask: Tensor) -> Tensor:
        _, H, W = mask.shape
        sizes = valid_sizes(mask)  # (B, 2), on the device: no wait for it, and no graph break
        rows = _resample(self.row_embed, sizes[:, 0], H)  # (B, H, C/2)
        cols = _resample(self.col_embed, sizes[:, 1], W)  # (B, W, C/2)
        emb = torch.cat([repeat(rows, "b h c -> b h w c", w=W), repeat(cols, "b w c -> b h w c", h=H)], -1)
        return rearrange(emb.masked_fill(mask[..., None], 0.0), "b h w c -> b (h w) c")

    def point_embed(self, points: Tensor) -> Tensor:
        flat = points.reshape(-1, 2).float()
        emb = torch.cat([self._sample(self.row_embed, flat[:, 1]), self._sample(self.col_embed, flat[:, 0])], -1)
        return emb.reshape(*points.shape[:-1], self.dim)

    @staticmethod
    def _sample(table: Tensor, at: Tensor) -> Tensor:
        """``(L, C)`` table, ``(N,)`` places in ``[0, 1]`` -> ``(N, C)``, linear between cell centres
        (``qk_embed`` resamples bicubically; the two agree at the cell centres)."""
        idx = (at * table.shape[0] - 0.5).clamp(0, table.shape[0] - 1)
        lo = idx.floor().long().clamp(max=table.shape[0] - 2) if table.shape[0] > 1 else idx.long()
        frac = (idx - lo)[:, None]
        hi = (lo + 1).clamp(max=table.shape[0] - 1)
        return table[lo].float() * (1 - frac) + table[hi].float() * frac


def _additive_sum(pos: PosStrategy, encode: Callable[[AdditiveQK], Tensor]) -> Tensor | None:
    """The sum of ``encode(part)`` over ``pos``'s additive parts, or None when it has none."""
    terms = [encode(p) for p in pos.parts() if isinstance(p, AdditiveQK)]
    return sum(terms[1:], terms[0]) if terms else None


def qk_embed(pos: PosStrategy, mask: Tensor) -> Tensor | None:
    """The sum of the additive q/k encodings of ``pos``'s parts, ``(B, H*W, C)``, or None."""
    return _additive_sum(pos, lambda p: p.qk_embed(mask))


def point_embed(pos: PosStrategy, points: Tensor) -> Tensor | None:
    """The sum of the additive encodings of ``pos``'s parts at ``points`` ``(..., 2)`` (x, y in
    ``[0, 1]``), ``(..., C)``, or None when ``pos`` has no additive part."""
    return _additive_sum(pos, lambda p: p.point_embed(points))


DETR_STRATEGIES: Registry[PosStrategy] = Registry("DETR positional strategy")
for _cls in (SineMasked, LearnedRowCol):
    DETR_STRATEGIES.register(_cls.name)(_cls)
# vitpe's own strategies that work on a padded DETR encoder as they are
for _name in ("none", "rope_axial", "rope_mixed", "peg"):
    DETR_STRATEGIES.register(_name)(STRATEGIES.get(_name))


def build_detr_pos(spec: str, *, dim: int, num_heads: int, depth: int, grid: Grid,
                   pos_kwargs: dict[str, dict[str, Any]] | None = None) -> PosStrategy:
    """Build the DETR encoder strategy ``spec`` (a name of ``DETR_STRATEGIES`` or names joined by ``+``)."""
    return build(spec, dim=dim, num_heads=num_heads, depth=depth, grid=grid, num_prefix=0,
                 pos_kwargs=pos_kwargs, registry=DETR_STRATEGIES)


__all__ = ["AdditiveQK", "DETR_STRATEGIES", "LearnedRowCol", "SineMasked", "build_detr_pos", "qk_embed",
           "resampling_weights", "valid_sizes"]
