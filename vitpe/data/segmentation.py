"""Semantic-segmentation data in the ADE20K layout, checked up front, and its augmentation.

``DIR/images/<split>/*.jpg|png`` with ``DIR/annotations/<split>/<stem>.png`` beside them (sub-folders
too, mirrored under ``annotations``, as mmseg lists them; hidden files such as ``.DS_Store`` or
macOS's ``._*`` are passed over), one class index per pixel (``ignore_index``, 255 by default, is
not scored); ``DIR/classes.json`` (a list of names) is optional. Every mask is decoded and checked
when the dataset is built, so that a bad pair stops the run with one message naming the file, or,
with ``on_error='skip'``, is dropped, logged and counted (``dataset.skipped``); a wrong mIoU is
never computed silently:

- an image without a mask; a mask whose size differs from its image's; two images sharing a mask
  (``a.jpg`` and ``a.png``);
- a mask with several channels (a colour rendering, not class indices);
- a label value at or above ``num_classes`` that is not ``ignore_index``.

Samples are raw ``uint8`` tensors; augmentation (random scale, crop, flip) runs batched on the
training device (``augment_batch``), so images decoded once into memory keep a GPU busy.
"""
from __future__ import annotations

import functools
import json
import logging
import math
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from ..errors import DataError
from .folder import Skipped, load_rgb, walk_files

_logger = logging.getLogger(__name__)
OnError = Literal["error", "skip"]
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


def read_classes(root: str | Path, num_classes: int) -> list[str]:
    """Names from ``root/classes.json`` (a list) when present, else ``class_0..``; ``num_classes``
    0 means "as many as classes.json lists"."""
    if not Path(root).is_dir():
        raise DataError(f"data folder not found: {root}")
    path = Path(root) / "classes.json"
    if not path.is_file():
        if num_classes <= 0:
            raise DataError(f"{root}: no classes.json, so the number of classes must be given (--num-classes)")
        return [f"class_{i}" for i in range(num_classes)]
    try:
        names = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise DataError(f"{path}: expected a list of class names")
    if num_classes > 0 and num_classes != len(names):
        raise DataError(f"{path} lists {len(names)} classes but --num-classes is {num_classes}")
    return names


def read_mask(path: Path, reduce_zero_label: bool, ignore_index: int) -> np.ndarray:
    """``(H, W)`` int64 class indices; ADE20K's ``reduce_zero_label`` maps 0 (other) to ignore and
    shifts the rest down by one."""
    with Image.open(path) as im:
        if im.mode not in ("L", "P", "I", "I;16", "1"):
            raise DataError(f"{path}: mask has mode {im.mode}, expected one channel of class indices "
                            f"(a colour rendering of the labels cannot be read)")
        mask = np.asarray(im, dtype=np.int64)
    if reduce_zero_label:
        mask = np.where(mask == 0, ignore_index, mask - 1)
        mask[mask == ignore_index - 1] = ignore_index
    return mask


def mask_dtype(num_classes: int, ignore_index: int) -> torch.dtype:
    """The smallest integer dtype that holds every class index and the ignore index (which may be
    negative, e.g. -100, and must not wrap around into a class)."""
    lo, hi = min(0, ignore_index), max(num_classes - 1, ignore_index)
    if lo >= 0 and hi < 256:
        return torch.uint8
    return torch.int16 if -2**15 <= lo and hi < 2**15 else torch.int32


