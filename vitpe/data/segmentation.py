"""Semantic-segmentation data in the ADE20K layout, checked before it is scored.

``DIR/images/<split>/*.jpg|png`` with ``DIR/annotations/<split>/<stem>.png`` beside them (sub-folders
too, mirrored under ``annotations``, as mmseg lists them; hidden files such as ``.DS_Store`` or
macOS's ``._*`` are passed over), one class index per pixel (``ignore_index``, 255 by default, is
not scored; it must not be a class); ``DIR/classes.json`` (a list of names) is optional (without it,
ADE20K's own ``objectInfo150.txt`` names the classes). A bad pair
stops the run with one message naming the file, or, with ``on_error='skip'``, is dropped, logged and
counted; a wrong mIoU is never computed silently:

- an image without a mask; a mask whose size differs from its image's; two images sharing a mask
  (``a.jpg`` and ``a.png``); a mask with several channels (a colour rendering, not class indices):
  read from the files' headers when the dataset is built, for every pair (``dataset.skipped``);
- an image or mask whose pixels cannot be decoded (a truncated file); a label value that is not a
  class nor ``ignore_index``: found when the pixels are decoded, which is when the dataset is
  built with ``cache``, else when an item is read (``__getitem__`` then returns a ``Skipped``,
  which the training loop and the evaluation turn into the error, or drop, log and count).

Samples are raw ``uint8`` tensors; augmentation (random scale, crop, flip) runs batched on the
training device (``seg_transforms.augment_batch``), so images decoded once into memory keep a GPU busy.
"""
from __future__ import annotations

import collections
import json
import logging
import re
import sys
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from tqdm import tqdm

from ..config import ConfigError
from ..errors import DataError
from .folder import Skipped, load_rgb, walk_files

_logger = logging.getLogger(__name__)
OnError = Literal["error", "skip"]
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
MASK_MODES = ("L", "P", "I", "I;16", "1")  # one channel of class indices
# What PIL raises on a file it cannot read: besides OSError and friends, DecompressionBombError
# (an Exception of its own) for an image over twice Image.MAX_IMAGE_PIXELS, already when it opens
UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def _object_info(path: Path) -> list[str] | None:
    """Class names from ADEChallengeData2016's ``objectInfo150.txt`` (tab-separated ``Idx Ratio Train
    Val Name``, the name's synonyms after commas or semicolons), in ``Idx`` order; None if it is not
    such a table."""
    try:
        rows = [line.split("\t") for line in path.read_text(errors="replace").splitlines()[1:] if line.strip()]
        named = sorted((int(r[0]), re.split(r"[,;]", r[-1])[0].strip()) for r in rows)
    except (ValueError, IndexError, OSError):
        return None
    return [n for _, n in named] if [i for i, _ in named] == list(range(1, len(named) + 1)) else None


def read_classes(root: str | Path, num_classes: int) -> list[str]:
    """Names from ``root/classes.json`` (a list) when present, else from ADE20K's own
    ``objectInfo150.txt`` when it names ``num_classes`` classes, else ``class_0..``;
    ``num_classes`` 0 means "as many as the file lists"; names must differ."""
    if not Path(root).is_dir():
        raise DataError(f"data folder not found: {root}")
    path = Path(root) / "classes.json"
    if not path.is_file():
        info = Path(root) / "objectInfo150.txt"
        names = _object_info(info) if info.is_file() else None
        if names is not None and num_classes in (0, len(names)):
            return _unique(names, info)
        if num_classes <= 0:
            raise DataError(f"{root}: no classes.json, so the number of classes must be given (--num-classes)")
        return [f"class_{i}" for i in range(num_classes)]
    try:
        names = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise DataError(f"{path}: expected a list of class names")
    if not names:
        raise DataError(f"{path} lists no classes: expected a list of class names, one per label value")
    if num_classes > 0 and num_classes != len(names):
        raise DataError(f"{path} lists {len(names)} classes but --num-classes is {num_classes}")
    return _unique(names, path)


def _unique(names: list[str], path: Path) -> list[str]:
    """``names``, or a ``DataError`` naming those given twice: results are reported by class name."""
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        where = "; ".join(f"{n!r} at {[i for i, m in enumerate(names) if m == n]}" for n in twice[:3])
        raise DataError(f"{path}: class names must differ, per-class results are reported by name ({where})")
    return names


def check_ignore_index(num_classes: int, ignore_index: int, reduce_zero_label: bool = False) -> None:
    """``ConfigError`` when ``ignore_index`` is also a class: that class's pixels would be neither
    trained on nor scored, silently (255 with more than 255 classes, e.g. ADE20K-full's 847 in
    16-bit masks; 0 where 0 is a class). With ``reduce_zero_label`` the masks store classes one up
    (1..K), so the stored value ``num_classes`` is a class too."""
    top = num_classes if reduce_zero_label else num_classes - 1
    if not 0 <= ignore_index <= top:
        return
    clash = (f"the stored value of class {ignore_index - 1} under reduce_zero_label (stored 1..{num_classes} are "
             f"classes 0..{num_classes - 1})" if ignore_index == num_classes else
             f"one of the {num_classes} classes (0..{num_classes - 1})")
    raise ConfigError(f"key 'data.ignore_index': {ignore_index} is also {clash}: that class would be neither "
                      f"trained nor scored; set --ignore-index (data.ignore_index) to the value the masks use for "
                      f"unlabelled pixels, outside 0..{top} (e.g. 65535 in 16-bit masks, or -1 if they have none)")


