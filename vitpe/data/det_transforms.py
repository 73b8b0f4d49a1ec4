"""Detection transforms (torchvision.transforms.v2, boxes as ``tv_tensors.BoundingBoxes``): DETR's
random flip, multi-scale resize and random crop for training; a plain resize for evaluation.

Output sizes are DETR's (``get_size_with_aspect_ratio``: the shorter side exactly the size drawn,
the longer one floored; with a cap on the longer side, the shorter side rounded from it), where
torchvision's ``RandomShortestSize`` and ``Resize`` can land a pixel or three away. Boxes are
clamped to the image after the geometry, then only boxes with no area are dropped, as DETR's crop
does: a resize scales coordinates by a float32 ratio, and a box touching the right or bottom edge
can come out a rounding step past it, which ``SanitizeBoundingBoxes`` alone would drop (about one
such box in seven under the training recipe), turning a real object into "no object".
"""
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


def detr_size(height: int, width: int, size: int, max_size: int | None = None) -> tuple[int, int]:
    """``(height, width)`` with the shorter side ``size`` and the aspect ratio kept (the longer side
    floored), the longer side held to ``max_size`` by shrinking ``size`` (rounded): DETR's
    ``get_size_with_aspect_ratio``."""
    if max_size is not None:
        short, long = float(min(height, width)), float(max(height, width))
        if long / short * size > max_size:
            size = int(round(max_size * short / long))
    if (width <= height and width == size) or (height <= width and height == size):
        return height, width
    if width < height:
        return int(size * height / width), size
    return size, int(size * width / height)


class ShorterSideResize(v2.Transform):
    """Resize to a shorter side drawn from ``sizes`` (one: a fixed rescale), the longer side at
    most ``max_size``, at DETR's output sizes (``detr_size``); boxes are scaled with the image."""

    def __init__(self, sizes: list[int], max_size: int | None = None) -> None:
        super().__init__()
        self.sizes, self.max_size = list(sizes), max_size

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        image = next(x for x in flat_inputs if isinstance(x, tv_tensors.Image))
        size = self.sizes[int(torch.randint(len(self.sizes), ()))] if len(self.sizes) > 1 else self.sizes[0]
        return dict(size=list(detr_size(*F.get_size(image), size, self.max_size)))

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.resize, inpt, params["size"], antialias=True)


class DropBoxesWithoutArea(v2.Transform):
    """Of ``(image, {"boxes", "labels", ...})``, drop the boxes (and the entries of every other
    per-box tensor of the target) whose width or height is not positive, as DETR's crop does.
    torchvision's ``SanitizeBoundingBoxes`` cannot keep boxes under one pixel."""

    def forward(self, image: Any, target: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        boxes = target["boxes"]
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        if bool(keep.all()):
            return image, target
        n = len(boxes)
        out = {k: v[keep] if isinstance(v, torch.Tensor) and v.ndim and len(v) == n else v for k, v in target.items()}
        out["boxes"] = tv_tensors.wrap(out["boxes"], like=boxes)
        return image, out


def _sanitize() -> list[v2.Transform]:
    """Boxes clamped to the image, then those with no area dropped (labels with them)."""
    return [v2.ClampBoundingBoxes(), DropBoxesWithoutArea()]


def _finish() -> list[v2.Transform]:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]


def train_transform(min_size: int, max_size: int, flip: float = 0.5, multiscale: bool = True,
                    crop_prob: float = 0.5) -> v2.Compose:
    """DETR's recipe scaled to ``min_size`` (800 in the paper): shorter side drawn from
    ``0.6..1.0 x min_size`` in steps of ``0.04``; with probability ``crop_prob`` first a resize to
    ``{0.5, 0.625, 0.75} x min_size`` and a random crop of ``0.48..0.75 x min_size``. Boxes that
    a crop leaves without area are dropped; boxes cut by it are kept, however thin."""
    scales = [round(min_size * (0.6 + 0.04 * k)) for k in range(11)] if multiscale else [min_size]
    resize = ShorterSideResize(scales, max_size)
    steps: list[v2.Transform] = [v2.RandomHorizontalFlip(flip)]
    if crop_prob > 0:
        crop = v2.Compose([ShorterSideResize([round(min_size * f) for f in (0.5, 0.625, 0.75)]),
                           RandomSizeCrop(round(min_size * 0.48), round(min_size * 0.75)), resize])
        steps.append(v2.RandomChoice([resize, crop], p=[1 - crop_prob, crop_prob]))
    else:
        steps.append(resize)
    return v2.Compose([*steps, *_sanitize(), *_finish()])


def eval_transform(min_size: int, max_size: int) -> v2.Compose:
    """Shorter side to ``min_size``, longer side at most ``max_size``: a pure rescale, so boxes
    predicted relative to the image map straight back to the original."""
    return v2.Compose([ShorterSideResize([min_size], max_size), *_finish()])


__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "RandomSizeCrop", "ShorterSideResize", "detr_size", "eval_transform",
           "train_transform"]
