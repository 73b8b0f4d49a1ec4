"""Pieces of a training loop that every task shares: seeding, loaders whose order depends only on
(seed, epoch), autocast, the optimizer step, the non-finite-loss guard, progress bars, and the
training state that goes into a checkpoint and comes back on ``--resume``."""
from __future__ import annotations

import contextlib
import logging
import random
import sys
import warnings
from typing import Any, Callable, ContextManager, Iterable, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from tqdm import tqdm

from ..errors import DataError, UserError
from . import distributed as dist
from .checkpoint import rng_state, set_rng_state
from .optim import clip_gradients

_logger = logging.getLogger(__name__)


class NonFiniteLossError(UserError):
    """Training diverged; the last checkpoint (written at the end of the previous epoch) is intact."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_epoch(seed: int, epoch: int) -> None:
    """Seed every generator from (seed, epoch, process) at the start of an epoch. Augmentation,
    dropout and data-worker streams then differ per process and per epoch, and a resumed run, on
    any number of processes, draws exactly what the uninterrupted run drew: no per-process RNG
    state has to travel in the checkpoint (which only the main process writes)."""
    seed_everything(seed + 1_000_003 * (epoch + 1) + 7_919 * dist.rank())


class ShardSampler(Sampler[int]):
    """Evaluation order: process ``r`` of ``w`` takes indices ``r, r + w, ...``, so every sample is
    seen exactly once over all processes. ``DistributedSampler`` would pad the last shard with
    repeated samples, and a metric summed over processes would count those twice."""

    def __init__(self, size: int, rank: int, world: int) -> None:
        self.indices = range(rank, size, world)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)

    def set_epoch(self, epoch: int) -> None:  # same interface as DistributedSampler; order is fixed
        pass


def make_loader(dataset: Dataset, batch_size: int, train: bool, seed: int = 0, workers: int = 0,
                collate_fn: Callable | None = None, source: str = "dataset") -> DataLoader:
    """A loader over this process's share of ``dataset``; ``batch_size`` is the global batch.

    The order comes from a ``DistributedSampler`` even in one process: it shuffles with
    ``seed + epoch`` (call ``loader.sampler.set_epoch(epoch)``), so a resumed run and an
    N-process run see the same global batches as an uninterrupted 1-process run. Workers are not
    persistent so that their RNG is re-seeded from the (checkpointed) global RNG every epoch.
    Evaluation loaders (``train=False``) shard without padding (``ShardSampler``). A training set
    smaller than one batch is a ``DataError`` naming ``source`` (it would train on nothing).
    """
    world = dist.world_size()
    if batch_size % world:
        raise UserError(f"batch size {batch_size} is not divisible by the {world} processes")
    if train:
        # drop_last: the shards are not padded with repeated samples, which (with the loader's
        # drop_last) could make one more global batch than one process takes, and a longer schedule
        sampler: Sampler[int] = DistributedSampler(dataset, num_replicas=world, rank=dist.rank(), shuffle=True,
                                                   seed=seed, drop_last=True)
    else:
        sampler = ShardSampler(len(dataset), dist.rank(), world)
    loader = DataLoader(dataset, batch_size=batch_size // world, sampler=sampler, num_workers=workers,
                        collate_fn=collate_fn, drop_last=train, pin_memory=torch.cuda.is_available(),
                        persistent_workers=False)
    if train and len(loader) == 0:
        raise DataError(f"{source}: {len(dataset)} training images are fewer than one batch of {batch_size}")
    return loader


def autocast(device: torch.device, enabled: bool = True) -> ContextManager:
    """bf16 autocast on CUDA (no loss scaling needed), nothing on CPU where it would be slower."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class LossMeter:
    """Sums of each step's loss terms, kept on the device, and the first step whose loss was not finite.

    Reading a loss on the host (``.item()``, ``if`` on a tensor) makes the host wait until the
    device has finished the step, so it cannot queue the next one meanwhile. ``update`` only queues
    a few tiny kernels; ``sums`` and ``means`` copy everything to the host in one read and raise
    ``NonFiniteLossError`` naming the epoch and the first bad step. Read every ``log_interval``
    steps and at the end of the epoch: a diverged run stops within that many steps, always before
    the epoch's checkpoint is written (the weights it trained on NaNs are never saved).
    """

    def __init__(self, keys: Sequence[str], device: torch.device | str, epoch: int) -> None:
        self.keys, self.epoch, self.n = tuple(keys), epoch, 0.0
        self._sums = torch.zeros(len(self.keys), dtype=torch.float64, device=device)
        self._first_bad = torch.full((), -1.0, dtype=torch.float64, device=device)  # step index, -1: none
        self._bad_value = torch.zeros((), dtype=torch.float64, device=device)

    def update(self, step: int, loss: Tensor, parts: Sequence[Tensor] = (), weight: float = 1.0) -> None:
        """Add ``weight * (loss, *parts)`` (scalars, in ``keys`` order); remember ``step`` if
        ``loss`` is the first non-finite one. Nothing is read on the host."""
        values = torch.stack([t.detach() for t in (loss, *parts)]).double()
        first = ~torch.isfinite(values[0]) & (self._first_bad < 0)
        self._first_bad = torch.where(first, float(step), self._first_bad)
        self._bad_value = torch.where(first, values[0], self._bad_value)
        self._sums += values * weight
        self.n += weight

    def sums(self) -> dict[str, float]:
        """``{key: weighted sum}`` and ``n`` (the summed weights) on the host; raises on a non-finite loss."""
        *sums, first, value = torch.cat([self._sums, self._first_bad[None], self._bad_value[None]]).tolist()
        if first >= 0:
            raise NonFiniteLossError(f"non-finite loss ({value}) at epoch {self.epoch + 1}, step {int(first) + 1}; "
                                     f"the last checkpoint is intact (try a lower optim.lr or optim.clip_grad)")
        return {**dict(zip(self.keys, sums)), "n": self.n}

    def means(self) -> dict[str, float]:
        """The weighted mean of every key so far; raises on a non-finite loss."""
        sums = self.sums()
        n = max(sums.pop("n"), 1e-12)
        return {k: v / n for k, v in sums.items()}


