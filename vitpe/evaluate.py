"""Resolution generalisation: how classifiers, segmenters and DETR detectors score at test sizes
they were not trained at, with no fine-tuning. A classifier's images are resized (shorter side) and
centre-cropped to each size, so the model sees the same content on a finer or coarser patch grid
and its positional strategy must follow; a segmenter's are scaled (``--scales``, of each image's
size, scored at the labels' size; ``evaluate_dense``), a detector's resized to each shorter side
(COCO AP against the json).

    python -m vitpe.evaluate --checkpoint runs/peg/best.pt runs/learned/best.pt \\
        --sizes 16,24,32,48,64 --output runs/compare
    python -m vitpe.evaluate --checkpoint runs/seg-*/checkpoint.pt --scales 0.5,1.0,1.5 --output runs/seg

prints a markdown table per metric (rows: checkpoints of one task, labelled by strategy, timm's own
models by name; columns: sizes, the training size marked) and writes ``resolution.json`` and
``resolution.png`` in ``--output`` (``evaluate_report``), after each checkpoint. Every checkpoint is
read and checked against its data first. ``train_cls.py`` runs the classification part at its end.
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader

from .cli import parse_scales, parse_sizes, run_cli
from .config import ConfigError, apply_overrides, from_dict
from .data.classification import eval_dataset, norm_stats, resolve_crop_pct
from .data.folder import cached_skips, collate_skipping
from .engine import distributed as dist
from .engine.checkpoint import load_checkpoint
from .engine.classification import ClsConfig, build_model, evaluate, model_label
from .engine.loop import EMA_KEY, autocast, ema_weights
from .errors import UserError, out_of_memory  # noqa: F401  (out_of_memory re-exported)
from .evaluate_dense import SEG_SCALES, check_classes, det_dataset, det_sizes, seg_dataset, seg_scales
from .evaluate_report import Results, markdown_table, plot, unique_labels, write_report  # noqa: F401  (re-exported)

_logger = logging.getLogger(__name__)


def patch_size(model: nn.Module) -> int:
    pe = getattr(model, "patch_embed", None)
    ps = getattr(pe, "patch_size", 1)
    return int(ps[0] if isinstance(ps, (tuple, list)) else ps)


def check_sizes(sizes: Sequence[int], model: nn.Module, path: str | None = None) -> None:
    """Sizes the model takes: multiples of its patch size, any size where it pads its input
    (timm's ``dynamic_img_pad``); ``path``: the checkpoint the errors name."""
    where = f"{path}: " if path else ""
    if getattr(model, "dynamic_img_pad", False):
        return
    pe = getattr(model, "patch_embed", None)
    if getattr(pe, "strict_img_size", False):  # a timm model built for one size
        fixed = tuple(pe.img_size)
        bad = [s for s in sizes if (s, s) != fixed]
        if bad:
            raise UserError(f"{where}test sizes {bad}: the model takes {fixed[0]}x{fixed[1]} inputs only (build it with "
                            f"--set model.kwargs.dynamic_img_size=true)")
    p = patch_size(model)
    bad = [s for s in sizes if s % p]
    if bad:
        raise UserError(f"{where}test sizes {bad} are not multiples of the patch size {p} "
                        f"(e.g. use {', '.join(str(max(p, s // p * p)) for s in bad)})")


@torch.no_grad()
def throughput(model: nn.Module, size: int, device: torch.device, batch_size: int = 64, amp: bool = True,
               seconds: float = 0.5) -> float:
    """Images per second of a forward pass at ``size`` (random input; warm-up excluded)."""
    model.eval()
    x = torch.randn(batch_size, 3, size, size, device=device)
    with autocast(device, amp):
        model(x)  # warm-up: kernels, cached position tables
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        sync()
        n, start = 0, time.perf_counter()
        while n == 0 or time.perf_counter() - start < seconds:
            model(x)
            n += 1
            if n % 4 == 0:
                sync()
        sync()
    return n * batch_size / (time.perf_counter() - start)


def evaluate_sizes(model: nn.Module, cfg: ClsConfig, sizes: Sequence[int], device: torch.device,
                   mean: tuple, std: tuple, classes: list[str] | None = None) -> dict[int, dict[str, float]]:
    """``{size: {top1, top5, n, skipped, img_per_s}}`` on the validation set of ``cfg.data`` (this
    process only): ``n`` images scored, ``skipped`` unreadable ones left out. A size that runs out
    of memory is logged and recorded as ``{"error": ...}``, and the other sizes are still evaluated."""
    check_sizes(sizes, model)
    mean, std = norm_stats(cfg.data, mean, std)
    out, seen = {}, set()  # each unreadable file is named once, not at every size
    for size in sizes:
        ds = eval_dataset(cfg.data, size, mean, std, cfg.aug.interpolation, cfg.run.seed, classes=classes)
        if classes is not None and list(ds.classes) != list(classes):  # a folder is checked as it is read
            raise UserError(f"{cfg.data.path}: its classes {list(ds.classes)[:5]} are not the checkpoint's "
                            f"{list(classes)[:5]}; evaluate on data with the classes the model was trained on")
        loader = DataLoader(ds, batch_size=cfg.eval.batch_size, num_workers=cfg.data.workers,
                            collate_fn=collate_skipping)
        gpu = device.type == "cuda"  # a GPU needs full batches to be measured, not launch overhead
        try:
            m = evaluate(model, loader, device, cfg.run.amp, desc=f"eval {size}px", reduce=False, seen=seen)
            out[size] = {"top1": m["top1"], "top5": m["top5"], "n": m["n"],
                         "skipped": m["skipped"] + cached_skips(ds)}
            if cfg.eval.throughput:
                out[size]["img_per_s"] = throughput(model, size, device, cfg.eval.batch_size if gpu else
                                                    min(cfg.eval.batch_size, 64), cfg.run.amp, 0.5 if gpu else 0.2)
        except (RuntimeError, torch.OutOfMemoryError) as e:
            if not out_of_memory(e):
                raise
            phase = "throughput" if size in out else "accuracy"
            error = f"out of memory ({phase}, batch size {cfg.eval.batch_size})"
            _logger.warning("test size %dpx: %s; left out, the other sizes go on (a smaller eval batch size, "
                            "--batch-size or --set eval.batch_size=N, may fit)", size, error)
            out[size] = {**out.get(size, {"n": 0, "skipped": 0}), "error": error}
            del e  # the traceback holds the failed step's tensors
            if gpu:
                torch.cuda.empty_cache()
    return out


# -- command line ------------------------------------------------------------------------------
CLS_SIZES = [16, 24, 32, 40, 48, 56, 64]  # the default run's 32 px, halved and doubled


def _task_configs() -> dict[str, type]:
    from .engine.detection import DetConfig
    from .engine.segmentation import SegConfig
    return {"classification": ClsConfig, "segmentation": SegConfig, "detection": DetConfig}


def _run_config(path: str, config: Any) -> tuple[str, Any]:
    """The checkpoint's task and config (classification, segmentation or detection)."""
    first = None
    for task, cls in _task_configs().items():
        try:
            return task, from_dict(cls, config)
        except ConfigError as e:
            first = first or e
    raise UserError(f"{path}: its config is not a vitpe training run's ({first})")


def read_run(path: str, weights: str = "auto") -> tuple[str, Any, dict]:
    """A training checkpoint's task, config and state, checked: its entries, its task, and EMA
    weights where ``weights`` asks for them."""
    state = load_checkpoint(path)
    missing = [k for k in ("config", "model", "classes") if k not in state]
    if missing:
        raise UserError(f"{path}: not a vitpe training checkpoint (no {'/'.join(map(repr, missing))} "
                        f"entr{'y' if len(missing) == 1 else 'ies'})")
    task, cfg = _run_config(path, state["config"])
    if weights == "ema" and ema_weights(state) is None:
        raise UserError(f"{path}: has no EMA weights ({EMA_KEY!r})")
    return task, cfg, state


def read_checkpoint(path: str, weights: str = "auto") -> tuple[ClsConfig, dict]:
    """A classification checkpoint's config and state (``read_run``, another task's refused)."""
    task, cfg, state = read_run(path, weights)
    if task != "classification":
        raise UserError(f"{path}: a {task} run's checkpoint, not a classifier's")
    return cfg, state


def load_model(path: str, device: torch.device, weights: str = "auto",
               read: tuple[ClsConfig, dict] | None = None) -> tuple[nn.Module, ClsConfig, dict]:
    """Rebuild the classifier a training checkpoint describes; ``weights``: model, ema, or auto (EMA
    if saved); ``read``: what ``read_checkpoint`` already returned for ``path``."""
    cfg, state = read or read_checkpoint(path, weights)
    model = build_model(cfg.model, len(state["classes"]), cfg.data.img_size)
    ema = ema_weights(state)
    model.load_state_dict(ema if weights == "ema" or (weights == "auto" and ema is not None) else state["model"])
    return model.to(device).eval(), cfg, state


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Accuracy of classifiers, segmenters and DETR detectors across test "
                                            "sizes they were not trained at (checkpoints of one task at a time).")
    p.add_argument("--checkpoint", nargs="+", required=True, metavar="CKPT", help="training checkpoints")
    p.add_argument("--data", help="dataset folder, or 'synthetic' for classifiers (default: each checkpoint's own)")
    p.add_argument("--sizes", type=parse_sizes, metavar="S1,S2,...",
                   help=f"classification: square test sizes (default {','.join(map(str, CLS_SIZES))}); detection: "
                        f"shorter sides (default: the run's eval.sizes, else 0.5-1.5x, and its training size)")
    p.add_argument("--scales", type=parse_scales, metavar="S1,S2,...",
                   help=f"segmentation: test scales of each image's size (default "
                        f"{','.join(map(str, SEG_SCALES))})")
    p.add_argument("--output", default="runs/resolution", help="folder for resolution.json and .png")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, help="evaluation batch size (classification, detection)")
    p.add_argument("--workers", type=int, help="data-loading processes")
    p.add_argument("--weights", choices=["auto", "model", "ema"], default="auto")
    p.add_argument("--no-throughput", action="store_true", help="skip the images/s measurement (classification)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a data.*, eval.* or run.amp entry of each checkpoint's config, e.g. data.cache=false")
    return p.parse_args(argv)


