"""Checkpoints that hold plain data only, written atomically, loaded without running code.

A checkpoint is a dict of tensors, numbers, strings, lists and dicts (the resolved config goes in
as ``to_dict(cfg)``). ``torch.load(weights_only=True)`` refuses anything else, so a file that
carries code is reported, never executed. RNG states are stored as tensors for the same reason.
"""
from __future__ import annotations

import os
import pickle
import random
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from ..errors import CheckpointError, DataError


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write ``state`` to ``path`` atomically: a temp file in the same folder, fsync, then rename
    (and the folder synced, so the rename survives a power loss), so a crash mid-write leaves the
    previous checkpoint intact. Temp files that a killed process left for ``path`` are removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _sync_folder(path.parent)


def _sync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # a platform or file system that cannot open folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; a missing, corrupt or code-carrying file is a
    ``CheckpointError`` naming the file."""
    path = Path(path)
    if path.is_dir():
        inside = " (it holds checkpoint.pt)" if (path / "checkpoint.pt").is_file() else ""
        raise CheckpointError(f"{path} is a folder{inside}: give the checkpoint file, e.g. {path / 'checkpoint.pt'}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
        code = next((ln for ln in lines if "GLOBAL" in ln), None)
        if code is None:
            detail = next((ln for ln in lines if ln.startswith("Unsupported")), "corrupt or not written by torch.save")
            raise CheckpointError(f"{path}: not a readable checkpoint ({detail})") from None
        raise CheckpointError(f"{path}: refused to load: the checkpoint holds objects other than plain data "
                              f"(code or custom classes), which are never executed ({code})") from None
    except Exception as e:  # noqa: BLE001 - a file torch.load cannot read: RuntimeError, EOFError, KeyError...
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint ({msg})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a dict checkpoint, got {type(state).__name__}")
    return state


def rng_state() -> dict[str, Tensor]:
    """Python, NumPy, torch and CUDA generator states, as tensors (safe for ``weights_only``)."""
    version, internal, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": torch.tensor([version, *internal], dtype=torch.int64),
        "python_gauss": torch.tensor([float("nan") if gauss is None else gauss], dtype=torch.float64),
        "numpy": torch.from_numpy(np.asarray(keys, dtype=np.int64).copy()),
        "numpy_extra": torch.tensor([pos, has_gauss], dtype=torch.int64),
        "numpy_gauss": torch.tensor([cached], dtype=torch.float64),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: dict[str, Tensor]) -> None:
    """Restore what ``rng_state`` captured (CUDA only where it was captured and is available)."""
    py = state["python"].tolist()
    gauss = float(state["python_gauss"][0])
    random.setstate((int(py[0]), tuple(int(x) for x in py[1:]), None if gauss != gauss else gauss))
    pos, has_gauss = (int(x) for x in state["numpy_extra"])
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), pos, has_gauss,
                         float(state["numpy_gauss"][0])))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        cuda = list(state["cuda"].cpu())
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


__all__ = ["check_resumed_classes", "load_checkpoint", "rng_state", "save_checkpoint", "set_rng_state"]


def check_resumed_classes(resumed: dict | None, classes: Sequence[str], path: str) -> None:
    """The data's classes must be the checkpoint's, in order: the head's outputs are its classes, and
    per-class results would otherwise be reported under other names."""
    saved, classes = list((resumed or {}).get("classes") or []), list(classes)
    if saved and saved != classes:
        i = next((i for i, (a, b) in enumerate(zip(saved, classes)) if a != b), min(len(saved), len(classes)))
        raise DataError(f"{path}: its classes are not the checkpoint's ({len(classes)} against {len(saved)}; "
                        f"first difference at index {i}: {classes[i] if i < len(classes) else None!r} against "
                        f"{saved[i] if i < len(saved) else None!r}); resume on the data the run was trained on")
