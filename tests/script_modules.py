"""The repository's scripts (training entry points, benchmarks) imported by path: they are not a
package. Each is registered in ``sys.modules`` under its file name, so that what it defines can be
pickled into worker processes."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]
# How long a test waits for a script it runs as a subprocess: a limit for hangs only, generous
# because a loaded 2-core machine can take minutes to start torch in each process.
SUBPROCESS_LIMIT_S = 900


def load_script(path: str) -> ModuleType:
    """Execute ``path`` (relative to the repository root, e.g. ``benchmarks/throughput.py``) afresh
    and return it as a module."""
    file = ROOT / path
    spec = importlib.util.spec_from_file_location(file.stem, file)
    module = sys.modules[file.stem] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def torchrun(script: str, args: list[str], log_dir: Path, nproc: int = 2) -> subprocess.CompletedProcess:
    """``script`` (relative to the repository root) under ``torchrun`` with ``nproc`` processes on CPU
    (gloo), one thread each. Every rank's output is also kept in ``log_dir``; if the run fails, the
    assertion shows the end of each rank's stderr (where a process killed by a signal left its last
    words) as well as torchrun's own."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "--log-dir", str(log_dir), "--tee", "3", str(ROOT / script), *args]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=SUBPROCESS_LIMIT_S)
    if proc.returncode != 0:
        ranks = [f"--- {p.relative_to(log_dir)}:\n{p.read_text(errors='replace')[-2000:]}"
                 for p in sorted(Path(log_dir).rglob("stderr.log"))]
        raise AssertionError("\n".join([f"torchrun {script} exited with {proc.returncode}", *ranks,
                                         "--- torchrun:", proc.stderr[-2000:]]))
    return proc