def _evaluation_config(path: str, task: str, cfg: Any, args: argparse.Namespace) -> Any:
    """``cfg`` with this evaluation's data, workers, batch size and ``--set`` overrides."""
    wrong = [item for item in args.set if not item.strip().startswith(("data.", "eval.", "run.amp="))]
    if wrong:  # the model is already built from the checkpoint: its entries cannot change here
        raise UserError(f"--set {wrong[0]!r}: only data.*, eval.* and run.amp can be set for an evaluation")
    data = dict(path=args.data or cfg.data.path, workers=args.workers if args.workers is not None else cfg.data.workers)
    cfg.data = from_dict(type(cfg.data), {**vars(cfg.data), **data})
    cfg = apply_overrides(cfg, args.set)
    if task == "classification":
        resolve_crop_pct(cfg.data, cfg.model.name)  # a checkpoint's config has it, unless set to null here
        cfg.eval.throughput = not args.no_throughput
    if args.batch_size is not None and hasattr(cfg.eval, "batch_size"):
        cfg.eval.batch_size = args.batch_size
    return cfg


def _check_classes(path: str, cfg: ClsConfig, state: dict, size: int) -> None:
    """The data's classes are the checkpoint's (a model scored on other classes would index
    outputs it does not have), checked for every checkpoint before any is evaluated."""
    mean, std = norm_stats(cfg.data, tuple(state.get("mean", (0.5,) * 3)), tuple(state.get("std", (0.5,) * 3)))
    try:
        found = list(eval_dataset(cfg.data, size, mean, std, cfg.aug.interpolation, cfg.run.seed,
                                  classes=state["classes"]).classes)
    except UserError as e:  # the folder's own check, which knows the folder but not the checkpoint
        raise UserError(f"{path}: trained on the classes {list(state['classes'])[:5]}; {e}") from None
    check_classes(path, state["classes"], found, cfg.data.path)


