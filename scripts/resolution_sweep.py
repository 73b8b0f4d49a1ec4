"""Train one classifier per positional strategy under one recipe, then compare them across test
resolutions (one table, one plot). The number of epochs is the same for every strategy and is
chosen to fit a time budget, from a short timing probe of each strategy's training step.

    PYTHONPATH=. python scripts/resolution_sweep.py --config configs/cls/cifar10.yaml \\
        --set data.path=.carry/cifar10 --budget-s 240 --sizes 16,24,32,40,48,56,64 --output runs/sweep
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Sequence

import torch

import train_cls
from vitpe import evaluate as ev
from vitpe.cli import parse_sizes, resolve_config, run_cli
from vitpe.data.classification import is_synthetic
from vitpe.data.folder import scan_folder
from vitpe.engine import distributed as dist
from vitpe.engine.classification import ClsConfig, build_model
from vitpe.engine.loop import autocast
from vitpe.engine.metrics_log import read_metrics
from vitpe.engine.optim import build_optimizer

STRATEGIES = "none,sincos2d,learned,peg,mixffn,rope_axial,rope_mixed,rpb"
log = logging.getLogger("sweep")


def step_seconds(cfg: ClsConfig, device: torch.device, steps: int = 10) -> float:
    """Seconds of one training step at the configured batch (random data; warm-up excluded)."""
    model = build_model(cfg.model, 10, cfg.data.img_size).to(device).train()
    opt = build_optimizer(model, cfg.optim)
    x = torch.randn(cfg.data.batch_size, 3, cfg.data.img_size, cfg.data.img_size, device=device)
    y = torch.randint(0, 10, (cfg.data.batch_size,), device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for i in range(steps + 3):
        if i == 3:
            sync()
            start = time.perf_counter()
        with autocast(device, cfg.run.amp):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    sync()
    return (time.perf_counter() - start) / steps


def choose_epochs(cfg: ClsConfig, strategies: list[str], device: torch.device, budget_s: float,
                  lo: int, hi: int) -> tuple[int, dict[str, float]]:
    """The largest epoch count (in [lo, hi]) whose estimated total training time fits ``budget_s``."""
    n = cfg.data.synthetic_train if is_synthetic(cfg.data) else len(scan_folder(cfg.data.path, cfg.data.train_split)[1])
    steps = max(1, n // cfg.data.batch_size)
    per_epoch = {}
    for pos in strategies:
        cfg.model.pos = pos
        # x1.3 for data loading, validation and worker start-up, measured on the first runs of this sweep
        per_epoch[pos] = 1.3 * steps * step_seconds(cfg, device) + 1.0
    total = sum(per_epoch.values())
    return max(lo, min(hi, int(budget_s // total))), per_epoch


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/cls/cifar10.yaml")
    p.add_argument("--strategies", default=STRATEGIES, help="comma-separated strategies, trained in this order")
    p.add_argument("--budget-s", type=float, default=240, help="training time for all strategies together")
    p.add_argument("--min-epochs", type=int, default=1)
    p.add_argument("--max-epochs", type=int, default=100)
    p.add_argument("--sizes", type=parse_sizes, default=[16, 24, 32, 40, 48, 56, 64])
    p.add_argument("--output", default="runs/sweep")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides for every run")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    cfg = resolve_config(ClsConfig, argparse.Namespace(config=args.config, set=args.set))
    device = dist.resolve_device(cfg.run.device)
    epochs, per_epoch = choose_epochs(cfg, strategies, device, args.budget_s, args.min_epochs, args.max_epochs)
    log.info("estimated seconds per epoch: %s -> %d epochs each",
             {k: round(v, 2) for k, v in per_epoch.items()}, epochs)
    out, summary = Path(args.output), {"epochs": epochs, "estimated_epoch_s": per_epoch, "runs": {},
                                       "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                                       "torch": torch.__version__}
    for pos in strategies:
        start = time.time()
        train_cls.main(["--config", args.config, "--pos", pos, "--epochs", str(epochs), "--output", str(out / pos),
                        *[a for s in args.set for a in ("--set", s)], "--set", "eval.sizes=[]"])
        summary["runs"][pos] = {"train_s": time.time() - start, "metrics": read_metrics(out / pos / "metrics.jsonl")}
        log.info("%s trained in %.0f s", pos, summary["runs"][pos]["train_s"])
    start = time.time()
    ev.main(["--checkpoint", *[str(out / p / "checkpoint.pt") for p in strategies], "--output", str(out),
             "--sizes", ",".join(map(str, args.sizes)), "--device", str(device)])
    summary["evaluate_s"] = time.time() - start
    (out / "sweep.json").write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    run_cli(main)
