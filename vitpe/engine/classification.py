"""Classification: the config, the model, the loss, and one epoch of training or evaluation."""
from __future__ import annotations

import difflib
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import timm
import torch
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..config import EvalConfig, ModelConfig, OptimConfig, RunConfig, model_build_errors
from ..data.classification import AugConfig, ClsDataConfig, is_synthetic
from ..data.folder import Batch, collate_skipping, warn_skipped
from ..data.gpu_decode import DeviceAugment, DeviceDecodeLoader, collate_encoded
from ..errors import DataError, UserError
from . import distributed as dist
from .loop import LossMeter, autocast, make_loader, optimizer_step, pass_step, progress

_logger = logging.getLogger(__name__)


@dataclass
class EmaConfig:
    enabled: bool = False  # keep an exponential moving average of the weights (evaluated instead of the raw ones)
    decay: float = 0.999  # per-step decay; ~1/(1-decay) steps of memory, so short runs want a lower value
    warmup: bool = False  # the decay grows from 0 with the step (timm's --model-ema-warmup: 1 - (1 + step)^-2/3,
    # capped at ``decay``), so the average is not held back by the random initial weights


def _default_model() -> ModelConfig:
    # A 4-block, 64-wide ViT: learns the synthetic task (~98% top-1) in 5 CPU epochs of about 6 s each.
    return ModelConfig(name="vitpe_vit_tiny_patch4_32", pos="rope_mixed",
                       kwargs={"depth": 4, "embed_dim": 64, "num_heads": 2})


def default_kwargs_warning(cfg: ModelConfig) -> str | None:
    """A warning when ``model.kwargs`` are still the default run's sizes but ``model.name`` names
    another model: they apply to it too, and shrink it (``--model vitpe_vit_small_patch16_224``
    alone builds a 4-block, 64-wide ViT, not ViT-S) or are refused by it (a ResNet takes no
    ``depth``). None otherwise."""
    default = _default_model()
    if cfg.name == default.name or cfg.kwargs != default.kwargs:
        return None
    return (f"warning: model.kwargs {cfg.kwargs} are the default run's (they size {default.name}) and apply to "
            f"{cfg.name} too; for its own size, --set 'model.kwargs={{}}'")


@dataclass
class ClsOptimConfig(OptimConfig):
    # layer-wise rate decay for fine-tuning (BEiT, MAE: 0.65-0.75; timm's --layer-decay): block i of
    # L learns at layer_decay ** (L - i) of the rate, the stem (patch embedding, position) slowest
    layer_decay: float | None = None


@dataclass
class ClsConfig:
    """Defaults are the default run: ``python train_cls.py`` trains on the synthetic task on CPU."""

    data: ClsDataConfig = field(default_factory=lambda: ClsDataConfig(workers=0))  # what to train on
    model: ModelConfig = field(default_factory=_default_model)  # which backbone and positional strategy
    optim: ClsOptimConfig = field(default_factory=lambda: ClsOptimConfig(lr=2e-3))  # AdamW, schedule, clipping
    aug: AugConfig = field(default_factory=AugConfig)  # augmentation and target smoothing/mixing
    ema: EmaConfig = field(default_factory=EmaConfig)  # weight averaging
    run: RunConfig = field(default_factory=lambda: RunConfig(epochs=5, output="runs/synthetic"))  # epochs, output...
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(sizes=[16, 24, 32, 48, 64]))  # resolution eval


def model_pos(cfg: ModelConfig) -> str | None:
    """The positional strategy the model uses: ``model.pos`` for vitpe's models, None for timm's own,
    which take no ``pos`` (their position is their own, e.g. a learned table)."""
    return cfg.pos if cfg.name.startswith("vitpe_") else None


def model_label(cfg: ModelConfig) -> str:
    """The model's name in the resolution tables and plots: its strategy, or a timm model's name
    (labelling it with the ``model.pos`` it does not use would compare strategies it does not have)."""
    return model_pos(cfg) or cfg.name


