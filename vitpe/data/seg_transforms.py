"""Segmentation's augmentation and normalisation, run batched on the training device: random scale,
crop (redrawn where one class would fill it, mmseg's ``cat_max_ratio``), flip and photometric
distortion on the raw ``uint8`` samples of ``segmentation.SegmentationDataset``, so that images
decoded once into memory keep a GPU busy; and the test-time sizes (``scaled_size``, ``base_scale``).
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


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


__all__ = ["augment_batch", "base_scale", "normalize", "photometric_distortion", "scale_crop", "scaled_size"]
