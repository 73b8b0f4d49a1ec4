"""Semantic segmentation: the config, the model, one epoch of training, and evaluation (whole image
and sliding window, at several scales and their fusion), with the figure of predictions."""
from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from timm.data import IMAGENET_DEFAULT_MEAN as IMAGENET_MEAN
from timm.data import IMAGENET_DEFAULT_STD as IMAGENET_STD
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ..config import ConfigError, DataConfig, ModelConfig, OptimConfig, RunConfig, model_build_errors
from ..data.folder import warn_skipped
from ..data.seg_transforms import augment_batch, base_scale, normalize
from ..data.segmentation import SegmentationDataset, Skipped, list_collate, skip_error
from ..errors import UserError
from ..models.segmentor import Segmentor, build_segmentor
from . import distributed as dist
from .checkpoint import load_checkpoint
from .loop import LossMeter, ShardSampler, autocast, optimizer_step, pass_step, progress
from .optim import adamw, lr_scale, param_groups
from .seg_metrics import confusion_matrix, metrics_from_confusion, predict

_logger = logging.getLogger(__name__)


@dataclass
class SegDataConfig(DataConfig):
    path: str = ""  # ADE20K-layout folder: images/<split>/*.jpg|png, annotations/<split>/*.png, classes.json
    train_split: str = "training"
    val_split: str = "validation"
    crop_size: int = 512  # square training crop (SegFormer: 512 on ADE20K, 1024 on Cityscapes)
    scale_range: tuple[float, float] = (0.5, 2.0)  # random rescale of the original image before cropping
    # mmseg's img_scale: each image first fitted to (longer side, shorter side) keeping its aspect
    # ratio, in training before the random rescale and in evaluation before the scales (SegFormer on
    # ADE20K: [2048, 512]); None: the images' own sizes
    base_size: tuple[int, int] | None = None
    # mmseg's RandomCrop cat_max_ratio: crops redrawn (up to 10 times) while one class covers this
    # share of their labelled pixels or more (SegFormer on ADE20K: 0.75); 1.0: no redraw
    cat_max_ratio: float = 1.0
    flip: float = 0.5  # probability of a horizontal flip
    photometric: bool = False  # mmseg's PhotoMetricDistortion after the crop (SegFormer's recipes use it)
    num_classes: int = 0  # 0: as many as classes.json lists
    ignore_index: int = 255  # label value that is never scored nor trained on
    reduce_zero_label: bool = False  # ADE20K: label 0 ("other") -> ignore, the rest shift down by one
    # bad pairs (mask missing, of another size or with values that are no class; an image or mask
    # that cannot be decoded): stop naming the file, or drop, log and count them
    on_error: Literal["error", "skip"] = "error"
    # decode (and check) every pair once into memory (fine for CamVid; ADE20K needs ~20 GB); else each
    # pair is decoded and its mask checked when read, and nothing decoded is held
    cache: bool = True
    batch_size: int = 16  # global batch (split over processes under torchrun)
    workers: int = 0  # loader processes; cached data needs none (augmentation runs on the device)


    def __post_init__(self) -> None:
        if self.img_size != DataConfig.img_size:  # inherited, and not what sizes a segmentation crop
            raise ConfigError(f"key 'data.img_size': segmentation trains on crops of data.crop_size (--img-size and "
                              f"--crop-size set it); set data.crop_size={self.img_size} instead")
        if self.base_size is not None and min(self.base_size) <= 0:
            raise ConfigError(f"key 'data.base_size': expected two positive sizes, got {list(self.base_size)}")
        if not 0.0 < self.cat_max_ratio <= 1.0:
            raise ConfigError(f"key 'data.cat_max_ratio': expected a fraction in (0, 1], got {self.cat_max_ratio}")


@dataclass
class SegModelConfig(ModelConfig):
    name: str = "vitpe_mit_b0"  # vitpe_mit_b0..b5 (All-MLP head) or vitpe_vit_* (simple head)
    pos: str = "mixffn"  # SegFormer's Mix-FFN by default
    head_dim: int | None = None  # All-MLP decoder width; None: SegFormer's, 256 for B0/B1 and 768 for B2..B5
    # (256 for a ViT's simple head)
    head_dropout: float = 0.1
    backbone_weights: str | None = None  # local file of backbone weights (e.g. SegFormer's mit_b0.pth)


