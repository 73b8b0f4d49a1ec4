"""What ``vitpe.evaluate`` writes: a table per metric (rows: checkpoints, columns: test sizes, the
training size marked), ``resolution.json`` and ``resolution.png``, for each task's metric.

A result is ``{"checkpoint", "task", "train_size", "sizes": {size: {metric: value, ...}}}``, sizes
keyed by their string (pixels, or for segmentation scales of each image's size); ``task``
defaults to classification (the files of earlier runs have none).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

# label -> {"checkpoint", "task", "train_size", "sizes": {size: {metric: value, n, skipped, ...}}}
Results = dict[str, dict[str, Any]]
# per task: the key of its headline metric, how the table and the plot name it, the x axis, and the
# factor to percent (COCO's AP is a fraction, -1 where undefined)
METRICS: dict[str, tuple[str, str, str, float]] = {
    "classification": ("top1", "top-1 (%)", "test resolution (px)", 1.0),
    "segmentation": ("mIoU", "mIoU (%)", "test scale (of each image's size)", 1.0),
    "detection": ("AP", "COCO AP (%)", "shorter side (px)", 100.0)}


def task_of(results: Results) -> str:
    """The one task of ``results`` (classification for results that do not say)."""
    tasks = {r.get("task", "classification") for r in results.values()} or {"classification"}
    if len(tasks) > 1:
        raise ValueError(f"results of several tasks in one report: {sorted(tasks)}")
    return tasks.pop()


def unique_labels(labels: Sequence[str], paths: Sequence[str]) -> list[str]:
    """Strategy names, with the run folder added where two checkpoints share a strategy (and a
    number where even that repeats)."""
    named = [f"{lab} ({Path(p).parent.name})" if labels.count(lab) > 1 else lab for lab, p in zip(labels, paths)]
    return [lab if named[:i].count(lab) == 0 else f"{lab} #{named[:i].count(lab) + 1}" for i, lab in enumerate(named)]


def _value(v: dict[str, Any], key: str, factor: float) -> float | None:
    """A size's metric in the table's units; None where it is missing or undefined (COCO's -1, NaN)."""
    x = v.get(key)
    if x is None or x != x or (factor != 1.0 and x < 0):
        return None
    return x * factor


def markdown_table(results: Results, key: str | None = None, fmt: str = "{:.1f}", factor: float | None = None) -> str:
    """Rows: checkpoints; columns: sizes (the training size marked with *); ``key``: the metric
    (default: the task's headline), times ``factor`` (default: the headline's, for the headline)."""
    head_key, _, _, head_factor = METRICS[task_of(results)]
    key = key or head_key
    factor = factor if factor is not None else head_factor if key == head_key else 1.0
    rows = {label: {float(s): v for s, v in r["sizes"].items()} for label, r in results.items()}  # JSON keys: str
    names = {float(s): str(s) for r in results.values() for s in r["sizes"]}
    sizes = sorted(names)
    train = {float(r["train_size"]) for r in results.values() if r.get("train_size") is not None}
    head = ["strategy"] + [f"{names[s]}*" if s in train else names[s] for s in sizes]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, row in rows.items():
        cells = []
        for s in sizes:
            value = _value(row[s], key, factor) if s in row else None
            cells.append(fmt.format(value) if value is not None else
                         "OOM" if s in row and "error" in row[s] else "-")
        lines.append("| " + " | ".join([label] + cells) + " |")
    return "\n".join(lines)


def plot(results: Results, path: str | Path, title: str | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key, name, axis, factor = METRICS[task_of(results)]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, r in results.items():
        row = {float(s): _value(v, key, factor) for s, v in r["sizes"].items()}
        xs = sorted(s for s, v in row.items() if v is not None)  # not the sizes that failed
        ax.plot(xs, [row[s] for s in xs], marker="o", label=label)
    for t in sorted({float(r["train_size"]) for r in results.values() if r.get("train_size") is not None}):
        ax.axvline(t, color="gray", linestyle="--", linewidth=1)
    ax.set(xlabel=axis, ylabel=name, title=title or f"{name.split(' (')[0]} against {axis.split(' (')[0]}")
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
    task = task_of(results)
    _, name, axis, _ = METRICS[task]
    text = f"{name} by {axis.split(' (')[0]} (* = training size)\n\n" + markdown_table(results)
    if task == "detection":
        text += "\n\nCOCO AP50 (%) by shorter side\n\n" + markdown_table(results, "AP50", factor=100.0)
    if any("img_per_s" in v for r in results.values() for v in r["sizes"].values()):
        text += "\n\nthroughput (images/s) by test resolution\n\n" + markdown_table(results, "img_per_s", "{:.0f}")
    skips = {label: max(v.get("skipped", 0) for v in r["sizes"].values()) for label, r in results.items() if r["sizes"]}
    for label, n in skips.items():
        if n:
            text += f"\n\n{label}: {n} unreadable validation image(s) skipped at each size (named in the log)"
    for label, r in results.items():
        for size, v in r["sizes"].items():
            if "error" in v:
                at = f"scale {size}" if task == "segmentation" else f"{size}px"
                text += f"\n\n{label}, {at}: {v['error']}"
    return text


__all__ = ["METRICS", "Results", "markdown_table", "plot", "task_of", "unique_labels", "write_report"]