def build_model(cfg: ModelConfig, num_classes: int, img_size: int) -> nn.Module:
    """``timm.create_model`` with vitpe's ``pos`` options passed only to models that take them."""
    import vitpe  # noqa: F401  (registers vitpe's models with timm)

    kwargs: dict[str, Any] = dict(cfg.kwargs, num_classes=num_classes)
    if cfg.name.startswith("vitpe_"):
        kwargs.update(pos=cfg.pos, pos_kwargs=cfg.pos_kwargs or None, img_size=img_size)

    def closest() -> str:
        close = difflib.get_close_matches(cfg.name, timm.list_models(), n=4, cutoff=0.5)
        return f" (closest: {', '.join(close)})" if close else " (see timm.list_models())"

    with model_build_errors(cfg, closest):
        model = _timm_model(cfg.name, kwargs, img_size) if not cfg.name.startswith("vitpe_") else \
            timm.create_model(cfg.name, **kwargs)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model


def _timm_model(name: str, kwargs: dict[str, Any], img_size: int) -> nn.Module:
    """One of timm's own models at the training size and, where it takes them, at any size
    (``dynamic_img_size``, as the resolution evaluation needs): the options it does not take
    (a ResNet takes neither) are left out; those given in ``model.kwargs`` are kept."""
    extra = {k: v for k, v in (("img_size", img_size), ("dynamic_img_size", True)) if k not in kwargs}
    while True:
        try:
            return timm.create_model(name, **kwargs, **extra)
        except TypeError as e:
            refused = [k for k in extra if repr(k) in str(e)]
            if not refused:
                raise
            del extra[refused[0]]


def build_train_loader(cfg: ClsConfig, train_set: Dataset, device: torch.device, mean: tuple,
                       std: tuple) -> DataLoader | DeviceDecodeLoader:
    """The training loader; with ``data.decode=gpu`` the workers only read files and batches are
    decoded, cropped, flipped and normalised on ``device`` (``vitpe.data.gpu_decode``)."""
    on_device = cfg.data.decode == "gpu" and not is_synthetic(cfg.data)
    loader = make_loader(train_set, cfg.data.batch_size, True, cfg.run.seed, cfg.data.workers,
                         collate_encoded if on_device else collate_skipping, source=cfg.data.path)
    if not on_device:
        return loader
    return DeviceDecodeLoader(loader, DeviceAugment(cfg.data.img_size, cfg.aug, mean, std, torch.device(device)))


def build_mixup(aug: AugConfig, num_classes: int, synthetic: bool, batch_per_process: int = 2) -> Mixup | None:
    """timm Mixup/CutMix when configured (never for the synthetic task, whose label is geometric).
    Mixup pairs the samples of a batch, so the batch of each process must be even."""
    if synthetic or (aug.mixup <= 0 and aug.cutmix <= 0):
        return None
    if batch_per_process % 2:
        raise UserError(f"mixup/cutmix pair the samples of a batch: the batch per process "
                        f"({batch_per_process}) must be even (change --batch-size or set aug.mixup=0 "
                        f"aug.cutmix=0)")
    return Mixup(mixup_alpha=aug.mixup, cutmix_alpha=aug.cutmix, label_smoothing=aug.label_smoothing,
                 num_classes=num_classes)


def build_criterion(aug: AugConfig, mixup: Mixup | None) -> nn.Module:
    if mixup is not None:
        return SoftTargetCrossEntropy()  # mixup already smoothed the targets
    if aug.label_smoothing > 0:
        return LabelSmoothingCrossEntropy(aug.label_smoothing)
    return nn.CrossEntropyLoss()


def as_batch(item: Any) -> Batch:
    """Accept ``Batch`` (folder data) or a plain ``(images, targets)`` pair (synthetic)."""
    return item if isinstance(item, Batch) else Batch(item[0], item[1], [])


