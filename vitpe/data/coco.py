"""COCO-format detection data: ``DIR/annotations/instances_<split>.json`` and ``DIR/<split>/``.

The json is read and checked up front by ``coco_index.load_coco`` (what is an error, what is
skipped and counted under ``on_error='skip'``, and what COCOeval scores). An image that cannot be
decoded, or whose pixels disagree with the json's size, shows only when it is read: an error
naming it, or with ``on_error='skip'`` a ``Skipped`` that ``PadCollate`` leaves out of the batch and
hands on, for the loops to name and count.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch
from torchvision import tv_tensors
from torchvision.transforms.v2.functional import pil_to_tensor
from torchvision.ops import box_convert
from tqdm import tqdm

from ..errors import DataError
from .coco_index import CocoFormatError, CocoIndex, OnError, load_coco
from .folder import Skipped, load_rgb


class CocoDetection(torch.utils.data.Dataset):
    """Items ``(image, target)``: ``image`` float ``(3, H, W)`` after ``transform``; ``target`` holds
    ``boxes`` ``(M, 4)`` normalised ``cxcywh`` (crowd boxes left out), contiguous ``labels`` ``(M,)``,
    ``image_id`` (the json's own, a number or a string), ``orig_size`` and ``size`` (height, width
    before / after the transform). An image that cannot be read or disagrees with the json's size
    is a ``DataError`` naming it, or with ``on_error='skip'`` its item is a ``Skipped``.

    ``transform`` takes and returns ``(tv_tensors.Image, {'boxes': BoundingBoxes, 'labels': ...})``.
    ``cache``: decode every image once into memory (uint8), for small datasets and many epochs.
    ``clip_boxes``: see ``load_coco``. ``labels``: the label space, ``(category ids, names)`` in
    label order (the training split's, for a validation json that lists only some of its
    categories); by default the json's own.
    """

    def __init__(self, root: str | Path, split: str, transform: Callable | None = None,
                 on_error: OnError = "error", cache: bool = False, index: CocoIndex | None = None,
                 clip_boxes: bool = False, labels: tuple[list[Any], list[str]] | None = None) -> None:
        self.root, self.split, self.transform, self.on_error = Path(root), split, transform, on_error
        self.image_dir = self.root / split
        self.index = index or load_coco(self.root / "annotations" / f"instances_{split}.json", self.image_dir,
                                        on_error, clip_boxes)
        self.cat_ids, self.class_names = labels or (self.index.cat_ids, self.index.class_names)
        unknown = sorted(set(self.index.cat_ids) - set(self.cat_ids), key=str)
        if unknown:
            raise DataError(f"{self.index.path}: categories {unknown[:10]} are not among the label space's "
                            f"{list(self.cat_ids)[:10]}")
        self.label_of = {cid: i for i, cid in enumerate(self.cat_ids)}
        anns = self.index.by_image()
        self.samples = [(img, [a for a in anns[img["id"]] if not a["iscrowd"]]) for img in self.index.images]
        self._cache: list[torch.Tensor | Skipped] | None = None
        if cache:
            self._cache = [self.load(i) for i in tqdm(range(len(self)), desc=f"decoding {split}", leave=False,
                                                      disable=not sys.stderr.isatty())]

    def __len__(self) -> int:
        return len(self.samples)

    def decode(self, i: int) -> torch.Tensor:
        """``(3, H, W)`` uint8 RGB (grayscale, palette, alpha and CMYK images converted)."""
        img = self.samples[i][0]
        path = self.image_dir / img["file_name"]
        try:
            data = pil_to_tensor(load_rgb(path))
        except Exception as e:  # PIL raises OSError, ValueError, SyntaxError... on bad files
            raise DataError(f"cannot decode image {path}: {str(e).splitlines()[0] if str(e) else 'unreadable'}") from None
        if tuple(data.shape[-2:]) != (img["height"], img["width"]):
            turned = tuple(data.shape[-2:]) == (img["width"], img["height"])
            raise DataError(f"image {path} is {data.shape[-1]}x{data.shape[-2]} but {self.index.path.name} says "
                            f"{img['width']}x{img['height']}" + (
                                " (width and height swapped: the json was likely written from the image turned by "
                                "its EXIF orientation, which is not applied here, as in DETR and torchvision)"
                                if turned else ""))
        return data

    def load(self, i: int) -> torch.Tensor | Skipped:
        """``decode``, or the cached image; an image that fails is a ``DataError`` naming it, or
        with ``on_error='skip'`` a ``Skipped`` saying why."""
        if self._cache is not None:
            return self._cache[i]
        try:
            return self.decode(i)
        except DataError as e:
            if self.on_error == "error":
                raise DataError(f"{e} (set data.on_error=skip to skip such images)") from None
            return Skipped(str(self.image_dir / self.samples[i][0]["file_name"]), str(e))

    def raw(self, i: int) -> tuple[tv_tensors.Image, dict[str, Any]] | Skipped:
        """The decoded image and its boxes (absolute ``xyxy``) before any transform (or its ``Skipped``)."""
        img, anns = self.samples[i]
        data = self.load(i)
        if isinstance(data, Skipped):
            return data
        image = tv_tensors.Image(data)
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes = tv_tensors.BoundingBoxes(box_convert(boxes, "xywh", "xyxy"), format="XYXY",
                                         canvas_size=(img["height"], img["width"]))
        labels = torch.tensor([self.label_of[a["category_id"]] for a in anns], dtype=torch.long)
        return image, {"boxes": boxes, "labels": labels}

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, Any]] | Skipped:
        item = self.raw(i)
        if isinstance(item, Skipped):
            return item
        image, target = item
        if self.transform is not None:
            image, target = self.transform(image, target)
        h, w = image.shape[-2:]
        boxes = box_convert(target["boxes"].as_subclass(torch.Tensor), "xyxy", "cxcywh")
        img = self.samples[i][0]
        return image.as_subclass(torch.Tensor), {
            "boxes": boxes / torch.tensor([w, h, w, h], dtype=torch.float32), "labels": target["labels"],
            "image_id": img["id"], "orig_size": torch.tensor([img["height"], img["width"]]),
            "size": torch.tensor([h, w])}

    def with_transform(self, transform: Callable | None) -> CocoDetection:
        """The same checked index and decoded cache under another transform (evaluation sizes)."""
        other = object.__new__(CocoDetection)
        other.__dict__.update(self.__dict__)
        other.transform = transform
        return other


class DetBatch(NamedTuple):
    images: torch.Tensor  # (B, 3, H, W), padded
    mask: torch.Tensor  # (B, H, W) bool, True on padding
    targets: list[dict[str, Any]]
    skipped: list[Skipped]  # images left out of this batch (on_error=skip): B may be 0


class PadCollate:
    """Pads a batch to a common size, a multiple of ``divisor``: a ``DetBatch`` of the readable
    items and the ``Skipped`` ones. Images sit top-left, as DETR's positions assume."""

    def __init__(self, divisor: int = 32) -> None:
        self.divisor = divisor

    def __call__(self, items: list[tuple[torch.Tensor, dict[str, Any]] | Skipped]) -> DetBatch:
        skipped = [it for it in items if isinstance(it, Skipped)]
        items = [it for it in items if not isinstance(it, Skipped)]
        if not items:
            return DetBatch(torch.zeros(0, 3, 0, 0), torch.zeros(0, 0, 0, dtype=torch.bool), [], skipped)
        d = self.divisor
        H = -(-max(img.shape[-2] for img, _ in items) // d) * d
        W = -(-max(img.shape[-1] for img, _ in items) // d) * d
        images = torch.zeros(len(items), 3, H, W, dtype=items[0][0].dtype)
        mask = torch.ones(len(items), H, W, dtype=torch.bool)
        for i, (img, _) in enumerate(items):
            h, w = img.shape[-2:]
            images[i, :, :h, :w] = img
            mask[i, :h, :w] = False
        return DetBatch(images, mask, [t for _, t in items], skipped)


__all__ = ["CocoDetection", "CocoFormatError", "CocoIndex", "DetBatch", "PadCollate", "load_coco"]