def _test_sizes(task: str, cfg: Any, args: argparse.Namespace) -> list:
    """The sizes (scales, for segmentation) ``task`` is evaluated at; the other option refused."""
    if task == "segmentation":
        if args.sizes:
            raise UserError("--sizes: segmentation checkpoints are evaluated at --scales (of each image's size)")
        return list(args.scales or SEG_SCALES)
    if args.scales:
        raise UserError(f"--scales: {task} checkpoints are evaluated at --sizes")
    if task == "detection":  # the run's own test sizes, else its training size scaled as segmentation's
        default = cfg.eval.sizes or [max(1, round(cfg.data.min_size * f)) for f in (0.5, 0.75, 1.25, 1.5)]
        return list(args.sizes or sorted(set(default) | {cfg.data.min_size}))
    return list(args.sizes or CLS_SIZES)


def _check(path: str, task: str, cfg: Any, state: dict, sizes: list) -> Any:
    """What can fail before any checkpoint is evaluated: the sizes the model takes, the data's
    classes. Returns a dense task's validation split as read for the check (kept for its evaluation)."""
    if task == "classification":
        # the architecture, unweighted and on the CPU, for the sizes it takes
        check_sizes(sizes, build_model(cfg.model, len(state["classes"]), cfg.data.img_size), path)
        _check_classes(path, cfg, state, sizes[0])
        return None
    return (seg_dataset if task == "segmentation" else det_dataset)(path, cfg, state)


