"""Several training runs of one script at once, one process per positional strategy.

Small models leave a GPU mostly idle (their steps are bound by kernel launches), so a few runs
share it several times faster than they run one after another. Used by the strategy sweeps.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from ..errors import UserError


def launch_runs(script: str | Path, strategies: Sequence[str], common: Sequence[str], out: Path, epochs: int,
                extra: Sequence[str] = (), threads: int = 2) -> float:
    """Run ``script ... --pos P --epochs N --output out/P`` for every strategy at once; logs go to
    ``out/P/train.log``. Returns the wall time; a failed run is an error naming it and its log."""
    root = Path(script).resolve().parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])),
               OMP_NUM_THREADS=str(threads))  # runs share the CPU: no oversubscription
    start, procs = time.time(), []
    for pos in strategies:
        (out / pos).mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, str(script), *common, "--pos", pos, "--epochs", str(epochs),
               "--output", str(out / pos), *extra]
        log = open(out / pos / "train.log", "w")
        procs.append((pos, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log))
    failed = []
    for pos, proc, log in procs:
        if proc.wait() != 0:
            failed.append(pos)
        log.close()
    if failed:
        last = {pos: (out / pos / "train.log").read_text().strip().splitlines()[-1:] for pos in failed}
        raise UserError(f"training failed for {failed} (logs in {out}/<strategy>/train.log): {last}")
    return time.time() - start


__all__ = ["launch_runs"]
