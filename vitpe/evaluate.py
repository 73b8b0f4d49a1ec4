"""Resolution generalisation: accuracy (and throughput) of classifiers at test sizes they were not
trained at. Each image is resized (shorter side) and centre-cropped to the size, so the model sees
the same content on a finer or coarser patch grid and its positional strategy must follow.

    python -m vitpe.evaluate --checkpoint runs/peg/best.pt runs/learned/best.pt \\
        --sizes 16,24,32,48,64 --output runs/compare

prints a markdown table (rows: checkpoints, labelled by strategy, timm's own models by name;
columns: sizes) and writes ``resolution.json`` and ``resolution.png`` in ``--output``. Training runs
the same code at its end.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader

from .cli import parse_sizes, run_cli
from .config import ConfigError, apply_overrides, from_dict
from .data.classification import ClsDataConfig, eval_dataset, norm_stats, resolve_crop_pct
from .data.folder import cached_skips, collate_skipping
from .engine import distributed as dist
from .engine.checkpoint import load_checkpoint
from .engine.classification import ClsConfig, build_model, evaluate, model_label
from .engine.loop import EMA_KEY, autocast, ema_weights
from .errors import UserError

_logger = logging.getLogger(__name__)
# label -> {"checkpoint", "train_size", "sizes": {size: {top1, top5, n, skipped, img_per_s}}}
Results = dict[str, dict[str, Any]]


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


def out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is an allocation failure: CUDA's, or the CPU allocator's."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


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


# -- reporting ---------------------------------------------------------------------------------
def unique_labels(labels: Sequence[str], paths: Sequence[str]) -> list[str]:
    """Strategy names, with the run folder added where two checkpoints share a strategy (and a
    number where even that repeats)."""
    named = [f"{lab} ({Path(p).parent.name})" if labels.count(lab) > 1 else lab for lab, p in zip(labels, paths)]
    return [lab if named[:i].count(lab) == 0 else f"{lab} #{named[:i].count(lab) + 1}" for i, lab in enumerate(named)]


def markdown_table(results: Results, key: str = "top1", fmt: str = "{:.1f}") -> str:
    """Rows: checkpoints; columns: sizes (the training size marked with *)."""
    rows = {label: {int(s): v for s, v in r["sizes"].items()} for label, r in results.items()}  # JSON keys are str
    sizes = sorted({s for row in rows.values() for s in row})
    train = {r.get("train_size") for r in results.values()}
    head = ["strategy"] + [f"{s}*" if s in train else str(s) for s in sizes]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, row in rows.items():
        cells = [fmt.format(row[s][key]) if s in row and key in row[s] else
                 "OOM" if s in row and "error" in row[s] else "-" for s in sizes]
        lines.append("| " + " | ".join([label] + cells) + " |")
    return "\n".join(lines)


def plot(results: Results, path: str | Path, title: str = "accuracy against test resolution") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, r in results.items():
        row = {int(s): v for s, v in r["sizes"].items() if "top1" in v}  # not the sizes that failed
        ax.plot(sorted(row), [row[s]["top1"] for s in sorted(row)], marker="o", label=label)
    for t in sorted({r.get("train_size") for r in results.values()} - {None}):
        ax.axvline(t, color="gray", linestyle="--", linewidth=1)
    ax.set(xlabel="test resolution (px)", ylabel="top-1 (%)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(results: Results, output: str | Path) -> str:
    """Write ``resolution.json`` and ``resolution.png``; return the markdown tables."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    (output / "resolution.json").write_text(json.dumps(results, indent=2))
    plot(results, output / "resolution.png")
    text = "top-1 (%) by test resolution (* = training size)\n\n" + markdown_table(results)
    if any("img_per_s" in v for r in results.values() for v in r["sizes"].values()):
        text += "\n\nthroughput (images/s) by test resolution\n\n" + markdown_table(results, "img_per_s", "{:.0f}")
    skips = {label: max(v.get("skipped", 0) for v in r["sizes"].values()) for label, r in results.items() if r["sizes"]}
    for label, n in skips.items():
        if n:
            text += f"\n\n{label}: {n} unreadable validation image(s) skipped at each size (named in the log)"
    for label, r in results.items():
        for size, v in r["sizes"].items():
            if "error" in v:
                text += f"\n\n{label}, {size}px: {v['error']}"
    return text


# -- command line ------------------------------------------------------------------------------
def _classification_config(path: str, config: Any) -> ClsConfig:
    """The checkpoint's ``ClsConfig``; a segmentation or detection run's checkpoint is named as one."""
    try:
        return from_dict(ClsConfig, config)
    except ConfigError as e:
        from .engine.detection import DetConfig
        from .engine.segmentation import SegConfig
        for cls, task, script in ((SegConfig, "segmentation", "train_seg.py"), (DetConfig, "detection", "train_det.py")):
            try:
                from_dict(cls, config)
            except ConfigError:
                continue
            sizes = "--eval-scales" if cls is SegConfig else "--eval-sizes"
            raise UserError(f"{path}: a {task} run's checkpoint; vitpe.evaluate evaluates classification "
                            f"checkpoints (evaluate this one at other sizes with {script} --resume {path} "
                            f"{sizes} ... --output DIR)") from None
        raise UserError(f"{path}: its config is not a classification run's ({e})") from None


