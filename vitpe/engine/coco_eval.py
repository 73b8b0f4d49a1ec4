"""COCO's official box metrics (pycocotools' COCOeval) and a figure of predicted and true boxes."""
from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor
from torchvision.ops import box_convert

STAT_NAMES = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]


def to_coco_results(preds: Sequence[dict[str, Tensor]], image_ids: Sequence[int],
                    cat_ids: Sequence[int]) -> list[dict[str, Any]]:
    """Per-image ``{'scores', 'labels', 'boxes' (xyxy, absolute)}`` -> COCO result entries with the
    dataset's own category ids (``cat_ids[label]``) and ``[x, y, width, height]`` boxes."""
    out = []
    for p, image_id in zip(preds, image_ids):
        boxes = box_convert(p["boxes"].float().cpu(), "xyxy", "xywh").tolist()
        for box, score, label in zip(boxes, p["scores"].tolist(), p["labels"].tolist()):
            out.append({"image_id": int(image_id), "category_id": int(cat_ids[label]),
                        "bbox": [round(v, 2) for v in box], "score": round(float(score), 5)})
    return out


def coco_evaluate(gt: Any, results: list[dict[str, Any]], image_ids: Sequence[int] | None = None) -> dict[str, Any]:
    """COCOeval on ``results`` over ``image_ids`` (default: every image of ``gt``). Returns AP, AP50,
    AP75, APs, APm, APl (as fractions, COCO's -1 where undefined), the 12 raw ``stats`` and
    COCOeval's printed ``summary``."""
    from pycocotools.cocoeval import COCOeval

    if not results:  # loadRes refuses an empty list: no detection scores 0 everywhere
        stats = [0.0] * len(STAT_NAMES)
        return {**dict(zip(STAT_NAMES[:6], stats)), "stats": stats, "summary": "no detections"}
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):  # pycocotools prints progress; keep only the summary
        dt = gt.loadRes(results)
        ev = COCOeval(gt, dt, iouType="bbox")
        if image_ids is not None:
            ev.params.imgIds = sorted(set(int(i) for i in image_ids))
        ev.evaluate()
        ev.accumulate()
        mark = buf.tell()
        ev.summarize()
    stats = [float(s) for s in ev.stats]
    return {**dict(zip(STAT_NAMES[:6], stats)), "stats": stats, "summary": buf.getvalue()[mark:].rstrip()}


def plot_detections(samples: Sequence[tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]], class_names: Sequence[str],
                    path: str | Path, score_threshold: float = 0.5, title: str = "") -> None:
    """A row of images, each ``(image (3, H, W) uint8, truth {'boxes', 'labels'}, prediction
    {'boxes', 'labels', 'scores'})`` with boxes in the image's pixels: true boxes dashed green,
    predictions above ``score_threshold`` in red with their class and score."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    n = max(len(samples), 1)
    fig, axes = plt.subplots(1, n, figsize=(4.5 * n, 4), squeeze=False)
    for ax, (image, truth, pred) in zip(axes[0], samples):
        ax.imshow(image.permute(1, 2, 0).cpu().numpy())
        for (x0, y0, x1, y1) in truth["boxes"].tolist():
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec="lime", lw=1.2, ls="--"))
        keep = pred["scores"] >= score_threshold
        for (x0, y0, x1, y1), lab, s in zip(pred["boxes"][keep].tolist(), pred["labels"][keep].tolist(),
                                            pred["scores"][keep].tolist()):
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec="red", lw=1.2))
            ax.text(x0, y0, f"{class_names[lab]} {s:.2f}", color="white", fontsize=6, va="bottom",
                    bbox=dict(facecolor="red", alpha=0.6, pad=0.5, lw=0))
        ax.set_axis_off()
    for ax in axes[0][len(samples):]:
        ax.set_axis_off()
    fig.suptitle(title or f"predictions (red, score >= {score_threshold}) and ground truth (dashed green)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(runs: dict[str, Sequence[dict[str, Any]]], path: str | Path,
                metrics: Sequence[str] = ("loss", "val_AP50", "val_AP")) -> None:
    """One panel per metric of ``metrics.jsonl`` records against the epoch, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4), squeeze=False)
    for ax, key in zip(axes[0], metrics):
        for name, records in runs.items():
            pts = [(r["epoch"] + 1, r[key]) for r in records if key in r]
            if pts:
                ax.plot(*zip(*pts), marker="o" if len(pts) < 15 else None, ms=3, label=name)
        ax.set_xlabel("epoch")
        ax.set_title(key.replace("val_", "validation "), fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


__all__ = ["STAT_NAMES", "coco_evaluate", "plot_curves", "plot_detections", "to_coco_results"]
