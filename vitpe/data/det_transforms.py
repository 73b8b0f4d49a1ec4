"""Detection transforms (torchvision.transforms.v2, boxes as ``tv_tensors.BoundingBoxes``): DETR's
random flip, multi-scale resize and random crop for training; a plain resize for evaluation."""
from __future__ import annotations

from typing import Any

from timm.data import IMAGENET_DEFAULT_MEAN as IMAGENET_MEAN
from timm.data import IMAGENET_DEFAULT_STD as IMAGENET_STD
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F


class RandomSizeCrop(v2.Transform):
    """Crop a random region whose height and width are drawn in ``[min_size, max_size]`` (capped by
    the image), as DETR's ``RandomSizeCrop``; boxes are cropped with it."""

    def __init__(self, min_size: int, max_size: int) -> None:
        super().__init__()
        self.min_size, self.max_size = min_size, max_size

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        image = next(x for x in flat_inputs if isinstance(x, tv_tensors.Image))
        h, w = F.get_size(image)
        th = int(torch.randint(min(h, self.min_size), min(h, self.max_size) + 1, ()))
        tw = int(torch.randint(min(w, self.min_size), min(w, self.max_size) + 1, ()))
        top, left = int(torch.randint(0, h - th + 1, ())), int(torch.randint(0, w - tw + 1, ()))
        return dict(top=top, left=left, height=th, width=tw)

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.crop, inpt, **params)


def _finish() -> list[v2.Transform]:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]


def train_transform(min_size: int, max_size: int, flip: float = 0.5, multiscale: bool = True,
                    crop_prob: float = 0.5) -> v2.Compose:
    """DETR's recipe scaled to ``min_size`` (800 in the paper): shorter side drawn from
    ``0.6..1.0 x min_size`` in steps of ``0.04``; with probability ``crop_prob`` first a resize to
    ``{0.5, 0.625, 0.75} x min_size`` and a random crop of ``0.48..0.75 x min_size``. Boxes that
    a crop leaves empty are dropped (``SanitizeBoundingBoxes``)."""
    scales = [round(min_size * (0.6 + 0.04 * k)) for k in range(11)] if multiscale else [min_size]
    resize = v2.RandomShortestSize(scales, max_size=max_size)
    steps: list[v2.Transform] = [v2.RandomHorizontalFlip(flip)]
    if crop_prob > 0:
        crop = v2.Compose([v2.RandomShortestSize([round(min_size * f) for f in (0.5, 0.625, 0.75)]),
                           RandomSizeCrop(round(min_size * 0.48), round(min_size * 0.75)), resize])
        steps.append(v2.RandomChoice([resize, crop], p=[1 - crop_prob, crop_prob]))
    else:
        steps.append(resize)
    return v2.Compose([*steps, v2.SanitizeBoundingBoxes(), *_finish()])


def eval_transform(min_size: int, max_size: int) -> v2.Compose:
    """Shorter side to ``min_size``, longer side at most ``max_size``: a pure rescale, so boxes
    predicted relative to the image map straight back to the original."""
    return v2.Compose([v2.Resize(min_size, max_size=max_size), *_finish()])


__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "RandomSizeCrop", "eval_transform", "train_transform"]
