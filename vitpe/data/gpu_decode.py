"""Training images decoded and augmented on the training device, a whole batch at a time.

PIL decoding and timm's transform in DataLoader workers feed ViT-S on one GPU at about an eighth
of its training speed. With ``data.decode=gpu`` the workers only read files: ``EncodedFolder``
returns a JPEG's bytes, ``collate_encoded`` packs a batch's files end to end into one tensor (one
shared-memory transfer per batch instead of one per file), and ``DeviceDecodeLoader`` decodes the
batch with ``torchvision.io.decode_jpeg(list, device=...)`` (nvjpeg on CUDA), draws a random
resized crop and flip per image, resizes and normalises, in a background thread on its own CUDA
stream, one batch ahead of the training step. Files the device decoder should not see (PNG, grey
or CMYK JPEG, 12-bit or arithmetic-coded JPEG) are decoded with PIL in the worker, exactly as
the CPU path does; unreadable files are ``Skipped`` like there. On CPU the same code runs with
``decode_jpeg`` on CPU.
"""
from __future__ import annotations

import contextlib
import math
import queue
import threading
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.functional import pil_to_tensor

from ..errors import UserError
from .folder import Batch, ImageFolder, Skipped

_HUFFMAN_FRAMES = (0xC0, 0xC1, 0xC2)  # baseline, extended, progressive: what nvjpeg decodes
_STANDALONE = {0x01, 0xD8, *range(0xD0, 0xD8)}  # markers without a length field


def device_decodable(data: bytes) -> bool:
    """True for an 8-bit, 3-component, Huffman-coded JPEG (read from its frame header) that ends
    with its end-of-image marker; grey, CMYK, 12-bit and arithmetic-coded JPEGs, other formats and
    files that do not end as a JPEG does go to PIL instead. nvjpeg may decode a truncated file
    into a partly grey image without an error, where PIL refuses it: a file cut short, or one with
    bytes after its end marker, is PIL's to decode or to refuse, exactly as on the CPU path."""
    if not data.startswith(b"\xff\xd8\xff") or not data.rstrip(b"\x00").endswith(b"\xff\xd9"):
        return False
    i = 2
    while i + 10 <= len(data):
        if data[i] != 0xFF:
            return False
        marker = data[i + 1]
        if marker == 0xFF or marker in _STANDALONE:  # fill byte or marker without payload
            i += 1 if marker == 0xFF else 2
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # a frame header (SOFn)
            return marker in _HUFFMAN_FRAMES and data[i + 4] == 8 and data[i + 9] == 3
        if marker == 0xDA:  # scan data before any frame header: malformed
            return False
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return False


class EncodedFolder(ImageFolder):
    """``root/split/<class>/*``; items are ``(data, class, path)`` where ``data`` is the file's
    bytes ``(N,)`` uint8 when the device can decode it, else the PIL-decoded image ``(3, H, W)``
    uint8; ``Skipped`` for an unreadable file."""

    def __getitem__(self, index: int) -> tuple[Tensor, int, str] | Skipped:
        path, target = self.samples[index]
        try:
            data = Path(path).read_bytes()
        except OSError:
            data = b""  # let load() name the error
        if device_decodable(data):
            return torch.frombuffer(bytearray(data), dtype=torch.uint8), target, path
        img = self.load(index)
        return img if isinstance(img, Skipped) else (pil_to_tensor(img), target, path)


class EncodedBatch(NamedTuple):
    data: Tensor  # (sum of lengths,) uint8: the batch's JPEG files end to end
    lengths: list[int]  # bytes of each file in ``data``
    paths: list[str]  # their paths (to name a file the device fails to decode)
    decoded: list[Tensor]  # (3, H, W) uint8 images the workers decoded
    targets: Tensor  # (B,) int64: the files of ``data`` first, then those of ``decoded``
    skipped: list[Skipped]


def collate_encoded(items: list[Any]) -> EncodedBatch:
    """Pack the readable items of a batch; the unreadable ones go to ``skipped``."""
    skipped = [it for it in items if isinstance(it, Skipped)]
    encoded = [it for it in items if not isinstance(it, Skipped) and it[0].dim() == 1]
    decoded = [it for it in items if not isinstance(it, Skipped) and it[0].dim() == 3]
    data = torch.cat([it[0] for it in encoded]) if encoded else torch.empty(0, dtype=torch.uint8)
    targets = torch.tensor([it[1] for it in encoded + decoded], dtype=torch.long)
    return EncodedBatch(data, [len(it[0]) for it in encoded], [it[2] for it in encoded], [it[0] for it in decoded],
                        targets, skipped)