def read_checkpoint(path: str, weights: str = "auto") -> tuple[ClsConfig, dict]:
    """A classification checkpoint's config and state, checked: its entries, its task, and EMA
    weights where ``weights`` asks for them."""
    state = load_checkpoint(path)
    missing = [k for k in ("config", "model", "classes") if k not in state]
    if missing:
        raise UserError(f"{path}: not a vitpe classification checkpoint (no {'/'.join(map(repr, missing))} "
                        f"entr{'y' if len(missing) == 1 else 'ies'})")
    cfg = _classification_config(path, state["config"])
    if weights == "ema" and ema_weights(state) is None:
        raise UserError(f"{path}: has no EMA weights ({EMA_KEY!r})")
    return cfg, state


def load_model(path: str, device: torch.device, weights: str = "auto",
               read: tuple[ClsConfig, dict] | None = None) -> tuple[nn.Module, ClsConfig, dict]:
    """Rebuild the model a training checkpoint describes; ``weights``: model, ema, or auto (EMA if
    saved); ``read``: what ``read_checkpoint`` already returned for ``path``."""
    cfg, state = read or read_checkpoint(path, weights)
    model = build_model(cfg.model, len(state["classes"]), cfg.data.img_size)
    ema = ema_weights(state)
    model.load_state_dict(ema if weights == "ema" or (weights == "auto" and ema is not None) else state["model"])
    return model.to(device).eval(), cfg, state


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Accuracy and throughput of classifiers across test resolutions.")
    p.add_argument("--checkpoint", nargs="+", required=True, metavar="CKPT", help="training checkpoints")
    p.add_argument("--data", help="dataset folder or 'synthetic' (default: each checkpoint's own)")
    p.add_argument("--sizes", type=parse_sizes, default=[16, 24, 32, 40, 48, 56, 64], help="e.g. 16,32,64")
    p.add_argument("--output", default="runs/resolution", help="folder for resolution.json and .png")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, help="evaluation batch size")
    p.add_argument("--workers", type=int, help="data-loading processes")
    p.add_argument("--weights", choices=["auto", "model", "ema"], default="auto")
    p.add_argument("--no-throughput", action="store_true", help="skip the images/s measurement")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a data.*, eval.* or run.amp entry of each checkpoint's config, e.g. data.cache=false")
    return p.parse_args(argv)


def _evaluation_config(path: str, cfg: ClsConfig, args: argparse.Namespace) -> ClsConfig:
    """``cfg`` with this evaluation's data, workers, batch size and ``--set`` overrides."""
    data = dict(path=args.data or cfg.data.path, workers=args.workers if args.workers is not None else cfg.data.workers)
    cfg.data = from_dict(ClsDataConfig, {**vars(cfg.data), **data})
    wrong = [item for item in args.set if not item.strip().startswith(("data.", "eval.", "run.amp="))]
    if wrong:  # the model is already built from the checkpoint: its entries cannot change here
        raise UserError(f"--set {wrong[0]!r}: only data.*, eval.* and run.amp can be set for an evaluation")
    cfg = apply_overrides(cfg, args.set)
    resolve_crop_pct(cfg.data, cfg.model.name)  # a checkpoint's config has it, unless set to null here
    cfg.eval.batch_size = args.batch_size if args.batch_size is not None else cfg.eval.batch_size
    cfg.eval.throughput = not args.no_throughput
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
    if found != list(state["classes"]):
        raise UserError(f"{path}: trained on the classes {list(state['classes'])[:5]}, but {cfg.data.path} has "
                        f"{found[:5]}; evaluate on data with the classes the model was trained on")


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
        cfg, state = read_checkpoint(path, args.weights)
        cfg = _evaluation_config(path, cfg, args)
        # the architecture, unweighted and on the CPU, for the sizes it takes
        check_sizes(args.sizes, build_model(cfg.model, len(state["classes"]), cfg.data.img_size), path)
        _check_classes(path, cfg, state, args.sizes[0])
        read.append((path, cfg, state))
    labels = unique_labels([model_label(cfg.model) for _, cfg, _ in read], args.checkpoint)
    results: Results = {}
    for label, (path, cfg, state) in zip(labels, read):
        model, cfg, state = load_model(path, device, args.weights, (cfg, state))
        mean, std = state.get("mean", (0.5,) * 3), state.get("std", (0.5,) * 3)
        sizes = evaluate_sizes(model, cfg, args.sizes, device, tuple(mean), tuple(std), state["classes"])
        results[label] = {"checkpoint": path, "train_size": cfg.data.img_size, "sizes": sizes}
        text = write_report(results, args.output)  # after each checkpoint: a later failure keeps these
        del model
    print(text)
    print(f"\nwrote {Path(args.output) / 'resolution.json'} and {Path(args.output) / 'resolution.png'}")
    return 0


if __name__ == "__main__":
    run_cli(main)
