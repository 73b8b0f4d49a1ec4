"""What the kernel modules share: Triton's interpreter switch, the launch wrapper that lets
``torch.compile`` see the kernels, the GPU's size, and the differentiable call that serves a
module's kernels compiled and eager."""
from __future__ import annotations

import functools
import os
from typing import Any, Callable

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


def kernel_op(name: str, forward: Callable[..., Any], backward: Callable[..., Any],
              setup: Callable[[Any, tuple, Any], None], grads: Callable[..., tuple],
              non_differentiable: tuple[int, ...] = ()) -> Callable[..., Any]:
    """A kernel module's forward and backward as one differentiable call.

    Compiled, it is the operator ``vitpe::<name>`` (a ``torch.library.triton_op``, whose kernel
    launches the compiled code issues itself), its backward the operator ``vitpe::<name>_backward``.
    Eager, it is an ``autograd.Function`` calling the same functions, without the operator
    dispatch's overhead per call (larger than the kernels at small batches). ``setup(ctx, inputs,
    output)`` saves what the backward needs; ``grads(ctx, *output_grads, backward)`` calls
    ``backward`` and returns the inputs' gradients; ``non_differentiable``: outputs (by position)
    that get no gradient."""
    op = torch.library.triton_op(f"vitpe::{name}", mutates_args=())(forward)
    op_backward = torch.library.triton_op(f"vitpe::{name}_backward", mutates_args=())(backward)
    op.register_autograd(lambda ctx, *out_grads: grads(ctx, *out_grads, op_backward), setup_context=setup)

    class Eager(torch.autograd.Function):
        @staticmethod
        def forward(*args: Any) -> Any:
            return forward(*args)

        @staticmethod
        def setup_context(ctx: Any, inputs: tuple, output: Any) -> None:
            setup(ctx, inputs, output)
            if non_differentiable:
                ctx.mark_non_differentiable(*(output[i] for i in non_differentiable))

        @staticmethod
        def backward(ctx: Any, *out_grads: Any) -> Any:
            return grads(ctx, *out_grads, backward)

    def call(*args: Any) -> Any:
        return op(*args) if torch.compiler.is_compiling() else Eager.apply(*args)

    return call


def forward_op(name: str, forward: Callable[..., Any]) -> Callable[..., Any]:
    """A kernel module's forward alone, for calls through which no gradient is taken: compiled, the
    operator ``vitpe::<name>`` (its launches issued by the compiled code, as ``kernel_op``'s are);
    eager, ``forward`` itself."""
    op = torch.library.triton_op(f"vitpe::{name}", mutates_args=())(forward)

    def call(*args: Any) -> Any:
        return op(*args) if torch.compiler.is_compiling() else forward(*args)

    return call