def decode_batch(batch: EncodedBatch, device: torch.device) -> tuple[list[Tensor], Tensor, list[Skipped]]:
    """``(3, H, W)`` uint8 images on ``device``, their targets and the files that failed. One batched
    call; when it fails (a corrupt file), each file is decoded alone to find which."""
    chunks = list(batch.data.split(batch.lengths)) if batch.lengths else []
    keep, skipped = list(range(len(chunks))), []
    try:
        images = decode_jpeg(chunks, mode=ImageReadMode.RGB, device=device) if chunks else []
    except RuntimeError:
        images, keep = [], []
        for k, chunk in enumerate(chunks):
            try:
                images.append(decode_jpeg(chunk, mode=ImageReadMode.RGB, device=device))
                keep.append(k)
            except RuntimeError as e:
                skipped.append(Skipped(batch.paths[k], f"RuntimeError: {str(e).splitlines()[0]}"))
    images += [img.to(device, non_blocking=True) for img in batch.decoded]
    keep += range(len(chunks), len(chunks) + len(batch.decoded))
    return images, batch.targets[keep], skipped


def sample_boxes(hw: Tensor, scale: tuple[float, float], ratio: tuple[float, float],
                 generator: torch.Generator | None = None, attempts: int = 10) -> Tensor:
    """Crop boxes ``(B, 4)`` int64 ``(top, left, height, width)`` for images of sizes ``hw`` ``(B, 2)``,
    drawn as torchvision's ``RandomResizedCrop.get_params`` draws them (area fraction in ``scale``,
    log-uniform aspect in ``ratio``, first of ``attempts`` that fits, else a centre crop with the
    aspect clamped into ``ratio``), for the whole batch at once."""
    h_img, w_img = hw[:, :1].double(), hw[:, 1:].double()  # (B, 1)
    shape = (len(hw), attempts)
    area = h_img * w_img * torch.empty(shape, dtype=torch.float64).uniform_(*scale, generator=generator)
    aspect = torch.exp(torch.empty(shape, dtype=torch.float64).uniform_(
        math.log(ratio[0]), math.log(ratio[1]), generator=generator))
    w, h = torch.sqrt(area * aspect).round(), torch.sqrt(area / aspect).round()  # (B, attempts)
    fits = (w > 0) & (h > 0) & (w <= w_img) & (h <= h_img)
    first = fits.to(torch.uint8).argmax(1, keepdim=True)  # index of the first fitting attempt
    w, h = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0]
    h_img, w_img = h_img[:, 0], w_img[:, 0]
    in_ratio = w_img / h_img  # fallback: the whole image, narrowed to the nearest allowed aspect
    fw = torch.where(in_ratio > ratio[1], (h_img * ratio[1]).round(), w_img)
    fh = torch.where(in_ratio < ratio[0], (w_img / ratio[0]).round(), h_img)
    found = fits.any(1)
    w, h = torch.where(found, w, fw), torch.where(found, h, fh)
    u = torch.rand((len(hw), 2), dtype=torch.float64, generator=generator)
    top = torch.where(found, (u[:, 0] * (h_img - h + 1)).floor(), ((h_img - h) / 2).floor())
    left = torch.where(found, (u[:, 1] * (w_img - w + 1)).floor(), ((w_img - w) / 2).floor())
    return torch.stack([top, left, h, w], 1).long()


# aug.interpolation -> F.interpolate's mode; nearest as PIL picks it (pixel centres), without antialiasing
DEVICE_MODES = {"bicubic": "bicubic", "bilinear": "bilinear", "nearest": "nearest-exact"}


def resized_crops(images: list[Tensor], boxes: Tensor, flips: Tensor, size: int,
                  interpolation: str = "bicubic") -> Tensor:
    """Crop ``boxes`` (B, 4) ``(top, left, height, width)`` out of ``images`` (each ``(3, H, W)``,
    sizes differ), resize each to ``size`` x ``size`` (antialiased, as PIL does when shrinking) and
    mirror those where ``flips`` (B,) is true. Returns ``(B, 3, size, size)`` float in [0, 255]."""
    if interpolation not in DEVICE_MODES:
        raise UserError(f"aug.interpolation={interpolation!r}: data.decode=gpu resizes with {sorted(DEVICE_MODES)} "
                        f"only (set data.decode=cpu)")
    mode, smooth = DEVICE_MODES[interpolation], interpolation != "nearest"
    out = []
    for img, (top, left, h, w) in zip(images, boxes.tolist()):
        crop = img[None, :, top:top + h, left:left + w].float()
        kw = {"align_corners": False, "antialias": True} if smooth else {}
        out.append(F.interpolate(crop, size=(size, size), mode=mode, **kw))
    x = torch.cat(out).clamp_(0, 255)  # bicubic overshoots
    flips = flips.to(x.device)
    return torch.where(flips[:, None, None, None], x.flip(-1), x)