@dataclass
class SegOptimConfig(OptimConfig):
    lr: float = 6e-5  # SegFormer's fine-tuning rate
    weight_decay: float = 0.01
    schedule: Literal["cosine", "poly", "constant", "step"] = "poly"  # SegFormer: polynomial decay, power 1
    min_lr_ratio: float = 0.0
    head_lr_mult: float = 10.0  # the randomly initialised decoder learns faster (SegFormer: x10)
    clip_grad: float | None = None


@dataclass
class SegEvalConfig:
    interval: int = 1  # epochs between validations (whole image at scale 1) during training
    # final evaluation scales, and the fusion of exactly these if several ('ms'); scale 1.0 is scored alone too
    scales: list[float] = field(default_factory=lambda: [1.0])
    modes: list[Literal["whole", "slide"]] = field(default_factory=lambda: ["whole", "slide"])  # inference modes
    slide_crop: int | None = None  # sliding-window size (None: the training crop)
    slide_stride: int | None = None  # sliding-window step, at most the window (None: 2/3 of the window)
    figure_images: int = 4  # validation images in the figure

    def __post_init__(self) -> None:
        for key, default in (("scales", [1.0]), ("modes", ["whole", "slide"])):
            if not getattr(self, key):
                raise ConfigError(f"key 'eval.{key}': empty; the final evaluation needs at least one "
                                  f"(default {default})")


@dataclass
class SegConfig:
    data: SegDataConfig = field(default_factory=SegDataConfig)  # what to train on
    model: SegModelConfig = field(default_factory=SegModelConfig)  # backbone, strategy, head
    optim: SegOptimConfig = field(default_factory=SegOptimConfig)  # AdamW, poly schedule
    run: RunConfig = field(default_factory=RunConfig)  # epochs, output, device, seed, resume
    eval: SegEvalConfig = field(default_factory=SegEvalConfig)  # validation and final evaluation


