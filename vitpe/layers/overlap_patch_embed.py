"""Overlapping patch embedding (SegFormer): a strided convolution whose kernel is larger than its
stride, then LayerNorm. Padding ``k // 2`` makes it accept any input size."""
from __future__ import annotations

from torch import Tensor, nn

from ..pos.base import Grid


def overlap_grid(size: Grid, kernel_size: int, stride: int) -> Grid:
    """The output grid of a ``kernel_size`` convolution with ``stride`` and padding ``kernel_size // 2``."""
    p = kernel_size // 2
    return tuple((n + 2 * p - kernel_size) // stride + 1 for n in size)  # type: ignore[return-value]


class OverlapPatchEmbed(nn.Module):
    """``(B, C, H, W)`` -> tokens ``(B, h*w, dim)`` and the grid ``(h, w)``, ``h = ceil(H / stride)``
    for SegFormer's (7, 4) and (3, 2) kernels and strides."""

    def __init__(self, in_chans: int, dim: int, kernel_size: int = 7, stride: int = 4) -> None:
        super().__init__()
        self.kernel_size, self.stride = kernel_size, stride
        self.proj = nn.Conv2d(in_chans, dim, kernel_size, stride=stride, padding=kernel_size // 2)
        self.norm = nn.LayerNorm(dim)

    def grid_of(self, height: int, width: int) -> Grid:
        """The output grid for an input of ``height x width``."""
        return overlap_grid((height, width), self.kernel_size, self.stride)

    def forward(self, x: Tensor) -> tuple[Tensor, Grid]:
        if x.ndim != 4:
            raise ValueError(f"expected images (B, C, H, W), got shape {tuple(x.shape)}")
        x = self.proj(x)  # (B, dim, h, w)
        grid = (x.shape[-2], x.shape[-1])
        return self.norm(x.flatten(2).transpose(1, 2)), grid
