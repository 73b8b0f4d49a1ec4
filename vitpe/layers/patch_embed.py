"""Non-overlapping patch embedding that accepts any input size divisible by the patch size."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..pos.base import Grid


class PatchEmbed(nn.Module):
    """``(B, C, H, W)`` -> tokens ``(B, H/p * W/p, dim)`` and the grid ``(H/p, W/p)``.

    The weights are a ``Conv2d``'s (``proj``, as timm's checkpoints hold them), but the patches do
    not overlap, so the convolution is one matrix product over the image cut into patches. On an
    H100, cuDNN's convolution took 1.5 ms of ViT-B's compiled training step at batch 256 and its
    weight gradient 0.8 ms (three input channels suit its kernels badly); as a product, the step
    went from 1.01x to 1.04x timm's (docs/performance.md, sixteenth round).
    """

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
        if not self._plain_patches():  # a projection replaced by another kind: run it as it is
            return self.proj(x).flatten(2).transpose(1, 2), grid
        (gh, gw), p, B, C = grid, self.patch_size[0], x.shape[0], x.shape[1]
        if C != self.proj.in_channels:
            raise ValueError(f"expected {self.proj.in_channels} input channels, got shape {tuple(x.shape)}")
        # (B, C, gh, p, gw, p) -> (B, gh, gw, C, p, p): each row a patch, flattened as the weight is
        patches = x.reshape(B, C, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5).reshape(B, gh * gw, C * p * p)
        return F.linear(patches, self.proj.weight.reshape(self.proj.out_channels, -1), self.proj.bias), grid

    def _plain_patches(self) -> bool:
        """Whether ``proj`` is the convolution this module builds: one (p, p) kernel a patch, no
        overlap, padding, dilation or groups."""
        conv, p = self.proj, self.patch_size
        return (type(conv) is nn.Conv2d and tuple(conv.kernel_size) == p and tuple(conv.stride) == p
                and tuple(conv.padding) == (0, 0) and tuple(conv.dilation) == (1, 1) and conv.groups == 1
                and conv.padding_mode == "zeros")
