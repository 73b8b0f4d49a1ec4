"""Semantic-segmentation data in the ADE20K layout, checked before it is scored, and its augmentation.

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
training device (``augment_batch``), so images decoded once into memory keep a GPU busy.
"""
from __future__ import annotations

import collections
import functools
import json
import logging
import math
import re
import sys
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
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


def scaled_size(H: int, W: int, scale: float) -> tuple[int, int]:
    """``(H, W)`` times ``scale``, rounded half up as mmcv's ``rescale_size`` rounds (not Python's
    ``round``, which takes halves to even)."""
    return max(1, int(H * scale + 0.5)), max(1, int(W * scale + 0.5))


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
    th, tw = scaled_size(H, W, scale)
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
    # bilinear without antialiasing, as mmseg resizes (cv2's INTER_LINEAR), also when shrinking
    img = F.interpolate(image[None, :, ys:ye, xs:xe].float(), size=(oh, ow), mode="bilinear",
                        align_corners=False)[0]
    lab = F.interpolate(mask[None, None, ys:ye, xs:xe].float(), size=(oh, ow), mode="nearest")[0, 0].long()
    if flip:
        img, lab = img.flip(-1), lab.flip(-1)
    return img, lab, (oh, ow)


def _rgb_to_hsv(img: Tensor) -> Tensor:
    """``(3, h, w)`` RGB in 0..255 -> hue in degrees (0..360), saturation 0..1, value 0..255."""
    r, g, b = img
    v, _ = img.max(0)
    c = v - img.min(0).values
    safe = torch.where(c > 0, c, torch.ones_like(c))
    h = torch.where(v == r, (g - b) / safe % 6, torch.where(v == g, (b - r) / safe + 2, (r - g) / safe + 4))
    h = torch.where(c > 0, h * 60.0, torch.zeros_like(h))
    s = torch.where(v > 0, c / torch.where(v > 0, v, torch.ones_like(v)), torch.zeros_like(v))
    return torch.stack([h, s, v])


def _hsv_to_rgb(hsv: Tensor) -> Tensor:
    h, s, v = hsv
    k = torch.stack([(5 + h / 60) % 6, (3 + h / 60) % 6, (1 + h / 60) % 6])
    return v - v * s * (torch.minimum(k, 4 - k).clamp(0, 1))


def photometric_distortion(img: Tensor, gen: torch.Generator | None = None) -> Tensor:
    """mmseg's ``PhotoMetricDistortion`` on a float RGB image ``(3, h, w)`` in 0..255, each step
    with probability 1/2, in its order: brightness (+-32), contrast (x 0.5..1.5) either here or
    last, saturation (x 0.5..1.5, in HSV), hue (+-18 of OpenCV's 180 units: +-36 degrees),
    clipped to 0..255 after each. mmseg rounds to uint8 after each step; this keeps floats."""
    def coin() -> bool:
        return float(torch.rand((), generator=gen)) < 0.5

    def uniform(lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=gen))

    def contrast(x: Tensor) -> Tensor:
        return (x * uniform(0.5, 1.5)).clamp(0, 255) if coin() else x

    if coin():
        img = (img + uniform(-32.0, 32.0)).clamp(0, 255)
    contrast_first = coin()
    if contrast_first:
        img = contrast(img)
    if coin():
        hsv = _rgb_to_hsv(img)
        hsv[1] = (hsv[1] * uniform(0.5, 1.5)).clamp(0, 1)
        img = _hsv_to_rgb(hsv)
    if coin():
        hsv = _rgb_to_hsv(img)
        hsv[0] = (hsv[0] + 2.0 * int(torch.randint(-18, 19, (), generator=gen))) % 360
        img = _hsv_to_rgb(hsv)
    if not contrast_first:
        img = contrast(img)
    return img


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
                  cat_max_ratio: float = 1.0, photometric: bool = False) -> tuple[Tensor, Tensor]:
    """Random scale in ``scale_range`` (of the image's own size, or with ``base_size`` of its size
    once fitted to it: ``base_scale``, mmseg's ``RandomResize`` with a ``ratio_range``), crop and
    horizontal flip of each sample, then with ``photometric`` mmseg's colour distortion
    (``photometric_distortion``), on ``device`` (``cat_max_ratio``: see ``scale_crop``); windows
    smaller than the crop are padded (image 0 after normalising, mask ``ignore_index``). Returns
    images ``(B, 3, crop, crop)`` float32 and masks ``(B, crop, crop)`` int64."""
    images = torch.zeros(len(samples), 3, crop, crop, device=device)
    masks = torch.full((len(samples), crop, crop), ignore_index, dtype=torch.long, device=device)
    lo, hi = scale_range
    for b, (image, mask) in enumerate(samples):
        scale = (lo + (hi - lo) * float(torch.rand((), generator=gen))) * base_scale(image.shape[-2:], base_size)
        flip = float(torch.rand((), generator=gen)) < flip_p
        img, lab, (h, w) = scale_crop(image.to(device, non_blocking=True), mask.to(device, non_blocking=True),
                                      crop, scale, flip, gen, cat_max_ratio, ignore_index)
        if photometric:
            img = photometric_distortion(img, gen)
        images[b, :, :h, :w] = normalize(img, mean, std)
        masks[b, :h, :w] = lab
    return images, masks


__all__ = ["SegmentationDataset", "Skipped", "augment_batch", "check_ignore_index", "list_collate", "normalize",
           "photometric_distortion", "read_classes", "read_mask", "scale_crop", "base_scale", "skip_error"]
