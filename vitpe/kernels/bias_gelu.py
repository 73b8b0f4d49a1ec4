"""The plain MLP's fc1 bias and exact GELU in one pass each way, in Triton (``IN_MLP = 0`` turns it off).

``Mlp`` computes ``gelu(x W^T + b)``. torch (and inductor's compiled code) write ``h = x W^T + b``
from the matrix product, read it back for the GELU and write ``g``; the backward reads ``dg`` and
``h`` and writes ``dh``, then reads ``dh`` once more to sum the bias gradient over the rows. Here
fc1 is a product without its bias and:

- the forward reads the product once and writes ``g = gelu(h + bias)``;
- the backward is one kernel: it reads ``dg`` and the product once, writes
  ``dh = dg * gelu'(h + bias)`` and sums ``dh`` over its share of the rows into per-program
  partial column sums, added up afterwards (no atomics: the result does not depend on
  scheduling). Each program walks its rows with Triton's software pipeliner loading ``BWD_STAGES
  - 1`` row tiles ahead into shared memory.

A first version (fourth round, docs/performance.md) walked its rows without the pipeliner and
ran its backward at 2.3 TB/s, where inductor's GELU backward alone reaches 3.0; it was removed.
This one is built the same way as the depthwise kernels' pipelined variants. On an H200, compiled,
it takes ViT-S/16's training from 8939 to 9185 img/s and ViT-B/16's from 3499 to 3533, inference
unchanged within 1 % (docs/performance.md, eleventh round; ``throughput.py --kernel-settings ''
'bias_gelu:IN_MLP=0'`` times it against torch's bias and GELU).

GELU is the exact one of ``torch.nn.GELU()``, its normal CDF from ``depthwise._phi``'s polynomial
(``ERF_POLY = 0``: libdevice's ``erf``). Computed in float32, returned in the product's
dtype; the bias gradient is summed in float32 and returned in the bias's dtype.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

from ._triton import INTERPRET, kernel_op, multiprocessors, traceable

try:
    import triton
    import triton.language as tl
except ImportError:  # torch builds without Triton keep torch's bias add and GELU
    triton = None

ENABLED = os.environ.get("VITPE_TRITON", "1") != "0"
IN_MLP = 1  # ``Mlp`` without a mixer takes these kernels for its fc1 bias and exact GELU; 0: torch's
FWD_BLOCK_M, FWD_BLOCK_N, FWD_WARPS = 16, 256, 4  # forward tiles: rows x columns
BWD_BLOCK_M, BWD_BLOCK_N, BWD_WARPS, BWD_STAGES = 32, 128, 4, 3  # backward tiles, row tiles in flight
BWD_WAVES = 4  # backward programs per multiprocessor: each sums the bias gradient over its share of the rows
# the GELU's normal CDF from the depthwise kernels' polynomial (``depthwise._phi``, as accurate as
# torch's float32 GELU) instead of libdevice's ``erf``; 0 restores ``erf``. Measured on an H200
# (docs/performance.md, nineteenth round), compiled ``learned``: ViT-S training / inference 3.3 % /
# 5.5 % faster, ViT-B 2.2 % / 3.0 % (its training 380.8 -> 389.2 TFLOP/s)
ERF_POLY = 1

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def available(x: Tensor, bias: Tensor | None) -> bool:
    """Whether the kernels run for tensors like ``x`` (CUDA, or Triton's interpreter) with a 1-D
    ``bias`` on its device (``bias_gelu`` checks the bias's width against the product's)."""
    return (ENABLED and triton is not None and (x.is_cuda or INTERPRET) and x.dtype in _DTYPES
            and bias is not None and bias.dtype in _DTYPES and bias.dim() == 1 and bias.device == x.device)


if triton is not None:
    from .depthwise import _gelu, _gelu_grad

    @triton.jit
    def _tile(offs_m, offs_n, M, N):
        """Row offsets in int64 (``rows x N`` can pass 2**31) and the tile's mask."""
        return offs_m.to(tl.int64), (offs_m < M)[:, None] & (offs_n < N)[None, :]

    @triton.jit
    def _fwd_kernel(H, BIAS, G, M, N, s_h, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, POLY: tl.constexpr):
        """``g = gelu(h + bias)`` on one ``(BLOCK_M, BLOCK_N)`` tile; ``s_h`` is ``h``'s row stride,
        ``g`` is contiguous."""
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        rows, mask = _tile(offs_m, offs_n, M, N)
        b = tl.load(BIAS + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
        x = tl.load(H + rows[:, None] * s_h + offs_n[None, :], mask=mask, other=0.0).to(tl.float32) + b[None, :]
        tl.store(G + rows[:, None] * N + offs_n[None, :], _gelu(x, POLY).to(G.dtype.element_ty), mask=mask)

    @triton.jit
    def _bwd_kernel(DG, H, BIAS, DH, PART, M, N, s_dg, s_h, per_prog, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, STAGES: tl.constexpr, POLY: tl.constexpr):
        """``dh = dg * gelu'(h + bias)`` on the row tiles ``per_prog * program_id(0)`` onwards of
        one block of columns, and ``PART[program_id(0), n]``: this program's sum of ``dh`` over its
        rows (from the float32 ``dh``). ``s_dg`` and ``s_h`` are row strides, ``dh`` is contiguous.
        Sums are accumulated elementwise over the tiles and reduced over rows once."""
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = offs_n < N
        b = tl.load(BIAS + offs_n, mask=nmask, other=0.0).to(tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        first = tl.program_id(0) * per_prog
        for t in tl.range(0, per_prog, num_stages=STAGES):
            offs_m = (first + t) * BLOCK_M + tl.arange(0, BLOCK_M)
            rows, mask = _tile(offs_m, offs_n, M, N)
            dg = tl.load(DG + rows[:, None] * s_dg + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
            x = tl.load(H + rows[:, None] * s_h + offs_n[None, :], mask=mask, other=0.0).to(tl.float32) + b[None, :]
            dh = dg * _gelu_grad(x, POLY)  # zero outside the tensor: dg is loaded as 0 there
            tl.store(DH + rows[:, None] * N + offs_n[None, :], dh.to(DH.dtype.element_ty), mask=mask)
            acc += dh
        tl.store(PART + tl.program_id(0).to(tl.int64) * N + offs_n, tl.sum(acc, axis=0), mask=nmask)


def _rows(t: Tensor, N: int) -> Tensor:
    """``t`` as ``(rows, N)`` with contiguous rows: a view where the strides allow, else a copy."""
    t = t.reshape(-1, N)
    return t if t.stride(-1) == 1 else t.contiguous()


def bias_gelu_forward(h: Tensor, bias: Tensor) -> Tensor:
    """``h`` ``(..., N)`` and ``bias`` ``(N,)`` -> ``gelu(h + bias)``, a new contiguous tensor in
    ``h``'s dtype."""
    g = torch.empty(h.shape, device=h.device, dtype=h.dtype)
    N = h.shape[-1]
    if g.numel() == 0:
        return g
    h2 = _rows(h, N)
    M = h2.shape[0]
    traceable(_fwd_kernel)[(triton.cdiv(M, FWD_BLOCK_M), triton.cdiv(N, FWD_BLOCK_N))](
        h2, bias.contiguous(), g, M, N, h2.stride(0), BLOCK_M=FWD_BLOCK_M, BLOCK_N=FWD_BLOCK_N,
        POLY=bool(ERF_POLY), num_warps=FWD_WARPS)
    return g


def bias_gelu_backward(dg: Tensor, h: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
    """The gradients of ``h`` (contiguous, ``h``'s shape and dtype) and of ``bias`` (summed over
    all leading dims in float32, returned in float32)."""
    dh = torch.empty(h.shape, device=h.device, dtype=h.dtype)
    N = h.shape[-1]
    if dh.numel() == 0:
        return dh, torch.zeros(N, device=h.device, dtype=torch.float32)
    h2, dg2 = _rows(h, N), _rows(dg, N)
    M = h2.shape[0]
    m_tiles = triton.cdiv(M, BWD_BLOCK_M)
    n_blocks = triton.cdiv(N, BWD_BLOCK_N)
    # each program sums a share of the rows: enough programs to fill the GPU a few times over
    chunks = max(1, min(m_tiles, BWD_WAVES * multiprocessors(h.device) // n_blocks))
    per_prog = triton.cdiv(m_tiles, chunks)
    chunks = triton.cdiv(m_tiles, per_prog)  # none left without rows
    part = torch.empty(chunks, N, device=h.device, dtype=torch.float32)
    traceable(_bwd_kernel)[(chunks, n_blocks)](
        dg2, h2, bias.contiguous(), dh, part, M, N, dg2.stride(0), h2.stride(0), per_prog,
        BLOCK_M=BWD_BLOCK_M, BLOCK_N=BWD_BLOCK_N, STAGES=BWD_STAGES, POLY=bool(ERF_POLY),
        num_warps=BWD_WARPS)
    return dh, part.sum(0)


def _setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _grads(ctx, dg: Tensor, backward) -> tuple[Tensor, Tensor]:
    h, bias = ctx.saved_tensors
    dh, dbias = backward(dg, h, bias)
    return dh, dbias.to(bias.dtype)


# the operators vitpe::bias_gelu(_backward) when compiled, an autograd.Function eager
_call = kernel_op("bias_gelu", bias_gelu_forward, bias_gelu_backward, _setup, _grads)


def bias_gelu(h: Tensor, bias: Tensor) -> Tensor:
    """``h`` ``(..., N)`` (the MLP's first projection without its bias) and ``bias`` ``(N,)`` ->
    ``gelu(h + bias)`` (exact GELU, as ``torch.nn.GELU()``) in ``h``'s dtype, in one pass."""
    if bias.shape != h.shape[-1:]:
        raise ValueError(f"bias_gelu: a bias of shape {tuple(bias.shape)} for inputs {tuple(h.shape)}; "
                         f"it needs ({h.shape[-1]},)")
    return _call(h, bias)
