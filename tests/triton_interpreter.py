"""Run a test module's ``compare('cpu')`` in Triton's interpreter, in a subprocess: the interpreter
is chosen when the kernels are defined (at import), so it cannot be switched on in this process."""
from __future__ import annotations

import math
import os
import subprocess
import sys

import torch
import torch.nn.functional as F
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


class GeluPoints:
    """Float32 points spread evenly over [-12, 12] in ``shape`` on ``device`` (``x``, requiring a
    gradient), for the kernels' exact GELU: ``check`` holds a GELU of ``x`` to float64's within
    1e-6 and the gradient of its sum to the GELU's derivative within 2e-6, absolute (torch's float32
    GELU is off by up to 1.2e-6; a float32 step at 12 is 9.5e-7)."""

    def __init__(self, shape: tuple[int, ...], device: str) -> None:
        n = math.prod(shape)
        self.x = torch.linspace(-12, 12, n, dtype=torch.float64).float().reshape(shape).to(device).requires_grad_()
        z = self.x.detach().double().cpu().requires_grad_()  # the float32 inputs, exactly
        gelu = F.gelu(z)
        self.slope = torch.autograd.grad(gelu.sum(), z)[0]
        self.gelu = gelu.detach()

    def check(self, out: torch.Tensor, what: str = "") -> None:
        torch.testing.assert_close(out.detach().double().cpu(), self.gelu, atol=1e-6, rtol=0,
                                   msg=lambda m: f"GELU{what}: {m}")
        grad = torch.autograd.grad(out.sum(), self.x)[0]
        torch.testing.assert_close(grad.double().cpu(), self.slope, atol=2e-6, rtol=0,
                                   msg=lambda m: f"GELU's derivative{what}: {m}")
