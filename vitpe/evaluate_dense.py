"""The resolution evaluation of segmentation and detection checkpoints (``python -m vitpe.evaluate``).

Each checkpoint's model is rebuilt from its config, given the checkpoint's weights, and scored on
its validation split, with no fine-tuning:

- segmentation: at test scales of each image's own size (or of its size fitted to
  ``data.base_size``, mmseg's test resize), whole-image inference unless the run evaluated by
  sliding window only, logits resized back to the labels and scored there (mIoU, mAcc, aAcc), as
  ``train_seg.py``'s final evaluation scores each scale;
- detection: with the shorter side resized to each test size and the longer side capped in the
  training ratio (DETR's resize), COCO AP against the json as it is, as ``train_det.py
  --eval-sizes`` scores them.

Weight files named in a config (``model.weights``, ``model.backbone_weights``) are not read again:
the checkpoint holds the whole model.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import torch

from .data.coco import load_coco
from .engine import detection as det
from .engine import segmentation as seg
from .engine.seg_metrics import metrics_from_confusion
from .errors import UserError, out_of_memory

_logger = logging.getLogger(__name__)
SEG_SCALES = [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]  # mmseg's test-time scales


def check_classes(path: str, trained: Sequence[str], found: Sequence[str], where: str) -> None:
    """The data's classes are the checkpoint's: a model scored on other classes would index outputs it
    does not have."""
    if list(found) != list(trained):
        raise UserError(f"{path}: trained on the classes {list(trained)[:5]}, but {where} has {list(found)[:5]}; "
                        f"evaluate on data with the classes the model was trained on")


def seg_dataset(path: str, cfg: seg.SegConfig, state: dict[str, Any], cache: bool = False) -> seg.SegmentationDataset:
    """The validation split of a segmentation checkpoint's run, its classes checked against the
    checkpoint's (the pairs' headers read; their pixels too with ``cache``)."""
    d = cfg.data
    val = seg.SegmentationDataset(d.path, d.val_split, num_classes=d.num_classes, ignore_index=d.ignore_index,
                                  reduce_zero_label=d.reduce_zero_label, on_error=d.on_error, cache=cache)
    check_classes(path, state["classes"], val.classes, f"{d.path} ({d.val_split})")
    return val


def seg_scales(path: str, cfg: seg.SegConfig, state: dict[str, Any], scales: Sequence[float],
               device: torch.device, val: seg.SegmentationDataset | None = None) -> dict[str, dict[str, float]]:
    """``{scale: {mIoU, mAcc, aAcc, n, skipped}}`` of a segmentation checkpoint on its validation
    split; ``val``: that split as ``seg_dataset`` read it without decoding (read again under
    ``data.cache``, which decodes it)."""
    d = cfg.data
    if val is None or d.cache:
        val = seg_dataset(path, cfg, state, d.cache)
    cfg.model.backbone_weights = None  # the checkpoint holds the whole model
    model = seg.build_model(cfg.model, val.num_classes, d.crop_size)
    model.load_state_dict(state["model"])
    model = model.to(device).eval()
    mode = "whole" if "whole" in cfg.eval.modes else cfg.eval.modes[0]
    crop, stride = seg.slide_settings(cfg)
    at_start = len(val.skipped)  # pairs whose headers failed, already out of the dataset

    def run(at: Sequence[float]) -> dict[str, Any]:
        return seg.evaluate(model, val, device, cfg.run.amp, (mode,), tuple(at), crop, stride, f"eval ({mode})",
                            d.base_size, fuse=())[mode]

    try:  # every scale in one pass over the images
        conf = run(scales)
    except (RuntimeError, torch.OutOfMemoryError) as e:
        if not out_of_memory(e):
            raise
        del e
        _logger.warning("out of memory with every scale in one pass: the scales one at a time")
        conf = {}
        for s in scales:
            conf[str(s)] = _unless_out_of_memory(lambda: run([s])[str(s)], f"scale {s}", device)
    lost = {k.path for k in val.skipped[at_start:]}  # pairs that failed when decoded (once per pass)
    scored, skipped = len(val) - len(lost), at_start + len(lost)
    out = {}
    for s in scales:
        c = conf[str(s)]
        if isinstance(c, dict):  # the error
            out[str(s)] = c
            continue
        m = metrics_from_confusion(c, val.classes)
        out[str(s)] = {k: m[k] for k in ("mIoU", "mAcc", "aAcc")}
        out[str(s)].update(n=scored, skipped=skipped)
    return out


def _unless_out_of_memory(fn: Any, at: str, device: torch.device) -> Any:
    """``fn()``, or where it runs out of memory ``{"error": ...}``, logged; the other sizes go on."""
    try:
        return fn()
    except (RuntimeError, torch.OutOfMemoryError) as e:
        if not out_of_memory(e):
            raise
        del e  # the traceback holds the failed step's tensors
        if device.type == "cuda":
            torch.cuda.empty_cache()
        _logger.warning("%s: out of memory; left out, the other sizes go on", at)
        return {"error": "out of memory"}


def det_dataset(path: str, cfg: det.DetConfig, state: dict[str, Any], cache: bool = False) -> det.CocoDetection:
    """The validation json of a DETR checkpoint's run, in the checkpoint's label space, its classes
    checked against the checkpoint's (the images decoded only with ``cache``)."""
    d = cfg.data
    index = load_coco(Path(d.path) / "annotations" / f"instances_{d.val_split}.json", Path(d.path) / d.val_split,
                      d.on_error, d.clip_boxes)
    labels = None
    if index.class_names != list(state["classes"]):
        # a validation json listing only some of the training categories: the training json's labels
        train = load_coco(Path(d.path) / "annotations" / f"instances_{d.train_split}.json",
                          Path(d.path) / d.train_split, d.on_error, d.clip_boxes)
        labels = (train.cat_ids, train.class_names)
    val = det.CocoDetection(d.path, d.val_split, det.eval_transform(d.min_size, d.max_size), d.on_error, cache,
                            index=index, labels=labels)
    check_classes(path, state["classes"], val.class_names, f"{d.path} ({d.val_split})")
    return val


def det_sizes(path: str, cfg: det.DetConfig, state: dict[str, Any], sizes: Sequence[int],
              device: torch.device, val: det.CocoDetection | None = None) -> dict[str, dict[str, float]]:
    """``{size: {AP, AP50, AP75, n, skipped}}`` of a DETR checkpoint on its validation split at each
    shorter side; ``val``: that split as ``det_dataset`` read it without decoding (read again under
    ``data.cache``)."""
    if val is None or cfg.data.cache:
        val = det_dataset(path, cfg, state, cfg.data.cache)
    cfg.model.weights = cfg.model.backbone_weights = None  # the checkpoint holds the whole model
    model = det.build_model(cfg.model, len(state["classes"]))
    model.load_state_dict(state["model"])
    model = model.to(device).eval()
    out = {}
    for s in sizes:
        m = _unless_out_of_memory(lambda: det.evaluate(model, det.eval_loader(val, cfg, model.size_divisibility, s),
                                                       val, device, cfg.run.amp, f"eval {s}", gather=False),
                                  f"shorter side {s}px (batch size {cfg.eval.batch_size})", device)
        out[str(s)] = m if "error" in m else {**{k: m[k] for k in ("AP", "AP50", "AP75") if k in m},
                                               "n": m["images"], "skipped": m["skipped"]}
    return out


__all__ = ["SEG_SCALES", "check_classes", "det_dataset", "det_sizes", "seg_dataset", "seg_scales"]