class DeviceAugment:
    """Decode, random-resized crop, flip and normalise an ``EncodedBatch`` on ``device``."""

    def __init__(self, img_size: int, aug: Any, mean: tuple, std: tuple, device: torch.device) -> None:
        check_aug(aug)
        self.img_size, self.aug, self.device = img_size, aug, device
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255
        self.inv_std = 1 / (torch.tensor(std, device=device).view(1, 3, 1, 1) * 255)

    def __call__(self, batch: EncodedBatch, generator: torch.Generator) -> Batch:
        images, targets, failed = decode_batch(batch, self.device)
        skipped = batch.skipped + failed
        if not images:
            return Batch(torch.empty(0, device=self.device), targets.to(self.device), skipped)
        hw = torch.tensor([img.shape[-2:] for img in images])
        boxes = sample_boxes(hw, tuple(self.aug.scale), tuple(self.aug.ratio), generator)
        flips = torch.rand(len(images), generator=generator) < self.aug.hflip
        x = resized_crops(images, boxes, flips, self.img_size, self.aug.interpolation)
        x = ((x - self.mean) * self.inv_std).contiguous(memory_format=torch.channels_last)
        return Batch(x, targets.to(self.device, non_blocking=True), skipped)


def check_aug(aug: Any) -> None:
    """The device path does crop, flip and normalisation only: refuse settings it would ignore."""
    unsupported = {k: v for k, v in (("aug.color_jitter", aug.color_jitter), ("aug.auto_augment", aug.auto_augment),
                                     ("aug.re_prob", aug.re_prob)) if v}
    if unsupported:
        raise UserError(f"data.decode=gpu does random-resized crop and flip only; {unsupported} need "
                        f"data.decode=cpu (or set them to 0/null)")
    if aug.interpolation not in DEVICE_MODES:
        raise UserError(f"aug.interpolation={aug.interpolation!r}: data.decode=gpu resizes with "
                        f"{sorted(DEVICE_MODES)} only (set data.decode=cpu)")


class DeviceDecodeLoader:
    """Wraps a ``DataLoader`` of ``EncodedBatch`` (``collate_encoded``) and yields ``Batch`` on the
    device, prepared ``prefetch`` batches ahead in a background thread (on a side CUDA stream) so
    that decoding overlaps the training step. Has the loader's ``sampler`` and length."""

    def __init__(self, loader: DataLoader, augment: DeviceAugment, prefetch: int = 2) -> None:
        self.loader, self.augment, self.prefetch = loader, augment, prefetch
        self.sampler, self.dataset = loader.sampler, loader.dataset

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Batch]:
        seed = int(torch.randint(2**62, ()))  # from the global RNG, which seed_epoch sets: reproducible
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        thread = threading.Thread(target=self._fill, args=(q, stop, seed), daemon=True)
        thread.start()
        try:
            while (item := q.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                batch, event = item
                if event is not None:  # made on the side stream: order it before this stream's use
                    stream = torch.cuda.current_stream(self.augment.device)
                    stream.wait_event(event)
                    for t in (batch.images, batch.targets):
                        t.record_stream(stream)
                yield batch
        finally:
            stop.set()
            thread.join()

    def _fill(self, q: queue.Queue, stop: threading.Event, seed: int) -> None:
        try:  # everything inside: a thread that dies silently would leave the consumer waiting forever
            device = self.augment.device
            generator = torch.Generator().manual_seed(seed)
            stream = torch.cuda.Stream(device) if device.type == "cuda" else None
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                for encoded in self.loader:
                    batch = self.augment(encoded, generator)
                    event = stream.record_event() if stream is not None else None
                    if not _put(q, (batch, event), stop):
                        return
            _put(q, None, stop)
        except BaseException as e:  # handed to the consumer, which raises it in the training loop
            _put(q, e, stop)


def _put(q: queue.Queue, item: Any, stop: threading.Event) -> bool:
    """Put unless the consumer has stopped (it may have left the loop early); False then."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            pass
    return False


__all__ = ["DeviceAugment", "DeviceDecodeLoader", "EncodedBatch", "EncodedFolder", "collate_encoded",
           "decode_batch", "device_decodable", "resized_crops", "sample_boxes"]
