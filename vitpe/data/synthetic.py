"""A generated classification task that cannot be solved without positional information.

Each image holds a square and a disk; the class says where the disk lies relative to the square
(right/left x below/above: 4 classes). Without positions a ViT sees an unordered set of patches
(the square's patches and the disk's patches, wherever they are) and can do no better than chance,
25%; any strategy that tells it where patches are can solve it. A sample is a set of continuous
parameters, so the same image is rendered at any resolution (with antialiased edges), which is
what the resolution evaluation needs. Everything is deterministic by ``seed``.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

CLASSES = ["right_below", "right_above", "left_below", "left_above"]
MEAN = STD = (0.5, 0.5, 0.5)


def sample_params(seed: int, index: int, min_gap: float = 0.22) -> dict[str, np.ndarray | float]:
    """Shape centres (normalised to [0, 1]), half-size, colours and background of one sample."""
    rng = np.random.default_rng([seed, index])
    r = float(rng.uniform(0.07, 0.11))
    while True:  # rejection: the shapes are apart on both axes, so the relation is unambiguous
        a, b = rng.uniform(r, 1 - r, size=2), rng.uniform(r, 1 - r, size=2)
        if abs(a[0] - b[0]) >= min_gap and abs(a[1] - b[1]) >= min_gap:
            break
    jitter = rng.uniform(-0.15, 0.15, size=(2, 3))
    return dict(square=a, disk=b, r=r, square_rgb=np.clip([0.9, 0.3, 0.2] + jitter[0], 0, 1),
                disk_rgb=np.clip([0.2, 0.5, 0.9] + jitter[1], 0, 1), bg=float(rng.uniform(0.2, 0.5)),
                noise_seed=int(rng.integers(2**31)))


def label_of(p: dict) -> int:
    """0..3: (disk right of the square ? 0 : 2) + (disk below ? 0 : 1); x is the column, y the row."""
    return (0 if p["disk"][0] > p["square"][0] else 2) + (0 if p["disk"][1] > p["square"][1] else 1)


def render(p: dict, size: int, noise: float = 0.04) -> Tensor:
    """``(3, size, size)`` float in [0, 1]; coverage of each shape is antialiased over one pixel."""
    c = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    y, x = c[:, None], c[None, :]
    r = p["r"]
    sq = torch.maximum((x - p["square"][0]).abs(), (y - p["square"][1]).abs())
    disk = ((x - p["disk"][0]) ** 2 + (y - p["disk"][1]) ** 2).sqrt()
    cover_sq = ((r - sq) * size + 0.5).clamp(0, 1)  # (size, size)
    cover_disk = ((r - disk) * size + 0.5).clamp(0, 1)
    g = torch.Generator().manual_seed(p["noise_seed"])
    img = p["bg"] + noise * torch.randn(3, size, size, generator=g)
    for cover, rgb in ((cover_sq, p["square_rgb"]), (cover_disk, p["disk_rgb"])):
        col = torch.as_tensor(rgb, dtype=torch.float32)[:, None, None]
        img = img * (1 - cover) + col * cover
    return img.clamp(0, 1)


class SyntheticPositions(Dataset):
    """``n`` samples of split ``train`` or ``val`` (disjoint streams of the same seed) at ``size``;
    items are ``(normalised image (3, size, size), class)``."""

    classes = CLASSES

    def __init__(self, n: int, size: int, seed: int = 0, split: str = "train") -> None:
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        self.n, self.size = n, size
        self.seed = seed * 2 + (split == "val")  # val never repeats a train sample
        self.params = [sample_params(self.seed, i) for i in range(n)]
        mean = torch.tensor(MEAN)[:, None, None]
        std = torch.tensor(STD)[:, None, None]
        self._norm = (mean, std)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        p = self.params[index]
        mean, std = self._norm
        return (render(p, self.size) - mean) / std, label_of(p)


__all__ = ["CLASSES", "MEAN", "STD", "SyntheticPositions", "label_of", "render", "sample_params"]
