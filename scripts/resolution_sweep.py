"""Train one classifier per positional strategy under one recipe, then compare them across test
resolutions (one table, one plot, throughput per size).

    PYTHONPATH=. python scripts/resolution_sweep.py --config configs/cls/cifar10.yaml \\
        --set data.path=.carry/cifar10 --deadline-s 180 --output runs/sweep

Every strategy trains at once, one ``train_cls.py`` process each: a ViT-Tiny on 32-px images
leaves a GPU mostly idle (its steps are bound by kernel launches), so eight runs share one GPU
several times faster than they run one after another. The epoch count, the same for every
strategy, is fitted to the deadline from a two-epoch probe of all runs together. Throughput is
measured afterwards, one model at a time, so that the runs do not disturb each other's timing.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Sequence

import torch

from vitpe import evaluate as ev
from vitpe.cli import parse_sizes, resolve_config, run_cli
from vitpe.engine import distributed as dist
from vitpe.engine.classification import ClsConfig, build_model
from vitpe.engine.metrics_log import read_metrics
from vitpe.engine.runs import launch_runs

ROOT = Path(__file__).resolve().parents[1]
STRATEGIES = "none,sincos2d,learned,peg,mixffn,rope_axial,rope_mixed,rpb"
log = logging.getLogger("sweep")


def launch(strategies: list[str], common: list[str], out: Path, epochs: int, extra: list[str]) -> float:
    return launch_runs(ROOT / "train_cls.py", strategies, common, out, epochs, extra)


def probe(strategies: list[str], common: list[str], out: Path) -> tuple[float, float]:
    """Seconds per epoch (with validation) and of start-up (imports, decoding) of every run at
    once, from a one-epoch probe; the first epoch's warm-up makes the estimate err on the safe side."""
    wall = launch(strategies, common, out / "probe", 1, ["--set", "eval.sizes=[]"])
    epoch = max(read_metrics(out / "probe" / p / "metrics.jsonl")[0]["time"] for p in strategies)
    per_epoch = epoch * 1.15  # validation after each epoch
    return per_epoch, max(0.0, wall - per_epoch)


@torch.no_grad()
def throughput(cfg: ClsConfig, strategies: list[str], sizes: list[int], device: torch.device) -> dict:
    """Images/s per strategy and size, one model at a time (random weights: speed needs no training)."""
    out = {}
    for pos in strategies:
        cfg.model.pos = pos
        model = build_model(cfg.model, 10, cfg.data.img_size).to(device).eval()
        out[pos] = {s: ev.throughput(model, s, device, cfg.eval.batch_size, cfg.run.amp, 0.3) for s in sizes}
        del model
    return out


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/cls/cifar10.yaml")
    p.add_argument("--strategies", default=STRATEGIES, help="comma-separated strategies")
    p.add_argument("--epochs", type=int, help="epochs for every strategy (default: fitted to --deadline-s)")
    p.add_argument("--deadline-s", type=float, default=180, help="wall time for the whole sweep")
    p.add_argument("--reserve-s", type=float, default=60, help="of which kept for the evaluation and throughput")
    p.add_argument("--max-epochs", type=int, default=100)
    p.add_argument("--sizes", type=parse_sizes, default=[16, 24, 32, 40, 48, 56, 64])
    p.add_argument("--output", default="runs/sweep")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides for every run")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    start, args = time.time(), parse_args(argv)
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    cfg = resolve_config(ClsConfig, argparse.Namespace(config=args.config, set=args.set))
    device, out = dist.resolve_device(cfg.run.device), Path(args.output)
    common = ["--config", args.config, *[a for s in args.set for a in ("--set", s)]]
    summary = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "strategies": strategies}
    epochs = args.epochs
    if epochs is None:
        per_epoch, startup = probe(strategies, common, out)
        left = args.deadline_s - args.reserve_s - (time.time() - start) - startup
        epochs = max(1, min(args.max_epochs, int(left // per_epoch)))
        summary.update(probe_epoch_s=per_epoch, probe_startup_s=startup)
    log.info("training %d strategies at once for %d epochs", len(strategies), epochs)
    summary.update(epochs=epochs, train_wall_s=launch(strategies, common, out, epochs, [
        "--eval-sizes", ",".join(map(str, args.sizes)), "--set", "eval.throughput=false"]))
    results = {pos: json.loads((out / pos / "resolution.json").read_text())[pos] for pos in strategies}
    speed = throughput(cfg, strategies, args.sizes, device)
    for pos in strategies:
        for s, ips in speed[pos].items():
            results[pos]["sizes"][str(s)]["img_per_s"] = ips
        results[pos]["metrics"] = read_metrics(out / pos / "metrics.jsonl")
    print(ev.write_report(results, out))
    summary["total_wall_s"] = time.time() - start
    (out / "sweep.json").write_text(json.dumps(summary, indent=1))
    log.info("sweep done in %.0f s: %s", summary["total_wall_s"], out)
    return 0


if __name__ == "__main__":
    run_cli(main)
