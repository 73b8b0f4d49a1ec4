"""Run a test module's ``compare('cpu')`` in Triton's interpreter, in a subprocess: the interpreter
is chosen when the kernels are defined (at import), so it cannot be switched on in this process."""
from __future__ import annotations

import os
import subprocess
import sys
from script_modules import ROOT, SUBPROCESS_LIMIT_S


def run_compare_in_interpreter(test_module: str, **kwargs: object) -> None:
    """Import ``tests/<test_module>.py`` with ``TRITON_INTERPRET=1`` and call its ``compare('cpu',
    **kwargs)`` (literal arguments); fail with the subprocess's error output unless it finishes."""
    call = ", ".join(["'cpu'", *(f"{k}={v!r}" for k, v in kwargs.items())])
    code = f"import sys; sys.path.insert(0, 'tests'); from {test_module} import compare; compare({call}); print('ok')"
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=SUBPROCESS_LIMIT_S)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def opcheck_utils(device: str) -> tuple[str, ...]:
    """What ``torch.library.opcheck`` checks of a ``triton_op``: its schema and autograd
    registration everywhere; on a GPU also its shape-only (fake) version, which runs the operator's
    body with the launches skipped (the interpreter's kernels cannot be skipped, so not on CPU)."""
    return ("test_schema", "test_autograd_registration") + (("test_faketensor",) if device != "cpu" else ())
