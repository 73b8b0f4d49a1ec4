"""Segmentation metrics from a confusion matrix, and inference: whole image, sliding window, scales.

Metrics follow mmseg's definitions (in percent): per class, IoU = TP / (TP + FP + FN) and
accuracy = TP / (TP + FN); mIoU and mAcc average over the classes that occur (in the labels or,
for IoU, in the predictions too), aAcc = correct pixels / labelled pixels. Pixels labelled
``ignore_index`` count nowhere.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.seg_transforms import scaled_size


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int = 255) -> Tensor:
    """``(K, K)`` int64 counts, rows = true class, columns = predicted class, over pixels whose
    label is not ``ignore_index``; ``pred`` and ``target`` are integer tensors of one shape."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and label {tuple(target.shape)} differ in shape")
    keep = target != ignore_index
    t, p = target[keep].long(), pred[keep].long()
    bad = (t < 0) | (t >= num_classes)
    if bad.any():  # one device sync
        raise ValueError(f"label values outside 0..{num_classes - 1} (and not {ignore_index}): "
                         f"{torch.unique(t[bad])[:8].tolist()}")
    return torch.bincount(t * num_classes + p, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def _nanmean(values: Tensor) -> float:
    ok = ~torch.isnan(values)
    return float(values[ok].mean()) if ok.any() else float("nan")


def metrics_from_confusion(conf: Tensor, class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """``mIoU``, ``mAcc``, ``aAcc`` (percent) and ``per_class`` ``{name: {"IoU", "Acc"}}``;
    a class absent from labels and predictions has IoU and Acc NaN and is left out of the means."""
    conf = conf.double().cpu()
    tp = conf.diag()
    gt, predicted = conf.sum(1), conf.sum(0)
    union = gt + predicted - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan"))) * 100
    acc = torch.where(gt > 0, tp / gt.clamp(min=1), torch.full_like(tp, float("nan"))) * 100
    names = list(class_names) if class_names is not None else [str(i) for i in range(len(tp))]
    total = float(gt.sum())
    return {"mIoU": _nanmean(iou), "mAcc": _nanmean(acc), "aAcc": 100 * float(tp.sum()) / total if total else float("nan"),
            "per_class": {n: {"IoU": float(i), "Acc": float(a)} for n, i, a in zip(names, iou, acc)}}


def json_safe(value: Any) -> Any:
    """NaN -> None, recursively (strict JSON has no NaN)."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


# -- inference ---------------------------------------------------------------------------------
def slide_windows(size: tuple[int, int], crop: int, stride: int) -> list[tuple[int, int, int, int]]:
    """``(y0, y1, x0, x1)`` windows of at most ``crop x crop`` every ``stride`` pixels covering an
    image of ``size``; the last row and column of windows are moved back to end at the border (mmseg),
    and an image smaller than the window is one window. A stride larger than the window would leave
    pixels between windows with no logits (NaN after averaging, class 0 after argmax): an error."""
    if crop < 1 or not 1 <= stride <= crop:
        raise ValueError(f"sliding window {crop} with stride {stride}: expected a positive window and a stride "
                         f"from 1 to the window (eval.slide_crop, eval.slide_stride)")

    def starts(n: int) -> list[int]:
        count = max(n - crop + stride - 1, 0) // stride + 1
        return sorted({max(min(i * stride, n - crop), 0) for i in range(count)})

    H, W = size
    return [(y, min(y + crop, H), x, min(x + crop, W)) for y in starts(H) for x in starts(W)]


def slide_logits(model: nn.Module, image: Tensor, crop: int, stride: int, batch: int = 16) -> Tensor:
    """``(1, 3, H, W)`` -> ``(1, K, H, W)``: logits averaged over overlapping windows."""
    windows = slide_windows(tuple(image.shape[-2:]), crop, stride)
    out, count = None, torch.zeros(1, 1, *image.shape[-2:], device=image.device)
    for i in range(0, len(windows), batch):
        chunk = windows[i: i + batch]
        if len({(y1 - y0, x1 - x0) for y0, y1, x0, x1 in chunk}) == 1:  # equal windows: one batch
            logits = model(torch.cat([image[..., y0:y1, x0:x1] for y0, y1, x0, x1 in chunk])).float()
        else:
            logits = [model(image[..., y0:y1, x0:x1])[0].float() for y0, y1, x0, x1 in chunk]
        for (y0, y1, x0, x1), lg in zip(chunk, logits):
            if out is None:
                out = torch.zeros(1, lg.shape[0], *image.shape[-2:], device=image.device)
            out[0, :, y0:y1, x0:x1] += lg
            count[..., y0:y1, x0:x1] += 1
    return out / count


def predict(model: nn.Module, image: Tensor, mode: str = "whole", scale: float = 1.0,
            crop: int = 512, stride: int = 341) -> Tensor:
    """Logits ``(1, K, H, W)`` at the size of ``image`` ``(1, 3, H, W)``: the image is resized by
    ``scale``, predicted whole or by sliding windows, and the logits resized back."""
    H, W = image.shape[-2:]
    x = image
    if scale != 1.0:
        # mmseg's test-time resize: mmcv's rounding, bilinear without antialiasing (cv2's INTER_LINEAR)
        x = F.interpolate(image, size=scaled_size(H, W, scale), mode="bilinear", align_corners=False)
    if mode == "whole":
        logits = model(x).float()
    elif mode == "slide":
        logits = slide_logits(model, x, crop, stride)
    else:
        raise ValueError(f"unknown inference mode {mode!r}; expected 'whole' or 'slide'")
    if logits.shape[-2:] != (H, W):
        logits = F.interpolate(logits, size=(H, W), mode="bilinear", align_corners=False)
    return logits


__all__ = ["confusion_matrix", "json_safe", "metrics_from_confusion", "predict", "slide_logits", "slide_windows"]