def slide_settings(cfg: SegConfig) -> tuple[int, int]:
    """The sliding window's ``(crop, stride)``, checked before any training: a stride larger than
    the window would leave pixels between windows without a prediction."""
    crop = cfg.eval.slide_crop or cfg.data.crop_size
    stride = cfg.eval.slide_stride or max(1, crop * 2 // 3)
    if crop <= 0 or stride <= 0:
        raise ConfigError(f"keys 'eval.slide_crop' and 'eval.slide_stride': expected positive sizes, got window "
                          f"{crop} and stride {stride}")
    if stride > crop:
        raise ConfigError(f"key 'eval.slide_stride': the stride {stride} is larger than the window {crop} "
                          f"(eval.slide_crop, by default data.crop_size), which would leave pixels between windows "
                          f"unpredicted; set eval.slide_stride to at most {crop}")
    return crop, stride


def build_datasets(cfg: SegDataConfig) -> tuple[SegmentationDataset, SegmentationDataset]:
    kw = dict(num_classes=cfg.num_classes, ignore_index=cfg.ignore_index, reduce_zero_label=cfg.reduce_zero_label,
              on_error=cfg.on_error, cache=cfg.cache)
    return SegmentationDataset(cfg.path, cfg.train_split, **kw), SegmentationDataset(cfg.path, cfg.val_split, **kw)


def head_width(cfg: SegModelConfig) -> int:
    """``model.head_dim``, or where unset SegFormer's: 768 for MiT-B2..B5, else 256."""
    if cfg.head_dim is not None:
        return cfg.head_dim
    return 768 if re.fullmatch(r"vitpe_mit_b[2-5]", cfg.name) else 256


def build_model(cfg: SegModelConfig, num_classes: int, crop_size: int) -> Segmentor:
    """The segmentor; ``backbone_weights`` (any layout ``checkpoint_filter_fn`` reads) are loaded strictly."""
    with model_build_errors(cfg, lambda: " (use vitpe_mit_b0..b5 or a vitpe_vit_* model)"):
        model = build_segmentor(cfg.name, num_classes, cfg.pos, cfg.pos_kwargs, crop_size, head_width(cfg),
                                cfg.head_dropout, **cfg.kwargs)
    if cfg.backbone_weights:
        load_backbone(model.backbone, cfg.backbone_weights)
    if cfg.grad_checkpointing:
        model.backbone.set_grad_checkpointing(True)
    return model


def load_backbone(backbone: nn.Module, path: str) -> None:
    import importlib

    filter_fn = getattr(importlib.import_module(type(backbone).__module__), "checkpoint_filter_fn")
    try:
        state = filter_fn(load_checkpoint(path), backbone)
        state = {k: v for k, v in state.items() if not k.startswith("head.")}  # the classifier is not used
        missing, unexpected = backbone.load_state_dict(state, strict=False)
    except (KeyError, ValueError, RuntimeError) as e:
        # torch's state-dict errors say what is wrong on their second and later lines: one line here
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        detail = "; ".join(lines[1:3] if len(lines) > 1 and lines[0].endswith(":") else lines[:1])
        raise UserError(f"{path}: cannot load into {type(backbone).__name__}: {detail[:400]}") from None
    missing = [k for k in missing if not k.startswith("head.")]
    if missing or unexpected:
        raise UserError(f"{path}: {len(missing)} missing keys (e.g. {missing[:3]}), {len(unexpected)} unexpected "
                        f"(e.g. {unexpected[:3]})")


def build_optimizer(model: Segmentor, cfg: SegOptimConfig, batch_size: int | None = None) -> torch.optim.AdamW:
    """AdamW; the decode head's groups get ``lr * head_lr_mult`` (all scaled as ``lr_scale`` says).
    Norms and biases are undecayed throughout (``param_groups``), where SegFormer's mmseg config
    decays the biases and the decode head's batch norms (its ``bn``: only names holding ``norm``
    or ``pos_block`` are undecayed there)."""
    skip = model.no_weight_decay()
    groups = param_groups(model.backbone, cfg.weight_decay, {s.removeprefix("backbone.") for s in skip})
    for g in param_groups(model.decode_head, cfg.weight_decay):
        groups.append(dict(g, lr=cfg.lr * cfg.head_lr_mult))
    groups = [g for g in groups if g["params"]]
    return adamw(groups, cfg.lr, cfg.betas, lr_scale(cfg, batch_size))


def compile_model(model: nn.Module, backend: str = "inductor", mode: str = "default") -> nn.Module:
    """``torch.compile`` for training, with static shapes: every step sees one crop size and a full
    batch (the loader drops the last), so symbolic sizes buy nothing; and with height and width
    both symbolic (``dynamic=True``) Inductor fails on the MiT's channels-last maps, unable to order
    strides such as ``C*ceil(H/4)*ceil(W/4)`` against ``C``. A changed shape compiles once more.
    Static shapes also suit ``mode="reduce-overhead"`` (CUDA graphs): one graph serves every step."""
    return torch.compile(model, dynamic=False, backend=backend, mode=None if mode == "default" else mode)


def pixel_loss(logits: Tensor, target: Tensor, ignore_index: int) -> Tensor:
    """Mean cross-entropy over the labelled pixels; 0 (not NaN) for a batch with none, which
    random crops of sparsely labelled images can produce. (mmseg's ``CrossEntropyLoss`` divides by
    every pixel, ignored ones included, unless given ``avg_non_ignore=True``, which is this.)"""
    # the softmax reads bf16 logits and writes float32 itself (and its backward hands bf16 back):
    # cross_entropy(logits.float()) would first copy the full-size logits to float32, both ways
    logp = F.log_softmax(logits, dim=1, dtype=torch.float32)
    loss = F.nll_loss(logp, target.long(), ignore_index=ignore_index, reduction="sum")
    return loss / (target != ignore_index).sum().clamp(min=1)


def drop_skipped(items: list, on_error: str, found: list[Skipped], seen: set[str]) -> list:
    """The readable samples of ``items``. A ``Skipped`` one is the error naming its file
    (``on_error='error'``), or goes to ``found``, with a warning the first time a file is met
    (``seen``)."""
    samples = []
    for item in items:
        if not isinstance(item, Skipped):
            samples.append(item)
            continue
        if on_error == "error":
            raise skip_error(item)
        found.append(item)
        warn_skipped([item], seen, _logger)
    return samples


def record_skips(dataset: SegmentationDataset, found: list[Skipped], what: str) -> int:
    """Gather the pairs every process skipped when reading, record them in ``dataset.skipped``
    (results.json lists them) and log their number; returns it."""
    every = [s for part in dist.gather_objects(found) for s in part]
    dataset.record_skipped(every)
    if every and dist.is_main():
        _logger.warning("%s: skipped %d unreadable image(s) or mask(s)", what, len(every))
    return len(every)


def train_one_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer, scheduler: Any,
                    device: torch.device, epoch: int, cfg: SegConfig) -> dict[str, float]:
    """One pass; returns ``train_loss`` (mean of the batch losses over processes), ``lr``, ``skipped``
    (samples that could not be read, summed over processes; under ``data.on_error=skip``) and ``time``."""
    model.train()
    start, d, found, seen = time.time(), cfg.data, [], set()
    meter = LossMeter(("loss",), device, epoch)  # sums on the device: no wait for the device every step
    bar = progress(loader, f"epoch {epoch + 1}/{cfg.run.epochs}")
    for step, items in enumerate(bar):
        samples = drop_skipped(items, d.on_error, found, seen)
        # every process skips a step together, or the others would wait forever in the gradient
        # all-reduce; with on_error=error nothing is ever skipped, and no vote is needed
        if d.on_error == "skip" and dist.any_process(not samples):
            pass_step(scheduler)
            continue
        x, y = augment_batch(samples, d.crop_size, d.scale_range, d.flip, IMAGENET_MEAN, IMAGENET_STD,
                             d.ignore_index, device, base_size=d.base_size, cat_max_ratio=d.cat_max_ratio,
                             photometric=d.photometric)
        with autocast(device, cfg.run.amp):
            logits = model(x)
        loss = pixel_loss(logits, y, d.ignore_index)
        meter.update(step, loss, weight=len(x))
        optimizer_step(loss, model, optimizer, scheduler, cfg.optim.clip_grad)
        if step % cfg.run.log_interval == 0:  # the only read on the host: the non-finite check, the bar
            bar.set_postfix(loss=f"{meter.means()['loss']:.4f}")
    totals = dist.reduce_sums(meter.sums(), device)  # raises on a non-finite loss
    skipped = record_skips(loader.dataset, found, f"epoch {epoch + 1}")
    return {"train_loss": totals["loss"] / max(totals["n"], 1), "lr": optimizer.param_groups[0]["lr"],
            "skipped": skipped, "time": time.time() - start}