def read_mask(path: Path, num_classes: int, reduce_zero_label: bool = False, ignore_index: int = 255) -> np.ndarray:
    """``(H, W)`` int64 class indices, checked: every value a class or ``ignore_index``, else a
    ``DataError`` naming the file and the values as stored in it. ADE20K's ``reduce_zero_label``
    maps 0 (other) to ignore and shifts the rest down by one (a stored ``ignore_index`` stays)."""
    try:
        with Image.open(path) as im:
            if im.mode not in MASK_MODES:
                raise DataError(f"{path}: mask has mode {im.mode}, expected one channel of class indices "
                                f"(a colour rendering of the labels cannot be read)")
            raw = np.asarray(im, dtype=np.int64)
    except UNREADABLE as e:  # the mask's file is named, not its image's
        raise DataError(f"{path}: unreadable mask ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    top = num_classes if reduce_zero_label else num_classes - 1
    valid = ((raw >= 0) & (raw <= top)) | (raw == ignore_index)
    if not valid.all():
        bad = np.unique(raw[~valid])[:8].tolist()
        classes = (f"0 (other), 1..{top} (classes 0..{top - 1} under reduce_zero_label)" if reduce_zero_label
                   else f"classes 0..{top}")
        hint = ("; masks that store 0 for 'other' and classes from 1 (ADE20K) need data.reduce_zero_label=true "
                "(--reduce-zero-label)" if not reduce_zero_label and bad == [num_classes] else "")
        raise DataError(f"{path}: label values {bad} are not {classes} nor the ignore index {ignore_index}{hint}")
    if reduce_zero_label:
        mask = raw - 1
        mask[(raw == 0) | (raw == ignore_index)] = ignore_index
        return mask
    return raw


def skip_error(skipped: Skipped) -> DataError:
    """The error that stops a run at a bad file (``on_error='error'``)."""
    return DataError(f"{skipped.path}: {skipped.reason} (set data.on_error=skip to drop such files)")


def mask_dtype(num_classes: int, ignore_index: int) -> torch.dtype:
    """The smallest integer dtype that holds every class index and the ignore index (which may be
    negative, e.g. -100, and must not wrap around into a class)."""
    lo, hi = min(0, ignore_index), max(num_classes - 1, ignore_index)
    if lo >= 0 and hi < 256:
        return torch.uint8
    return torch.int16 if -2**15 <= lo and hi < 2**15 else torch.int32


class SegmentationDataset(torch.utils.data.Dataset):
    """Items are ``(image (3, H, W) uint8, mask (H, W) uint8|int16|int32)``, or a ``Skipped`` for a
    pair whose pixels cannot be used.

    What the files' headers tell is checked here for every pair (cheap: no pixel is decoded), and
    a bad pair is a ``DataError`` naming its file, or with ``on_error='skip'`` dropped, logged and
    counted in ``skipped``. ``cache`` decodes and checks every pair here too, once, and keeps them
    in memory. Without it nothing decoded is held: each ``__getitem__`` decodes and checks its pair,
    so building the dataset stays fast and small on a large set (ADE20K's 20k training masks would
    take GBs and minutes to decode up front, in every process under torchrun). A pair found bad
    then is returned as a ``Skipped`` whatever ``on_error`` says, and the caller raises
    ``skip_error`` or skips it (``engine.segmentation.drop_skipped``): ``__getitem__`` may run in a
    loader's worker process, whose errors reach the training process with the file's name buried
    below their first line. ``record_skipped`` adds them to ``skipped`` (a worker's copy of the
    dataset is not this one)."""

    def __init__(self, root: str | Path, split: str, num_classes: int, ignore_index: int = 255,
                 reduce_zero_label: bool = False, on_error: OnError = "error", cache: bool = False) -> None:
        self.root, self.split, self.ignore_index = Path(root), split, ignore_index
        self.classes = read_classes(root, num_classes)
        self.num_classes = len(self.classes)
        check_ignore_index(self.num_classes, ignore_index, reduce_zero_label)
        self.reduce_zero_label, self.on_error = reduce_zero_label, on_error
        self.dtype = mask_dtype(self.num_classes, ignore_index)
        self.skipped: list[Skipped] = []
        pairs = self._pairs()
        self.images: list[Path] = []
        self.mask_paths: list[Path] = []
        sharing = collections.defaultdict(list)
        for image, mask in pairs:
            sharing[mask].append(image)
        for image, mask in pairs:
            others = [i.name for i in sharing[mask] if i != image]
            if others:  # img.jpg and img.png: which one the mask labels is unknown, so neither is used
                self._bad(image, f"its mask {mask} is also the mask of {', '.join(others)}")
                continue
            fault = self._header_fault(image, mask)
            if fault is not None:
                self._bad(*fault)
            else:
                self.images.append(image)
                self.mask_paths.append(mask)
        self._cache: list[tuple[Tensor, Tensor]] | None = None
        if cache:
            self._decode_all()
        if self.skipped:
            _logger.warning("%s: skipped %d of %d image(s) with bad masks or images", self.root / "images" / split,
                            len(self.skipped), len(pairs))
        if not self.images:
            raise DataError(f"{self.root / 'images' / split}: no usable image-mask pairs")

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

    def _bad(self, path: Path | str, reason: str) -> None:
        """A pair found bad while the dataset is built: an error, or dropped, logged and counted."""
        skipped = Skipped(str(path), reason)
        if self.on_error == "error":
            raise skip_error(skipped)
        self.skipped.append(skipped)
        _logger.warning("warning: skipped %s: %s", path, reason)

    def _header_fault(self, image: Path, mask_path: Path) -> tuple[Path, str] | None:
        """What the headers tell: ``(file at fault, why)`` unless the mask exists, has one channel
        and its image's size."""
        if not mask_path.is_file():
            return image, f"no mask {mask_path}"
        sizes = []
        for path in (mask_path, image):
            try:
                with Image.open(path) as im:  # the header only; the pixels are decoded when read
                    if path == mask_path and im.mode not in MASK_MODES:
                        return mask_path, (f"mask has mode {im.mode}, expected one channel of class indices "
                                           f"(a colour rendering of the labels cannot be read)")
                    sizes.append(im.size)
            except UNREADABLE as e:
                reason = str(e).splitlines()[0] if str(e) else type(e).__name__
                return path, f"unreadable mask ({reason})" if path == mask_path else f"unreadable ({reason})"
        (mw, mh), (iw, ih) = sizes
        if (mw, mh) != (iw, ih):
            turned = (mw, mh) == (ih, iw)  # a mask drawn on the image as a viewer shows it
            return mask_path, f"mask is {mw}x{mh} but image {image.name} is {iw}x{ih}" + (
                " (width and height swapped: the mask was likely drawn on the image turned by its EXIF "
                "orientation, which is not applied here to images or masks)" if turned else "")
        return None

    def _decode_all(self) -> None:
        """Fill the cache; pairs whose pixels fail are dropped here, as the header checks' are."""
        kept: list[tuple[Path, Path, tuple[Tensor, Tensor]]] = []
        for i in tqdm(range(len(self.images)), desc=f"decoding {self.split}", leave=False,
                      disable=not sys.stderr.isatty()):
            item = self.load(i)
            if isinstance(item, Skipped):
                self._bad(*item)
            else:
                kept.append((self.images[i], self.mask_paths[i], item))
        self.images = [k[0] for k in kept]
        self.mask_paths = [k[1] for k in kept]
        self._cache = [k[2] for k in kept]

    def decode(self, i: int) -> Tensor:
        """``(3, H, W)`` uint8 RGB; ``DataError`` naming the image when its pixels cannot be decoded."""
        path = self.images[i]
        try:
            return torch.from_numpy(np.asarray(load_rgb(path)).copy()).permute(2, 0, 1).contiguous()
        except UNREADABLE as e:
            reason = str(e).splitlines()[0] if str(e) else "unreadable"
            raise DataError(f"{path}: cannot decode image: {reason}") from None

    def load(self, i: int) -> tuple[Tensor, Tensor] | Skipped:
        """Pair ``i`` decoded from its files and checked (``read_mask``)."""
        mask_path, image_path = self.mask_paths[i], self.images[i]
        try:
            mask = read_mask(mask_path, self.num_classes, self.reduce_zero_label, self.ignore_index)
        except DataError as e:
            return Skipped(str(mask_path), str(e).removeprefix(f"{mask_path}: "))
        try:
            image = self.decode(i)
        except DataError as e:
            return Skipped(str(image_path), str(e).removeprefix(f"{image_path}: "))
        return image, torch.from_numpy(mask).to(self.dtype)

    def record_skipped(self, found: Sequence[Skipped]) -> list[Skipped]:
        """Add pairs found bad when read (``__getitem__``'s ``Skipped``) to ``skipped``, each file
        once; returns those not there before."""
        known, new = {s.path for s in self.skipped}, []
        for s in found:
            if s.path not in known:
                known.add(s.path)
                new.append(s)
        self.skipped += new
        return new

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor] | Skipped:
        return self._cache[i] if self._cache is not None else self.load(i)


def list_collate(items: list) -> list:
    """Keep the samples apart: images differ in size until they are cropped on the device."""
    return items


__all__ = ["SegmentationDataset", "Skipped", "check_ignore_index", "list_collate", "mask_dtype", "read_classes",
           "read_mask", "skip_error"]