def train_one_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer, scheduler: Any,
                    criterion: nn.Module, device: torch.device, epoch: int, cfg: ClsConfig,
                    mixup: Mixup | None = None, ema: nn.Module | None = None) -> dict[str, float]:
    """One pass over ``loader``; returns ``train_loss`` (mean over all processes), ``lr``, ``skipped``
    (unreadable files, summed over processes) and ``time``."""
    model.train()
    start, seen, skipped = time.time(), set(), 0
    meter = LossMeter(("loss",), device, epoch)  # sums on the device: no wait for the device every step
    bar = progress(loader, f"epoch {epoch + 1}/{cfg.run.epochs}")
    for step, item in enumerate(bar):
        batch = as_batch(item)
        warn_skipped(batch.skipped, seen, _logger)
        skipped += len(batch.skipped)
        if _empty_anywhere(batch):
            pass_step(scheduler)
            continue
        x = batch.images.to(device, non_blocking=True)
        y = batch.targets.to(device, non_blocking=True)
        if mixup is not None:
            if len(x) % 2:  # timm's mixup pairs samples; a skipped file can leave an odd batch:
                x, y = torch.cat([x, x[-1:]]), torch.cat([y, y[-1:]])  # repeat one rather than lose one
            x, y = mixup(x, y)
        with autocast(device, cfg.run.amp):
            loss = criterion(model(x), y)
        meter.update(step, loss, weight=len(x))
        optimizer_step(loss, model, optimizer, scheduler, cfg.optim.clip_grad)
        if ema is not None:  # the step (restored on resume with the schedule) sets the decay in warm-up
            ema.update(dist.unwrap_model(model), step=scheduler.last_epoch if cfg.ema.warmup else None)
        if step % cfg.run.log_interval == 0:  # the only read on the host: the non-finite check, the bar
            bar.set_postfix(loss=f"{meter.means()['loss']:.4f}")
    totals = dist.reduce_sums({**meter.sums(), "skipped": skipped}, device)  # raises on a non-finite loss
    if totals["n"] == 0 and totals["skipped"]:  # every image skipped: nothing was trained
        raise DataError(f"epoch {epoch + 1}: none of the {int(totals['skipped'])} training images could be "
                        f"read and transformed (each is named above)")
    if totals["skipped"] and dist.is_main():
        _logger.warning("epoch %d: skipped %d image(s) that could not be read or transformed", epoch + 1, int(totals["skipped"]))
    return {"train_loss": totals["loss"] / max(totals["n"], 1), "lr": max(g["lr"] for g in optimizer.param_groups),
            "skipped": int(totals["skipped"]), "time": time.time() - start}


def _empty_anywhere(batch: Batch) -> bool:
    """True when this process's batch is empty (every file in it unreadable) or, under DDP, any
    process's is: all processes must skip the step together, or the others would wait forever in
    the gradient all-reduce. The processes vote on the hosts, without waiting for the GPU."""
    return dist.any_process(batch.images.numel() == 0)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, amp: bool = True,
             desc: str = "eval", reduce: bool = True, seen: set[str] | None = None) -> dict[str, float]:
    """Top-1 / top-5 accuracy (%) and mean cross-entropy over the readable images (``n``);
    unreadable ones are named in the log (once each, over calls sharing ``seen``) and counted
    (``skipped``). ``reduce``: sum the counts over processes (the loader is sharded); False when
    only this process evaluates (the resolution evaluation). No readable image at all is an error,
    not 0 %."""
    model.eval()
    seen = set() if seen is None else seen
    totals = {"correct1": 0.0, "correct5": 0.0, "loss": 0.0, "n": 0.0, "skipped": 0.0}
    for item in progress(loader, desc):
        batch = as_batch(item)
        warn_skipped(batch.skipped, seen, _logger)
        totals["skipped"] += len(batch.skipped)
        if batch.images.numel() == 0:
            continue
        x, y = batch.images.to(device, non_blocking=True), batch.targets.to(device, non_blocking=True)
        with autocast(device, amp):
            logits = model(x).float()
        totals["loss"] += nn.functional.cross_entropy(logits, y, reduction="sum").item()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices  # (B, k)
        hits = top == y[:, None]
        totals["correct1"] += hits[:, 0].sum().item()
        totals["correct5"] += hits.any(dim=1).sum().item()
        totals["n"] += len(y)
    if reduce:
        totals = dist.reduce_sums(totals, device)
    if totals["n"] == 0 and totals["skipped"]:
        raise DataError(f"{desc}: none of the {int(totals['skipped'])} images could be read (each is named above)")
    n = max(totals["n"], 1)
    return {"top1": 100 * totals["correct1"] / n, "top5": 100 * totals["correct5"] / n,
            "loss": totals["loss"] / n, "n": int(totals["n"]), "skipped": int(totals["skipped"])}


__all__ = ["ClsConfig", "ClsOptimConfig", "EmaConfig", "as_batch", "build_criterion", "build_mixup", "build_model", "build_train_loader",
           "default_kwargs_warning", "evaluate", "model_label", "model_pos", "train_one_epoch"]
