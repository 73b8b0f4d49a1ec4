"""ImageNet-layout folders (``root/<split>/<class>/<image>``), robust to bad files.

As in torchvision's ImageFolder, class indices follow the sorted class folder names (of the training
split: another split is indexed by those names, and may lack a class's folder but not have one of
its own) and a class's images may also lie in sub-folders of its folder; hidden files and folders (``.DS_Store``,
``.ipynb_checkpoints``) are left out. Any other file is a sample: one that is not an image is
skipped like a corrupt one. EXIF orientation is not applied (as torchvision, timm and the device
decoder of ``gpu_decode``).

Any image PIL opens is read and converted to RGB (grayscale, 16-bit grayscale scaled to 8 bits,
palette, RGBA, CMYK). A corrupt, truncated or empty file does not stop an epoch: ``__getitem__``
returns a ``Skipped`` for it, and ``collate_skipping`` drops it from the batch while recording its
path, so the training loop can warn once per file and count the skips at the end of the epoch.

A transform that raises (a random augmentation can draw parameters its library refuses, such as
timm's RandAugment ``posterize`` at 0 bits under Pillow 13) is drawn again, up to
``TRANSFORM_TRIES`` times; an image it fails on every time is skipped like an unreadable one, its
reason naming the transform's error.
"""
from __future__ import annotations

import collections
import copy
import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset, default_collate

from ..errors import DataError

_logger = logging.getLogger(__name__)


class Skipped(NamedTuple):
    """A sample that could not be read: its path and why."""
    path: str
    reason: str


def warn_skipped(skipped: Iterable[Skipped], seen: set[str], logger: logging.Logger) -> None:
    """Name each file of ``skipped`` in a warning once over the calls that share ``seen`` (a file
    met again in a later epoch or at another size is not named again)."""
    for s in skipped:
        if s.path not in seen:
            seen.add(s.path)
            logger.warning("warning: skipped %s", s.reason if s.path in s.reason else f"{s.path} ({s.reason})")


TRANSFORM_TRIES = 3


def transformed(transform: Callable | None, img: Image.Image, path: str, named: set[str]) -> Any:
    """``transform(img)``, drawn again when it raises; a ``Skipped`` when it raises every time. Each
    error is named in a warning once over the calls that share ``named``."""
    if transform is None:
        return img
    for _ in range(TRANSFORM_TRIES):
        try:
            return transform(img)
        except Exception as e:  # noqa: BLE001 - any library's error: the image is skipped, not the epoch
            reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no message'}"
            if reason not in named:
                named.add(reason)
                _logger.warning("the transform raised %s on %s; drawing it again (named once)", reason, path)
    return Skipped(path, f"the transform failed {TRANSFORM_TRIES} times ({reason})")