def optimizer_step(loss: Tensor, model: nn.Module, optimizer: torch.optim.Optimizer,
                   scheduler: Any | None = None, clip: float | None = None) -> Tensor | None:
    """backward, clip, step, schedule; returns the gradient norm before clipping (or None)."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    norm = clip_gradients(model, clip)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return norm


def pass_step(scheduler: Any) -> None:
    """Move the schedule past a step that every process passed over (a batch with no readable
    file), so that it still ends where it was planned. Without a step of the optimizer before it,
    torch would warn of a wrong call order; here that order is meant."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
        scheduler.step()


def progress(iterable: Iterable, desc: str, total: int | None = None) -> tqdm:
    """A tqdm bar on the main process when stderr is a terminal; silent otherwise (logs, CI)."""
    return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True,
                disable=not (dist.is_main() and sys.stderr.isatty()))


EMA_KEY = "state_dict_ema"  # the EMA weights' entry in a checkpoint, as timm's train.py names it


def ema_weights(state: dict[str, Any]) -> dict[str, Any] | None:
    """A checkpoint's EMA weights (``state_dict_ema``; ``ema`` in checkpoints written before), or None."""
    return state.get(EMA_KEY, state.get("ema"))


def training_state(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, epoch: int,
                   config: dict[str, Any], ema: nn.Module | None = None, **extra: Any) -> dict[str, Any]:
    """Everything ``--resume`` needs, as plain data: ``epoch`` is the number of finished epochs.
    Weights that are not all finite are never saved: a gradient or an update can overflow on a
    step whose loss was finite, which the loss check cannot see (one read per checkpoint)."""
    for name, module in (("model", model), ("EMA", ema)):
        if module is not None and not all_finite(module):
            raise NonFiniteLossError(f"non-finite {name} weights after epoch {epoch} although its losses were "
                                     f"finite (a gradient or update overflowed); not saved: the last checkpoint "
                                     f"is intact (try a lower optim.lr or optim.clip_grad)")
    state = {"model": dist.unwrap_model(model).state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "epoch": epoch, "config": config, "rng": rng_state()}
    if ema is not None:  # timm's name for it: its tools load it with use_ema (validate.py --use-ema)
        state[EMA_KEY] = ema.state_dict()
    state.update(extra)
    return state


def all_finite(module: nn.Module) -> bool:
    """Whether every floating-point parameter and buffer of ``module`` is finite (one read)."""
    tensors = [t for t in (*module.parameters(), *module.buffers()) if t.is_floating_point()]
    return not tensors or bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def restore_training_state(state: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer,
                           scheduler: Any, ema: nn.Module | None = None) -> int:
    """Load what ``training_state`` saved (RNG last, so nothing after it disturbs the streams);
    returns the epoch to start from. The schedule goes on from the saved step as this run's
    options define it (a longer ``run.epochs`` stretches what is left; with another batch size the
    step is rescaled, so the epochs done keep their share). Weights that do not fit the model
    (options changed since the checkpoint) are an error naming the keys at fault; an entry of the
    wrong shape or kind (a damaged or foreign checkpoint) is an error naming the file."""
    try:
        return _restore(state, model, optimizer, scheduler, ema)
    except (KeyError, IndexError, TypeError, ValueError) as e:
        msg = str(e).splitlines()[0] if str(e) else ""
        raise UserError(f"{state.get('source', 'the checkpoint')}: its training state does not fit this run "
                        f"({type(e).__name__}: {msg}); resume from a checkpoint.pt of this run's task and "
                        f"options") from None


