"""Figures for segmentation: validation images, their labels and predictions side by side."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
from torch import Tensor

_LEGEND_ROW = 0.2  # inches per legend row at font size 8
_GOLDEN = 0.618033988749895


def palette(num_classes: int) -> np.ndarray:
    """``(num_classes, 3)`` float RGB, a different colour for every class and none dark (black marks
    ignored pixels): matplotlib's tab20 for up to 20 classes; for more, a deterministic generated
    palette (as ADE20K's 150 colours), hues a golden ratio of the circle apart over five levels of
    saturation and three of brightness, so that neighbouring indices never look alike."""
    import matplotlib

    if num_classes <= 20:
        return np.array(matplotlib.colormaps["tab20"].colors[:num_classes], dtype=np.float32)
    i = np.arange(num_classes)
    hsv = np.stack([(i * _GOLDEN) % 1.0, 0.4 + 0.15 * (i % 5), 0.6 + 0.2 * ((i // 5) % 3)], axis=1)
    return matplotlib.colors.hsv_to_rgb(hsv).astype(np.float32)


def colorize(mask: Tensor, num_classes: int, ignore_index: int = 255) -> np.ndarray:
    """``(H, W)`` class indices -> ``(H, W, 3)`` RGB; ignored (and out-of-range) pixels black."""
    m = mask.numpy()
    out = np.zeros((*m.shape, 3), dtype=np.float32)
    ok = (m >= 0) & (m < num_classes) & (m != ignore_index)
    out[ok] = palette(num_classes)[m[ok]]
    return out


def plot_segmentation(samples: Sequence[tuple[Tensor, Tensor, Tensor]], classes: Sequence[str], path: str | Path,
                      title: str = "", ignore_index: int = 255) -> None:
    """One row per sample: image, label, prediction; underneath, in a band of its own that the
    figure grows to hold, a legend of the classes the labels or predictions show (all 150 of
    ADE20K would not fit)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    K = len(classes)
    colors = palette(K)
    shown = sorted({int(v) for _, label, pred in samples for m in (label, pred) for v in np.unique(m.numpy())
                    if 0 <= v < K and v != ignore_index})
    handles = [Patch(color=colors[i], label=classes[i]) for i in shown] + [Patch(color="black", label="ignored")]
    longest = max(len(h.get_label()) for h in handles)
    ncol = max(1, min(6, int(10 / (0.5 + 0.07 * longest))))  # columns as wide as the longest name
    legend_h = _LEGEND_ROW * math.ceil(len(handles) / ncol) + 0.2
    rows = max(len(samples), 1)
    panels_h = 2.6 * rows + (0.4 if title else 0.1)
    fig, axes = plt.subplots(rows, 3, figsize=(10, panels_h + legend_h), squeeze=False)
    for r, (image, label, pred) in enumerate(samples):
        panels = [image.permute(1, 2, 0).numpy(), colorize(label, K, ignore_index), colorize(pred, K, ignore_index)]
        for c, (panel, name) in enumerate(zip(panels, ["image", "label", "prediction"])):
            axes[r, c].imshow(panel)
            axes[r, c].set_axis_off()
            if r == 0:
                axes[r, c].set_title(name)
    for ax in axes[len(samples):].flat:
        ax.set_axis_off()
    height = fig.get_size_inches()[1]
    fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, legend_h / height), ncol=ncol, fontsize=8,
               frameon=False, borderaxespad=0.2)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, legend_h / height, 1, 1 - (0.3 if title else 0.0) / height))
    fig.savefig(path, dpi=90)
    plt.close(fig)


__all__ = ["colorize", "palette", "plot_segmentation"]