def _evaluate(path: str, task: str, cfg: Any, state: dict, sizes: list, device: torch.device,
              weights: str, val: Any = None) -> dict[str, Any]:
    """One checkpoint's result: ``{"checkpoint", "task", "train_size", "sizes"}``; ``val``: what
    ``_check`` returned."""
    if task == "classification":
        model, cfg, state = load_model(path, device, weights, (cfg, state))
        mean, std = state.get("mean", (0.5,) * 3), state.get("std", (0.5,) * 3)
        scores = evaluate_sizes(model, cfg, sizes, device, tuple(mean), tuple(std), state["classes"])
        train = cfg.data.img_size
    elif task == "segmentation":
        scores, train = seg_scales(path, cfg, state, sizes, device, val), 1.0
    else:
        scores, train = det_sizes(path, cfg, state, sizes, device, val), cfg.data.min_size
    return {"checkpoint": path, "task": task, "train_size": train, "sizes": {str(s): v for s, v in scores.items()}}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    for flag, value, least in (("--batch-size", args.batch_size, 1), ("--workers", args.workers, 0)):
        if value is not None and value < least:
            raise UserError(f"{flag} {value}: must be at least {least}")
    device = dist.resolve_device(args.device)
    # every checkpoint read and its data checked first, so that a wrong one stops the run before
    # the others' evaluations, not after them
    read = []
    for path in args.checkpoint:
        task, cfg, state = read_run(path, args.weights)
        if read and task != read[0][1]:
            raise UserError(f"{path}: a {task} run's checkpoint among {read[0][1]} ones ({read[0][0]}); evaluate "
                            f"the checkpoints of one task at a time")
        cfg = _evaluation_config(path, task, cfg, args)
        sizes = _test_sizes(task, cfg, args)
        read.append((path, task, cfg, state, sizes, _check(path, task, cfg, state, sizes)))
    # by strategy (DETR's: its encoder's), a timm model by its name
    labels = unique_labels([cfg.model.pos if task == "detection" else model_label(cfg.model)
                            for _, task, cfg, *_ in read], args.checkpoint)
    results: Results = {}
    for label, (path, task, cfg, state, sizes, val) in zip(labels, read):
        results[label] = _evaluate(path, task, cfg, state, sizes, device, args.weights, val)
        text = write_report(results, args.output)  # after each checkpoint: a later failure keeps these
    print(text)
    print(f"\nwrote {Path(args.output) / 'resolution.json'} and {Path(args.output) / 'resolution.png'}")
    return 0


if __name__ == "__main__":
    run_cli(main)