class SegmentationDataset(torch.utils.data.Dataset):
    """Items are ``(image (3, H, W) uint8, mask (H, W) uint8|int16)``; ``cache`` keeps every decoded
    image in memory (decoded once, here)."""

    def __init__(self, root: str | Path, split: str, num_classes: int, ignore_index: int = 255,
                 reduce_zero_label: bool = False, on_error: OnError = "error", cache: bool = False) -> None:
        self.root, self.split, self.ignore_index = Path(root), split, ignore_index
        self.classes = read_classes(root, num_classes)
        self.num_classes = len(self.classes)
        self.reduce_zero_label, self.on_error = reduce_zero_label, on_error
        self.skipped: list[Skipped] = []
        pairs = self._pairs()
        self.images: list[Path] = []
        self.masks: list[Tensor] = []
        owner: dict[Path, Path] = {}
        for image, mask in pairs:
            if mask in owner:  # img.jpg and img.png: which one the mask labels is unknown
                self._bad(image, f"its mask {mask} is also the mask of {owner[mask].name}")
                continue
            owner[mask] = image
            checked = self._check(image, mask)
            if checked is not None:
                self.images.append(image)
                self.masks.append(checked)
        if self.skipped:
            _logger.warning("%s: skipped %d of %d image(s) with bad masks", self.root / "images" / split,
                            len(self.skipped), len(pairs))
        if not self.images:
            raise DataError(f"{self.root / 'images' / split}: no usable image-mask pairs")
        self._cache = [self.decode(i) for i in range(len(self.images))] if cache else None

    def _pairs(self) -> list[tuple[Path, Path]]:
        image_dir, mask_dir = self.root / "images" / self.split, self.root / "annotations" / self.split
        if not self.root.is_dir():
            raise DataError(f"data folder not found: {self.root}")
        for d in (image_dir, mask_dir):
            if not d.is_dir():
                raise DataError(f"{d} not found: expected DIR/images/{self.split}/ and DIR/annotations/{self.split}/ "
                                f"(ADE20K layout)")
        # sub-folders too (mmseg lists recursively), hidden files and folders passed over
        images = [Path(f) for f in walk_files(image_dir) if Path(f).suffix.lower() in IMAGE_SUFFIXES]
        if not images:
            raise DataError(f"{image_dir}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        return [(p, mask_dir / p.relative_to(image_dir).with_suffix(".png")) for p in sorted(images)]

    def _bad(self, path: Path, reason: str) -> None:
        if self.on_error == "error":
            raise DataError(f"{path}: {reason} (set data.on_error=skip to drop such files)")
        self.skipped.append(Skipped(str(path), reason))
        _logger.warning("warning: skipped %s: %s", path, reason)

    def _check(self, image: Path, mask_path: Path) -> Tensor | None:
        """The checked mask as a compact tensor, or None (skipped)."""
        if not mask_path.is_file():
            return self._bad(image, f"no mask {mask_path}")
        try:
            mask = read_mask(mask_path, self.reduce_zero_label, self.ignore_index)
        except DataError as e:
            return self._bad(mask_path, str(e).removeprefix(f"{mask_path}: "))
        except (OSError, ValueError, SyntaxError) as e:  # the mask's file is named, not its image's
            return self._bad(mask_path, f"unreadable mask ({str(e).splitlines()[0] if str(e) else type(e).__name__})")
        try:
            with Image.open(image) as im:
                size = im.size  # (W, H) from the header; the pixels are decoded later
        except (OSError, ValueError, SyntaxError) as e:
            return self._bad(image, f"unreadable ({str(e).splitlines()[0] if str(e) else type(e).__name__})")
        if (mask.shape[1], mask.shape[0]) != size:
            return self._bad(mask_path, f"mask is {mask.shape[1]}x{mask.shape[0]} but image {image.name} is "
                                        f"{size[0]}x{size[1]}")
        bad = np.unique(mask[(mask >= self.num_classes) & (mask != self.ignore_index)])
        if bad.size:
            return self._bad(mask_path, f"label values {bad[:8].tolist()} are not classes 0..{self.num_classes - 1} "
                                        f"nor the ignore index {self.ignore_index}")
        return torch.from_numpy(mask).to(mask_dtype(self.num_classes, self.ignore_index))

    def decode(self, i: int) -> Tensor:
        """``(3, H, W)`` uint8 RGB."""
        path = self.images[i]
        try:
            return torch.from_numpy(np.asarray(load_rgb(path)).copy()).permute(2, 0, 1).contiguous()
        except (OSError, ValueError, SyntaxError) as e:
            raise DataError(f"cannot decode image {path}: {str(e).splitlines()[0] if str(e) else 'unreadable'}") from None

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        image = self._cache[i] if self._cache is not None else self.decode(i)
        return image, self.masks[i]


def list_collate(items: list) -> list:
    """Keep the samples apart: images differ in size until they are cropped on the device."""
    return items


# -- augmentation and normalisation (on the training device) -----------------------------------
@functools.lru_cache(maxsize=8)
def _stats(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> tuple[Tensor, Tensor]:
    # Made once per device: a tensor built from Python numbers on a GPU is a pageable host-to-device
    # copy, which waits for the whole stream; once per sample it stalled training (and far more so
    # with several processes sharing the GPU).
    return (torch.tensor(mean, device=device).view(3, 1, 1) * 255, torch.tensor(std, device=device).view(3, 1, 1) * 255)


def normalize(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """uint8 or 0..255 float ``(..., 3, H, W)`` -> normalised float32."""
    m, s = _stats(tuple(mean), tuple(std), images.device)
    return (images.float() - m) / s


def scale_crop(image: Tensor, mask: Tensor, crop: int, scale: float, flip: bool,
               gen: torch.Generator | None = None, cat_max_ratio: float = 1.0,
               ignore_index: int = 255) -> tuple[Tensor, Tensor, tuple[int, int]]:
    """Rescale by ``scale`` and take a random ``crop x crop`` window (smaller if the rescaled image
    is): only the window's source region is resampled. With ``cat_max_ratio`` below 1, mmseg's
    ``RandomCrop``: up to 10 more windows are drawn while the one drawn holds a single class or one
    class covers ``cat_max_ratio`` or more of its labelled pixels (counted on the source region;
    the last one drawn is kept). Returns the float image ``(3, h, w)`` (0..255), the int64 mask
    ``(h, w)`` and ``(h, w)``."""
    H, W = image.shape[-2:]
    th, tw = max(1, round(H * scale)), max(1, round(W * scale))
    oh, ow = min(crop, th), min(crop, tw)

    def window() -> tuple[int, int, int, int]:
        y0 = int(torch.randint(th - oh + 1, (1,), generator=gen))
        x0 = int(torch.randint(tw - ow + 1, (1,), generator=gen))
        ys, ye = math.floor(y0 * H / th), max(math.floor(y0 * H / th) + 1, math.ceil((y0 + oh) * H / th))
        xs, xe = math.floor(x0 * W / tw), max(math.floor(x0 * W / tw) + 1, math.ceil((x0 + ow) * W / tw))
        return ys, ye, xs, xe

    ys, ye, xs, xe = window()
    for _ in range(10 if cat_max_ratio < 1.0 else 0):
        labels = mask[ys:ye, xs:xe].flatten().long()
        counts = torch.bincount(labels[labels != ignore_index])
        counts = counts[counts > 0]
        if len(counts) > 1 and counts.max() < cat_max_ratio * counts.sum():
            break
        ys, ye, xs, xe = window()
    img = F.interpolate(image[None, :, ys:ye, xs:xe].float(), size=(oh, ow), mode="bilinear",
                        align_corners=False, antialias=scale < 1)[0]
    lab = F.interpolate(mask[None, None, ys:ye, xs:xe].float(), size=(oh, ow), mode="nearest")[0, 0].long()
    if flip:
        img, lab = img.flip(-1), lab.flip(-1)
    return img, lab, (oh, ow)


def base_scale(size: Sequence[int], base_size: Sequence[int] | None) -> float:
    """The factor that makes an image of ``size`` ``(H, W)`` fit ``base_size`` keeping its aspect
    ratio, as mmseg's ``Resize(scale=(2048, 512), keep_ratio=True)``: its longer side at most the
    larger value, its shorter side at most the smaller, one of them reached (so small images grow).
    ``None``: 1, the image's own size."""
    if base_size is None:
        return 1.0
    long_max, short_max = max(base_size), min(base_size)
    if short_max <= 0:
        raise ValueError(f"data.base_size must be two positive sizes; got {list(base_size)}")
    return min(long_max / max(size), short_max / min(size))


def augment_batch(samples: list[tuple[Tensor, Tensor]], crop: int, scale_range: tuple[float, float], flip_p: float,
                  mean: Sequence[float], std: Sequence[float], ignore_index: int, device: torch.device,
                  gen: torch.Generator | None = None, base_size: Sequence[int] | None = None,
                  cat_max_ratio: float = 1.0) -> tuple[Tensor, Tensor]:
    """Random scale in ``scale_range`` (of the image's own size, or with ``base_size`` of its size
    once fitted to it: ``base_scale``, mmseg's ``RandomResize`` with a ``ratio_range``), crop and
    horizontal flip of each sample, on ``device`` (``cat_max_ratio``: see ``scale_crop``); windows
    smaller than the crop are padded (image 0 after normalising, mask ``ignore_index``). Returns images ``(B, 3, crop, crop)`` float32 and
    masks ``(B, crop, crop)`` int64."""
    images = torch.zeros(len(samples), 3, crop, crop, device=device)
    masks = torch.full((len(samples), crop, crop), ignore_index, dtype=torch.long, device=device)
    lo, hi = scale_range
    for b, (image, mask) in enumerate(samples):
        scale = (lo + (hi - lo) * float(torch.rand((), generator=gen))) * base_scale(image.shape[-2:], base_size)
        flip = float(torch.rand((), generator=gen)) < flip_p
        img, lab, (h, w) = scale_crop(image.to(device, non_blocking=True), mask.to(device, non_blocking=True),
                                      crop, scale, flip, gen, cat_max_ratio, ignore_index)
        images[b, :, :h, :w] = normalize(img, mean, std)
        masks[b, :h, :w] = lab
    return images, masks


__all__ = ["SegmentationDataset", "Skipped", "augment_batch", "list_collate", "normalize", "read_classes",
           "read_mask", "scale_crop", "base_scale"]
