"""Figures for segmentation: validation images, their labels and predictions side by side."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
from torch import Tensor


def palette(num_classes: int) -> np.ndarray:
    """``(num_classes, 3)`` float RGB from matplotlib's qualitative maps (tab20, then tab20b)."""
    import matplotlib

    colors = list(matplotlib.colormaps["tab20"].colors) + list(matplotlib.colormaps["tab20b"].colors)
    return np.array([colors[i % len(colors)] for i in range(num_classes)], dtype=np.float32)


def colorize(mask: Tensor, num_classes: int, ignore_index: int = 255) -> np.ndarray:
    """``(H, W)`` class indices -> ``(H, W, 3)`` RGB; ignored (and out-of-range) pixels black."""
    m = mask.numpy()
    out = np.zeros((*m.shape, 3), dtype=np.float32)
    ok = (m >= 0) & (m < num_classes) & (m != ignore_index)
    out[ok] = palette(num_classes)[m[ok]]
    return out


def plot_segmentation(samples: Sequence[tuple[Tensor, Tensor, Tensor]], classes: Sequence[str], path: str | Path,
                      title: str = "", ignore_index: int = 255) -> None:
    """One row per sample: image, label, prediction; a legend of the class colours underneath."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    rows = max(len(samples), 1)
    fig, axes = plt.subplots(rows, 3, figsize=(10, 2.6 * rows + 0.8), squeeze=False)
    for r, (image, label, pred) in enumerate(samples):
        panels = [image.permute(1, 2, 0).numpy(), colorize(label, len(classes), ignore_index),
                  colorize(pred, len(classes), ignore_index)]
        for c, (panel, name) in enumerate(zip(panels, ["image", "label", "prediction"])):
            axes[r, c].imshow(panel)
            axes[r, c].set_axis_off()
            if r == 0:
                axes[r, c].set_title(name)
    colors = palette(len(classes))
    handles = [Patch(color=colors[i], label=n) for i, n in enumerate(classes)] + [Patch(color="black", label="ignored")]
    legend_rows = math.ceil(len(handles) / 6)
    fig.legend(handles=handles, loc="lower center", ncol=6, fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.25 * legend_rows / fig.get_size_inches()[1], 1, 0.97))
    fig.savefig(path, dpi=90)
    plt.close(fig)


__all__ = ["colorize", "palette", "plot_segmentation"]
