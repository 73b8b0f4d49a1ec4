"""AdamW with weight-decay groups, per-step learning-rate schedules, and gradient clipping."""
from __future__ import annotations

import logging
import math
from fnmatch import fnmatchcase
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR

from ..config import ConfigError, OptimConfig

_logger = logging.getLogger(__name__)


def param_groups(model: nn.Module, weight_decay: float, skip: Iterable[str] = (),
                 layer_decay: float | None = None) -> list[dict]:
    """Two groups: decayed weights, and undecayed norms, biases, 1-d parameters and the names in
    ``skip`` plus the model's ``no_weight_decay()`` (position tables, class token): decaying them
    pulls them toward zero for no gain in regularisation. A name also covers the parameters of a
    module of that name, and may be a pattern (``pos_embed.*``, as timm matches them). vitpe's
    models name every parameter of their positional strategy (a PEG's convolution too, as timm's
    Twins and mmseg's ``pos_block``); Mix-FFN's convolution is part of the FFN and decayed, as in
    SegFormer.

    With ``layer_decay`` (BEiT's and MAE's fine-tuning, timm's ``--layer-decay``) each of those is
    split by layer, as the model's ``group_matcher`` numbers them (timm's rule: the stem 0, block
    ``i`` ``i + 1``, the final norm and head last), a layer ``k`` below the last learning at
    ``layer_decay ** k`` of the rate (the group's ``lr_scale``)."""
    skip = set(skip)
    if hasattr(model, "no_weight_decay"):
        skip |= set(model.no_weight_decay())
    layers, last = _layers(model) if layer_decay is not None else ({}, 0)
    groups: dict[tuple[int, bool], list[Tensor]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        undecayed = p.ndim <= 1 or name.endswith(".bias") or any(
            name == s or name.startswith(s + ".") or fnmatchcase(name, s) for s in skip)
        groups.setdefault((layers.get(name, last), undecayed), []).append(p)
    if layer_decay is None:
        return [{"params": groups.get((0, False), []), "weight_decay": weight_decay},
                {"params": groups.get((0, True), []), "weight_decay": 0.0}]
    return [{"params": params, "weight_decay": 0.0 if undecayed else weight_decay,
             "lr_scale": layer_decay ** (last - layer)} for (layer, undecayed), params in sorted(groups.items())]


def _layers(model: nn.Module) -> tuple[dict[str, int], int]:
    """Each parameter's layer, as timm's layer decay numbers them (``group_matcher(coarse=False)``
    through ``timm.models.group_parameters``), and the last layer's number."""
    from timm.models import group_parameters

    if not hasattr(model, "group_matcher"):
        raise ConfigError(f"optim.layer_decay: {type(model).__name__} does not number its layers (no "
                          f"group_matcher, as timm's and vitpe's ViTs have); unset optim.layer_decay")
    layers = group_parameters(model, model.group_matcher(coarse=False), reverse=True)
    return layers, max(layers.values(), default=0)


def build_optimizer(model: nn.Module, cfg: OptimConfig, batch_size: int | None = None) -> torch.optim.AdamW:
    """AdamW over ``param_groups(model, cfg.weight_decay)`` at the peak rate ``cfg.lr`` (scaled to
    ``batch_size``, the global batch, when ``cfg.lr_base_batch`` is set), each group at its
    ``lr_scale`` of it where the config has a ``layer_decay`` (classification's)."""
    groups = param_groups(model, cfg.weight_decay, layer_decay=getattr(cfg, "layer_decay", None))
    groups = [dict(g, lr=cfg.lr * g["lr_scale"]) if "lr_scale" in g else g for g in groups]
    return adamw(groups, cfg.lr, cfg.betas, lr_scale(cfg, batch_size))


def lr_scale(cfg: OptimConfig, batch_size: int | None) -> float:
    """``batch_size / cfg.lr_base_batch`` (DeiT's linear scaling rule; timm's ``--lr-base`` scales
    AdamW's rate by the square root of that ratio unless given ``--lr-base-scale linear``), or 1
    when ``lr_base_batch`` is not set."""
    if cfg.lr_base_batch is None:
        return 1.0
    if batch_size is None:
        raise ValueError("optim.lr_base_batch is set: the global batch size is needed to scale the rate")
    scale = batch_size / cfg.lr_base_batch
    _logger.info("learning rate %g for a batch of %d, scaled to %g for the global batch of %d (optim.lr_base_batch)",
                 cfg.lr, cfg.lr_base_batch, cfg.lr * scale, batch_size)
    return scale


def adamw(groups: list[dict[str, Any]], lr: float, betas: Sequence[float], scale: float = 1.0) -> torch.optim.AdamW:
    """AdamW over parameter groups, every rate (``lr`` and any group's own) times ``scale``; on the
    GPU as one fused kernel per group, fewer launches than torch's default multi-tensor path (the
    same update)."""
    fused = True if all(p.is_cuda for g in groups for p in g["params"]) else None
    groups = [dict(g, lr=g["lr"] * scale) if "lr" in g else g for g in groups]
    return torch.optim.AdamW(groups, lr=lr * scale, betas=tuple(betas), fused=fused)


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str = "cosine",
              warmup_ratio: float = 0.01, min_ratio: float = 0.0, power: float = 1.0,
              step_at: Sequence[float] = (), step_gamma: float = 0.1) -> float:
    """Multiplier of the peak rate at ``step``: linear warm-up from ``warmup_ratio`` to 1, then
    ``cosine`` or ``poly`` decay to ``min_ratio`` at ``total_steps``, ``constant``, or ``step``:
    times ``step_gamma`` at each fraction ``step_at`` of ``total_steps``.

    Per optimizer step, the decay starting after the warm-up: ``cosine`` is timm's
    ``CosineLRScheduler`` with ``warmup_prefix=True``, ``t_in_epochs=False`` and ``t_initial`` the
    steps after the warm-up (timm's train.py and DeiT update once an epoch, their cosine counted
    from step 0 through the warm-up); ``poly`` is mmseg's ``LinearLR`` then ``PolyLR`` by
    iteration, but for its rounding (mmengine reaches the peak one step sooner and ends on 0)."""
    if step < warmup_steps:
        return warmup_ratio + (1.0 - warmup_ratio) * step / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "step":
        return step_gamma ** sum(step >= round(f * total_steps) for f in step_at)
    t = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * t))
    elif schedule == "poly":
        decay = (1.0 - t) ** power
    else:
        raise ValueError(f"unknown schedule {schedule!r}; expected cosine, poly or constant")
    return min_ratio + (1.0 - min_ratio) * decay


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, steps_per_epoch: int,
                    epochs: int) -> LambdaLR:
    """Per-step schedule (call ``scheduler.step()`` after every optimizer step). Its state dict
    holds plain numbers, so it goes into checkpoints as is, ``steps_per_epoch`` with them: a run
    resumed with another batch size maps its step count to the new epochs (``restore_training_state``)."""
    total = max(1, steps_per_epoch * epochs)
    warmup = min(total, int(round(cfg.warmup_epochs * steps_per_epoch)))
    fn: Callable[[int], float] = lambda step: lr_factor(  # noqa: E731
        step, total, warmup, cfg.schedule, cfg.warmup_lr_ratio, cfg.min_lr_ratio, cfg.poly_power,
        cfg.step_at, cfg.step_gamma)
    scheduler = LambdaLR(optimizer, fn)
    scheduler.steps_per_epoch = steps_per_epoch  # type: ignore[attr-defined]
    return scheduler


def clip_gradients(parameters: Iterable[Tensor] | nn.Module, max_norm: float | None) -> Tensor | None:
    """Clip the global gradient norm to ``max_norm`` (None: no clipping); returns the norm before
    clipping, useful to log, or None when not clipping."""
    if max_norm is None or max_norm <= 0:
        return None
    params = parameters.parameters() if isinstance(parameters, nn.Module) else parameters
    return torch.nn.utils.clip_grad_norm_(params, max_norm)


__all__ = ["adamw", "build_optimizer", "build_scheduler", "clip_gradients", "lr_factor", "lr_scale", "param_groups"]
