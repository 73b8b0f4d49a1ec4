"""What the kernel modules share: Triton's interpreter switch, the launch wrapper that lets
``torch.compile`` see the kernels, and the GPU's size."""
from __future__ import annotations

import functools
import os

import torch

# Triton's interpreter (CPU tests) is chosen when the kernels are defined, at import: read it once
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def traceable(kernel):
    """``kernel`` as the body of a ``torch.library.triton_op`` launches it: compiled, the launch is
    traced into the graph and issued by the compiled code itself, without a Python operator call
    per launch; eager, it is the kernel. The interpreter's kernels are launched as they are."""
    return kernel if INTERPRET else torch.library.wrap_triton(kernel)


@functools.lru_cache(maxsize=None)
def multiprocessors(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (4 elsewhere: the interpreter's tests)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