class Batch(NamedTuple):
    images: Tensor  # (B, 3, H, W) float, normalised
    targets: Tensor  # (B,) int64 class indices
    skipped: list[Skipped]  # files dropped from this batch


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB whatever the mode, as torchvision's and timm's loaders give it (``convert('RGB')``:
    transparency is dropped, the colour under it kept), except 16-bit grey, which ``convert`` would
    clip at 255 and which is scaled to 8 bits here. Mode "I" (32-bit integers: a 16-bit PGM, or a
    TIFF) is taken as 16-bit unless no value is above 255, where it is 8-bit data as it stands."""
    if img.mode.startswith("I"):  # 16-bit grey ("I;16*"; "I" from PGM)
        grey = np.asarray(img)
        if img.mode != "I" or grey.max(initial=0) > 255:
            grey = np.clip(grey, 0, 65535) >> 8
        return Image.fromarray(np.clip(grey, 0, 255).astype(np.uint8), "L").convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def load_rgb(path: str | Path) -> Image.Image:
    """Decode fully (so a truncated file fails here, not later) and convert to RGB."""
    with Image.open(path) as img:
        img.load()
        return to_rgb(img)


def scan_folder(root: str | Path, split: str) -> tuple[list[str], list[tuple[str, int]]]:
    """Class names (sorted sub-folders of ``root/split``) and ``(path, class index)`` samples."""
    split_dir = Path(root) / split
    if not Path(root).is_dir():
        raise DataError(f"data folder not found: {root}")
    if not split_dir.is_dir():
        raise DataError(f"{split_dir} not found: expected {root}/{split}/<class>/<images> (ImageNet layout)")
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{split_dir} has no class folders: expected {split_dir}/<class>/<images>")
    samples = [(f, i) for i, c in enumerate(classes) for f in walk_files(split_dir / c)]
    if not samples:
        raise DataError(f"{split_dir}: the class folders hold no files")
    return classes, samples


def walk_files(folder: Path) -> list[str]:
    """The files under ``folder`` at any depth, sorted, but for hidden ones and those in hidden
    folders; linked folders are followed, each real folder once (a link to a parent ends there)."""
    found, seen = [], {os.path.realpath(folder)}
    for top, dirs, files in os.walk(folder, followlinks=True):
        keep = []
        for d in dirs:
            real = os.path.realpath(os.path.join(top, d))
            if not d.startswith(".") and real not in seen:
                seen.add(real)
                keep.append(d)
        dirs[:] = keep
        found += [os.path.join(top, f) for f in files if not f.startswith(".")]
    return sorted(found)


class ImageFolder(Dataset):
    """``root/split/<class>/*``; items are ``(image, class index)`` or a ``Skipped`` for an unreadable file."""

    def __init__(self, root: str | Path, split: str, transform: Callable | None = None,
                 classes: list[str] | None = None) -> None:
        self.root, self.split, self.transform = Path(root), split, transform
        self._named: set[str] = set()  # transform errors already named (per process: workers copy it)
        found, self.samples = scan_folder(root, split)
        self.classes = found if classes is None else classes
        if classes is None:  # the split that defines the classes: each must have images (as torchvision's)
            counts = collections.Counter(target for _, target in self.samples)
            empty = [c for i, c in enumerate(found) if not counts[i]]
            if empty:
                raise DataError(f"{self.root / split}: class folder(s) with no files: {empty[:5]}; a class "
                                f"without images would still get an output (remove the folder)")
        if classes is not None and found != classes:  # val indexes train's classes, by name
            extra = [c for c in found if c not in classes]
            if extra:
                raise DataError(f"{self.root / split}: class folder(s) that the training split does not have: "
                                f"{extra[:5]} (its classes: {classes[:5]}{' ...' if len(classes) > 5 else ''})")
            # a class with no folder here has no images here, as one with an empty folder: the other
            # samples keep the training split's indices, not their place among this split's folders
            index = [classes.index(c) for c in found]
            self.samples = [(f, index[i]) for f, i in self.samples]
            absent = [c for c in classes if c not in found]
            _logger.info("%s: no folder for %d of the %d classes (no images of them): %s", self.root / split,
                         len(absent), len(classes), absent[:5])

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> Image.Image | Skipped:
        path = self.samples[index][0]
        try:
            return load_rgb(path)
        except Exception as e:  # PIL raises OSError, ValueError, SyntaxError... on bad files
            return Skipped(path, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'unreadable'}")

    def __getitem__(self, index: int) -> tuple[Any, int] | Skipped:
        img = self.load(index)
        if isinstance(img, Skipped):
            return img
        out = transformed(self.transform, img, self.samples[index][0], self._named)
        return out if isinstance(out, Skipped) else (out, self.samples[index][1])


def cached_skips(dataset: Dataset) -> int:
    """Files a cached dataset (``CachedImages``, ``data.cache``) could not decode when it was built:
    they are in no batch, so the loops that count skipped files do not meet them."""
    return len(getattr(dataset, "skipped", ()))


class CachedImages(Dataset):
    """A folder decoded once into one uint8 array ``(N, H, W, 3)``: decoding JPEGs every epoch costs
    more than training a small model on them. Needs every image at the same size (e.g. CIFAR)."""

    def __init__(self, folder: ImageFolder, workers: int = 0) -> None:
        self.classes, self.transform, self.skipped = folder.classes, folder.transform, []
        self._named: set[str] = set()
        loader = torch.utils.data.DataLoader(_Decode(folder), batch_size=256, num_workers=workers,
                                             collate_fn=_as_list)
        arrays, targets, paths = [], [], []
        for chunk in loader:
            for item in chunk:
                if isinstance(item, Skipped):
                    self.skipped.append(item)
                    _logger.warning("skipped unreadable image %s (%s)", item.path, item.reason)
                else:
                    arrays.append(item[0])
                    targets.append(item[1])
                    paths.append(item[2])
        if self.skipped:
            _logger.warning("skipped %d unreadable image(s) of %s", len(self.skipped), folder.root / folder.split)
        if not arrays:
            raise DataError(f"{folder.root / folder.split}: no readable image")
        shapes = {a.shape for a in arrays}
        if len(shapes) != 1:
            raise DataError(f"{folder.root / folder.split}: images have {len(shapes)} different sizes "
                            f"(e.g. {sorted(shapes)[:3]}); caching needs one size (set data.cache=false)")
        self.images = np.stack(arrays)  # (N, H, W, 3) uint8
        self.targets, self.paths = targets, paths

    def __len__(self) -> int:
        return len(self.targets)

    def with_transform(self, transform: Callable | None) -> CachedImages:
        """The same decoded images (not copied) under another transform."""
        other = copy.copy(self)
        other.transform = transform
        return other

    def __getitem__(self, index: int) -> tuple[Any, int] | Skipped:
        out = transformed(self.transform, Image.fromarray(self.images[index]), self.paths[index], self._named)
        return out if isinstance(out, Skipped) else (out, self.targets[index])


def _as_list(items: list[Any]) -> list[Any]:
    return items


class _Decode(Dataset):
    def __init__(self, folder: ImageFolder) -> None:
        self.folder = folder

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int, str] | Skipped:
        img = self.folder.load(index)
        path, target = self.folder.samples[index]
        return img if isinstance(img, Skipped) else (np.asarray(img, dtype=np.uint8), target, path)


def collate_skipping(items: list[Any]) -> Batch:
    """Collate the readable samples; the unreadable ones go to ``Batch.skipped``."""
    skipped = [it for it in items if isinstance(it, Skipped)]
    good = [it for it in items if not isinstance(it, Skipped)]
    if not good:
        return Batch(torch.empty(0), torch.empty(0, dtype=torch.long), skipped)
    images, targets = default_collate(good)
    return Batch(images, targets, skipped)


__all__ = ["Batch", "CachedImages", "ImageFolder", "Skipped", "cached_skips", "collate_skipping", "load_rgb",
           "scan_folder", "to_rgb", "transformed"]