def _restore_schedule(state: dict[str, Any], optimizer: torch.optim.Optimizer, scheduler: Any) -> None:
    """The optimizer's and the schedule's state from ``state``, under this run's settings."""
    # the run's own settings, as the optimizer and schedule were just built from the config: a
    # learning rate, weight decay or betas given with --resume apply from here (as recorded in
    # config.yaml), where the saved state would bring back the old ones
    fresh = [{k: g[k] for k in ("initial_lr", "weight_decay", "betas") if k in g} for g in optimizer.param_groups]
    steps_per_epoch = getattr(scheduler, "steps_per_epoch", None)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    saved_steps = getattr(scheduler, "steps_per_epoch", None)  # None: an older checkpoint, which kept none
    if steps_per_epoch is not None:
        scheduler.steps_per_epoch = steps_per_epoch
    if steps_per_epoch and saved_steps and saved_steps != steps_per_epoch:
        # the schedule counts steps: with another batch size the epochs done keep their share of
        # it, or the resumed run would reach its floor early (fewer steps an epoch) or never (more)
        step = round(scheduler.last_epoch * steps_per_epoch / saved_steps)
        _logger.info("resumed at step %d of the schedule (step %d at %d steps an epoch, now %d)", step,
                     scheduler.last_epoch, saved_steps, steps_per_epoch)
        scheduler.last_epoch = step
    plain = lambda v: tuple(v) if isinstance(v, list) else v  # noqa: E731  (betas: a tuple or a list)
    changed = {k for g, f in zip(optimizer.param_groups, fresh) for k, v in f.items() if plain(g.get(k)) != plain(v)}
    if changed:  # (load_state_dict has checked that the groups are as many)
        for g, f in zip(optimizer.param_groups, fresh):
            g.update(f)
        scheduler.base_lrs = [g["initial_lr"] for g in optimizer.param_groups]
        _logger.info("resumed with this run's %s (the checkpoint's differed)", ", ".join(sorted(changed)))
    # the next step's rate from this run's schedule at the saved step, not the rate saved with the
    # optimizer: that is the old schedule's, wrong for one step when run.epochs, the warm-up or
    # the schedule changed (a finished run extended would take its first step at the floor)
    for g, base, fn in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        g["lr"] = base * fn(scheduler.last_epoch)
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]


def _restore(state: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
             ema: nn.Module | None) -> int:
    source = state.get("source", "the checkpoint")
    missing = [k for k in ("model", "optimizer", "scheduler", "epoch", "rng") if k not in state]
    if missing:
        raise UserError(f"{source}: not a vitpe training checkpoint (no {', '.join(missing)}); --resume takes "
                        f"the checkpoint.pt a training run writes")
    hint = "resume without options that change the model (strategy, sizes) or start a new run"
    try:
        result = dist.unwrap_model(model).load_state_dict(state["model"], strict=False)
    except RuntimeError as e:  # a shape that differs
        detail = next((ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()), str(e))
        raise UserError(f"{source}: its weights do not fit this model ({detail}); {hint}") from None
    if result.missing_keys or result.unexpected_keys:
        parts = [f"{label} {keys[:4]}{' ...' if len(keys) > 4 else ''}" for label, keys in
                 (("missing", result.missing_keys), ("unexpected", result.unexpected_keys)) if keys]
        raise UserError(f"{source}: its weights do not fit this model ({'; '.join(parts)}); {hint}")
    _restore_schedule(state, optimizer, scheduler)
    if ema is not None:
        weights = ema_weights(state)
        if weights is None:
            raise UserError("the checkpoint has no EMA weights but this run has EMA enabled (set ema.enabled=false)")
        ema.load_state_dict(weights)
    set_rng_state(state["rng"])
    return int(state["epoch"])


__all__ = ["EMA_KEY", "LossMeter", "NonFiniteLossError", "ShardSampler", "autocast", "ema_weights", "make_loader",
           "optimizer_step", "pass_step", "progress", "restore_training_state", "seed_epoch", "seed_everything", "training_state"]
