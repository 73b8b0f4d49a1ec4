"""COCO's official box metrics (pycocotools' COCOeval), COCO's results file, and a figure of
predicted and true boxes.

Detections are scored, and written, as predicted: rounding scores ties some that differ, and
COCOeval orders tied scores by their place in the list, not by merit; rounding boxes moves some
across IoU thresholds and area-range bounds.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path
from typing import Any, Sequence

from torch import Tensor
from torchvision.ops import box_convert

STAT_NAMES = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]


def to_coco_results(preds: Sequence[dict[str, Tensor]], image_ids: Sequence[Any],
                    cat_ids: Sequence[Any]) -> list[dict[str, Any]]:
    """Per-image ``{'scores', 'labels', 'boxes' (xyxy, absolute)}`` -> COCO result entries with the
    dataset's own image ids and category ids (``cat_ids[label]``) and ``[x, y, width, height]``
    boxes, unrounded (width and height taken in float64: no rounding of their own)."""
    out = []
    for p, image_id in zip(preds, image_ids):
        boxes = box_convert(p["boxes"].cpu().double(), "xyxy", "xywh").tolist()
        for box, score, label in zip(boxes, p["scores"].tolist(), p["labels"].tolist()):
            out.append({"image_id": image_id, "category_id": cat_ids[label], "bbox": box, "score": score})
    return out


def write_results(results: list[dict[str, Any]], path: str | Path) -> None:
    """COCO's results file (``results`` as a json list, as ``COCO.loadRes`` reads it), written
    atomically: a temp file in the same folder, then a rename, so a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("w") as f:
            json.dump(results, f, separators=(",", ":"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _result_set(gt: Any, results: list[dict[str, Any]]) -> Any:
    """``results`` as pycocotools' result ``COCO``, on copies (``loadRes`` adds keys to the entries
    it is given). ``loadRes`` refuses an empty list; no detection at all is an empty result set,
    which COCOeval scores 0 where there is ground truth and -1 where an area range has none."""
    from pycocotools.coco import COCO

    if results:
        return gt.loadRes([dict(r) for r in results])
    dt = COCO()
    dt.dataset = {"images": list(gt.dataset["images"]), "categories": gt.dataset["categories"], "annotations": []}
    dt.createIndex()
    return dt


def coco_evaluate(gt: Any, results: list[dict[str, Any]], image_ids: Sequence[Any] | None = None) -> dict[str, Any]:
    """COCOeval on ``results`` over ``image_ids`` (default: every image of ``gt``). Returns AP, AP50,
    AP75, APs, APm, APl (as fractions, COCO's -1 where undefined), the 12 raw ``stats`` and
    COCOeval's printed ``summary``."""
    from pycocotools.cocoeval import COCOeval

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):  # pycocotools prints progress; keep only the summary
        ev = COCOeval(gt, _result_set(gt, results), iouType="bbox")
        if image_ids is not None:
            ev.params.imgIds = sorted(set(image_ids))  # sorted, as COCOeval's default: the order breaks score ties
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


__all__ = ["STAT_NAMES", "coco_evaluate", "plot_curves", "plot_detections", "to_coco_results", "write_results"]
