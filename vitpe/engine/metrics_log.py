"""metrics.jsonl (one JSON object per epoch) and the one-line epoch summary."""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Mapping

from . import distributed as dist

_logger = logging.getLogger(__name__)


class MetricsLog:
    """Appends one JSON line per record to ``path`` on the main process only.

    ``resume_epoch``: lines of epochs at or after it (written by the interrupted run past its last
    checkpoint) are dropped, so a resumed run still has exactly one line per epoch.
    """

    def __init__(self, path: str | Path, resume_epoch: int | None = None) -> None:
        self.path = Path(path)
        self.enabled = dist.is_main()
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_epoch is None:
            self.path.write_text("")
        elif self.path.exists():
            kept = [ln for ln in _records(self.path) if json.loads(ln).get("epoch", -1) < resume_epoch]
            tmp = self.path.with_name(f".{self.path.name}.tmp")  # rewritten atomically: no line lost on a crash
            tmp.write_text("".join(ln + "\n" for ln in kept))
            tmp.replace(self.path)

    def log(self, record: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(dict(record), allow_nan=True) + "\n")

    def read(self) -> list[dict[str, Any]]:
        """Every record written so far (for tests and plots)."""
        return read_metrics(self.path)


def _records(path: Path) -> list[str]:
    """The file's complete lines; a last line cut short (a run killed while writing it) is left
    out, with a warning, instead of failing the resume."""
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    if lines:
        try:
            json.loads(lines[-1])
        except json.JSONDecodeError:
            _logger.warning("%s: its last line is incomplete (a run stopped while writing it); left out", path)
            lines.pop()
    return lines


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(ln) for ln in _records(Path(path))]


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return str(v)
        return f"{v:.3g}" if abs(v) < 1e-2 and v != 0 else f"{v:.4f}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def summary_line(epoch: int, epochs: int, metrics: Mapping[str, Any]) -> str:
    """``epoch 3/10  train_loss 1.2345  val_top1 45.6000  lr 0.000912  time 12.3s``: one line per epoch."""
    width = len(str(epochs))
    parts = [f"epoch {epoch + 1:>{width}}/{epochs}"]
    parts += [f"{k} {v:.1f}s" if k == "time" else f"{k} {_fmt(v)}" for k, v in metrics.items() if k != "epoch"]
    return "  ".join(parts)


__all__ = ["MetricsLog", "read_metrics", "summary_line"]
