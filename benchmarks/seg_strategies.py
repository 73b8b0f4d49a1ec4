"""Fine-tune one segmentation recipe with several positional strategies side by side, then compare them.

    python benchmarks/seg_strategies.py --config configs/seg/camvid.yaml --pos mixffn,sincos2d,learned,peg \
        --output runs/camvid_pos --epochs 60 [--set optim.lr=1e-3 ...]
    python benchmarks/seg_strategies.py ... --time-budget 150     # epochs chosen to fit 150 s of training
    python benchmarks/seg_strategies.py --report runs/camvid_pos  # table and figure from finished runs

One ``train_seg.py`` process per strategy, all at once on the same device: a small model leaves a
GPU mostly idle, so several share it well. With ``--time-budget`` a two-epoch probe of all of them
running together measures the time of an epoch, and one epoch count, the same for every strategy
(one recipe), is chosen to fit. Writes ``summary.md``, ``summary.json`` and ``comparison.png``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from vitpe.cli import run_cli  # noqa: E402
from vitpe.engine.runs import launch_runs  # noqa: E402
COLUMNS = [("whole", "0.5"), ("whole", "1.0"), ("whole", "1.5"), ("whole", "ms"), ("slide", "1.0"), ("slide", "ms")]


def launch(strategies: list[str], passthrough: list[str], out: Path, epochs: int, extra: list[str]) -> float:
    """Run every strategy at once; returns the wall time. Logs go to ``out/<pos>/train.log``."""
    return launch_runs(ROOT / "train_seg.py", strategies, passthrough, out, epochs, extra)


def probe(strategies: list[str], passthrough: list[str], out: Path) -> float:
    """Seconds of one training epoch with every strategy running at once (the second epoch's time)."""
    extra = ["--set", "eval.interval=1000", "--set", "eval.modes=[whole]", "--set", "eval.scales=[1.0]",
             "--set", "eval.figure_images=0"]
    launch(strategies, passthrough, out / "probe", 2, extra)
    times = [json.loads((out / "probe" / p / "metrics.jsonl").read_text().splitlines()[1])["time"] for p in strategies]
    return max(times)


def report(out: Path) -> str:
    """summary.md / summary.json / comparison.png from the runs under ``out``."""
    runs = {}
    for res in sorted(out.glob("*/results.json")):
        if res.parent.name != "probe":
            metrics = [json.loads(ln) for ln in (res.parent / "metrics.jsonl").read_text().splitlines() if ln.strip()]
            runs[res.parent.name] = {"results": json.loads(res.read_text()), "metrics": metrics}
    if not runs:
        raise SystemExit(f"error: no */results.json under {out}")
    head = "| strategy | " + " | ".join(f"{m} {s}" for m, s in COLUMNS) + " | mAcc (whole 1.0) | aAcc (whole 1.0) |"
    rows = [head, "|---" * (len(COLUMNS) + 3) + "|"]
    for pos, r in runs.items():
        sc = r["results"]["scales"]
        cells = [f"{sc[m][s]['mIoU']:.1f}" if m in sc and s in sc[m] else "-" for m, s in COLUMNS]
        rows.append(f"| {pos} | " + " | ".join(cells) + f" | {r['results']['mAcc']:.1f} | {r['results']['aAcc']:.1f} |")
    table = "\n".join(rows)
    (out / "summary.md").write_text(table + "\n")
    (out / "summary.json").write_text(json.dumps({p: r["results"] | {"metrics": r["metrics"]} for p, r in runs.items()},
                                                 indent=1))
    plot(runs, out / "comparison.png")
    return table


def plot(runs: dict, path: Path) -> None:
    """Left: mIoU per strategy for each inference mode and scale; right: training loss per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 4.2), gridspec_kw={"width_ratios": [2, 1]})
    width = 0.8 / len(runs)
    x = np.arange(len(COLUMNS))
    for i, (pos, r) in enumerate(runs.items()):
        sc = r["results"]["scales"]
        vals = [sc.get(m, {}).get(s, {}).get("mIoU") or 0.0 for m, s in COLUMNS]
        ax.bar(x + (i - (len(runs) - 1) / 2) * width, vals, width, label=pos)
        ax2.plot([m["epoch"] + 1 for m in r["metrics"]], [m["train_loss"] for m in r["metrics"]], marker=".", label=pos)
    ax.set_xticks(x, [f"{m}\nscale {s}" for m, s in COLUMNS])
    ax.set_ylabel("val mIoU (%)")
    crop = next(iter(runs.values()))["results"]["crop_size"]
    ax.set_title(f"inference mode and test scale (training crop {crop}x{crop})")
    lo = min(v for r in runs.values() for per in r["results"]["scales"].values() for v in
             [m["mIoU"] for m in per.values() if m["mIoU"] is not None])
    ax.set_ylim(max(0, lo - 10), None)
    ax.legend(fontsize=8)
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("training loss (cross-entropy)")
    ax2.set_title("training")
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pos", default="mixffn,sincos2d,learned,peg", help="strategies, comma-separated")
    p.add_argument("--output", default="runs/seg_strategies")
    p.add_argument("--epochs", type=int, help="epochs of every run")
    p.add_argument("--time-budget", type=float, help="seconds of training to fill (probes the epoch time first)")
    p.add_argument("--report", metavar="DIR", help="only write the comparison of finished runs in DIR")
    args, passthrough = p.parse_known_args(argv)  # everything else goes to train_seg.py
    if args.report:
        print(report(Path(args.report)))
        return
    out, strategies = Path(args.output), [s.strip() for s in args.pos.split(",") if s.strip()]
    epochs = args.epochs
    if args.time_budget:
        per_epoch = probe(strategies, passthrough, out)
        epochs = max(1, int(args.time_budget // per_epoch))
        print(f"probe: {per_epoch:.2f} s per epoch with {len(strategies)} runs at once -> {epochs} epochs")
    if not epochs:
        raise SystemExit("error: give --epochs or --time-budget")
    wall = launch(strategies, passthrough, out, epochs, [])
    print(f"{len(strategies)} runs of {epochs} epochs in {wall:.0f} s")
    print(report(out))


if __name__ == "__main__":
    run_cli(main)