def _shard(dataset: SegmentationDataset) -> DataLoader:
    """This process's images, every ``world``-th one and no padding: no image is scored twice."""
    sampler = ShardSampler(len(dataset), dist.rank(), dist.world_size())
    return DataLoader(dataset, batch_size=1, sampler=sampler, collate_fn=list_collate)


@torch.no_grad()
def evaluate(model: nn.Module, dataset: SegmentationDataset, device: torch.device, amp: bool = True,
             modes: tuple[str, ...] = ("whole",), scales: tuple[float, ...] = (1.0,), crop: int = 512,
             stride: int | None = None, desc: str = "eval", base_size: tuple[int, int] | None = None,
             fuse: tuple[float, ...] | None = None) -> dict[str, dict[str, Tensor]]:
    """Confusion matrices ``{mode: {scale or 'ms': (K, K)}}`` summed over processes; ``'ms'`` fuses
    the softmax outputs of the scales ``fuse`` (default: all of ``scales``; each must be one of
    them) when there are several, as mmseg's multi-scale test fuses exactly the scales it is
    given. Scales are of each image's own size, or with ``base_size`` of its size fitted to that
    (``base_scale``, mmseg's test resize); either way the logits are resized back to the label's
    size and scored there. Pairs that cannot be read (``data.on_error=skip``) are left out, logged
    and recorded in ``dataset.skipped``."""
    model.eval()
    K, stride = dataset.num_classes, stride or max(1, crop * 2 // 3)
    fuse = tuple(scales) if fuse is None else tuple(fuse)
    if not set(fuse) <= set(scales):
        raise ValueError(f"scales to fuse {list(fuse)} are not all among the scales evaluated {list(scales)}")
    keys = [str(s) for s in scales] + (["ms"] if len(fuse) > 1 else [])
    conf = {m: {k: torch.zeros(K, K, dtype=torch.long, device=device) for k in keys} for m in modes}
    found: list[Skipped] = []
    seen: set[str] = set()
    for items in progress(_shard(dataset), desc):
        samples = drop_skipped(items, dataset.on_error, found, seen)
        if not samples:
            continue
        [(image, mask)] = samples
        x = normalize(image.to(device), IMAGENET_MEAN, IMAGENET_STD)[None]
        target = mask.to(device).long()
        base = base_scale(x.shape[-2:], base_size)
        for mode in modes:
            fused = 0
            for s in scales:
                with autocast(device, amp):
                    logits = predict(model, x, mode, s * base, crop, stride)
                conf[mode][str(s)] += confusion_matrix(logits[0].argmax(0), target, K, dataset.ignore_index)
                if s in fuse:
                    fused = fused + logits.softmax(1)
            if "ms" in keys:
                conf[mode]["ms"] += confusion_matrix(fused[0].argmax(0), target, K, dataset.ignore_index)
    record_skips(dataset, found, desc)
    return {m: {k: dist.all_reduce_sum(c).cpu() for k, c in per.items()} for m, per in conf.items()}


def summarize(conf: dict[str, dict[str, Tensor]], classes: list[str]) -> dict[str, Any]:
    """results.json's body: the headline (whole image at scale 1, else the first) with per-class IoU
    and accuracy, and ``scales``: ``{mode: {scale: {mIoU, mAcc, aAcc}}}``."""
    mode = "whole" if "whole" in conf else next(iter(conf))
    key = "1.0" if "1.0" in conf[mode] else next(iter(conf[mode]))
    head = metrics_from_confusion(conf[mode][key], classes)
    scales = {m: {k: {n: v for n, v in metrics_from_confusion(c, classes).items() if n != "per_class"}
                  for k, c in per.items()} for m, per in conf.items()}
    return {"mIoU": head["mIoU"], "aAcc": head["aAcc"], "mAcc": head["mAcc"], "per_class": head["per_class"],
            "headline": {"mode": mode, "scale": key}, "scales": scales}


def results_table(scales: dict[str, dict[str, dict[str, float]]]) -> str:
    """Markdown: one row per mode and scale."""
    rows = ["| mode | scale | mIoU | mAcc | aAcc |", "|---|---|---|---|---|"]
    for mode, per in scales.items():
        for key, m in per.items():
            rows.append(f"| {mode} | {key} | {m['mIoU']:.2f} | {m['mAcc']:.2f} | {m['aAcc']:.2f} |")
    return "\n".join(rows)


@torch.no_grad()
def figure_samples(model: nn.Module, dataset: SegmentationDataset, count: int, device: torch.device,
                   amp: bool = True, base_size: tuple[int, int] | None = None) -> list[tuple[Tensor, Tensor, Tensor]]:
    """``(image uint8 (3, H, W), label (H, W), prediction (H, W))`` for ``count`` images spread over
    the set (neighbouring frames of a video look alike); one that cannot be read is left out."""
    model.eval()
    out = []
    for i in sorted({round(j * len(dataset) / max(count, 1)) for j in range(min(count, len(dataset)))}):
        item = dataset[i]
        if isinstance(item, Skipped):
            continue
        image, mask = item
        with autocast(device, amp):
            logits = predict(model, normalize(image.to(device), IMAGENET_MEAN, IMAGENET_STD)[None],
                             scale=base_scale(image.shape[-2:], base_size))
        out.append((image, mask.long(), logits[0].argmax(0).cpu()))
    return out


__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "SegConfig", "SegDataConfig", "SegEvalConfig", "SegModelConfig",
           "SegOptimConfig", "build_datasets", "build_model", "build_optimizer", "compile_model", "drop_skipped",
           "evaluate", "figure_samples", "record_skips", "results_table", "slide_settings", "summarize",
           "train_one_epoch"]
