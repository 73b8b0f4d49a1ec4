"""Non-overlapping patch embedding that accepts any input size divisible by the patch size."""
from __future__ import annotations

from torch import Tensor, nn

from ..pos.base import Grid


class PatchEmbed(nn.Module):
    """``(B, C, H, W)`` -> tokens ``(B, H/p * W/p, dim)`` and the grid ``(H/p, W/p)``."""

    def __init__(self, patch_size: int | tuple[int, int] = 16, in_chans: int = 3, dim: int = 768) -> None:
        if not isinstance(patch_size, int):  # timm's models take (p, p) too
            sizes = tuple(patch_size)
            if len(sizes) != 2 or sizes[0] != sizes[1]:
                raise ValueError(f"patch_size must be one size or a square (p, p), got {patch_size!r}")
            patch_size = int(sizes[0])
        if patch_size < 1:
            raise ValueError(f"patch_size must be at least 1, got {patch_size}")
        super().__init__()
        self.patch_size = (patch_size, patch_size)
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def grid_of(self, height: int, width: int) -> Grid:
        p = self.patch_size[0]
        if height % p or width % p:
            raise ValueError(f"input size {height}x{width} is not a multiple of the patch size {p}; "
                             f"resize or pad it to e.g. {height // p * p or p}x{width // p * p or p}")
        return height // p, width // p

    def forward(self, x: Tensor) -> tuple[Tensor, Grid]:
        if x.ndim != 4:
            raise ValueError(f"expected images (B, C, H, W), got shape {tuple(x.shape)}")
        grid = self.grid_of(x.shape[-2], x.shape[-1])
        x = self.proj(x)  # (B, dim, H/p, W/p)
        return x.flatten(2).transpose(1, 2), grid
