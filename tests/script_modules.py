"""The repository's scripts (training entry points, benchmarks) imported by path: they are not a
package. Each is registered in ``sys.modules`` under its file name, so that what it defines can be
pickled into worker processes."""
from __future__ import annotations

import importlib.util
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
