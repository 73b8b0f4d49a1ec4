"""Rotary q and k straight out of the fused qkv projection, with the tables' gradient, in Triton.

A ViT block's attention reads ``q, k, v`` as views of the ``(B, T, 3, heads, D)`` projection. Rotating
q and k with torch operators adds a pass over them in the forward, and in the backward one pass to
rotate the gradients back, one to sum the tables' gradient over the batch (``rope_mixed`` learns its
frequencies) and one to put dq, dk and dv back together: about 4x the memory traffic of the
unrotated block. Here:

- the forward reads the projection once and writes rotated q, k and a copy of v for the attention;
  with no gradient to take (inference), it writes q and k alone and v stays a view of the
  projection, as the unrotated attention takes it;
- the backward reads the attention's three gradients and q, k once, writes the projection's
  gradient ``(B, T, 3, heads, D)`` whole, and sums the tables' gradient over its share of the batch
  (per-program partial sums, added up afterwards: the result does not depend on scheduling).

Rotation in the rotate-half layout of ``pos.functional.apply_rope``: ``(x1, x2)`` the two halves
of a head, ``y1 = x1 cos1 - x2 sin1`` and ``y2 = x2 cos2 + x1 sin2``. Computed in float32, returned
in the projection's dtype.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

from ._triton import INTERPRET, forward_op, kernel_op, multiprocessors, traceable

try:
    import triton
    import triton.language as tl
except ImportError:  # torch builds without Triton keep the torch rotation
    triton = None

ENABLED = os.environ.get("VITPE_TRITON", "1") != "0"
BLOCK_T, NUM_WARPS = 32, 4  # positions per program; each program takes one head of one image
BWD_WAVES = 8  # backward programs per multiprocessor, when the tables' gradient is summed (swept: 4-64)
V_VIEW = 1  # without gradients, v as a view of the projection (1) or copied by the forward kernel (0)


def available(qkv: Tensor, cos: Tensor) -> bool:
    """Whether the kernels take ``qkv`` ``(B, T, 3, heads, D)`` and tables ``(heads or 1, T, D)``."""
    return (ENABLED and triton is not None and (qkv.is_cuda or INTERPRET) and qkv.dim() == 5
            and qkv.shape[2] == 3 and qkv.shape[-1] % 2 == 0 and cos.dim() == 3
            and cos.shape[-2:] == (qkv.shape[1], qkv.shape[-1]) and cos.shape[0] in (1, qkv.shape[3])
            and qkv.dtype in (torch.float16, torch.bfloat16, torch.float32))


if triton is not None:
    @triton.jit
    def _halves(ptr, offs_t, stride_t, offs_d, HALF, mask):
        """The two halves of a head, ``(BLOCK_T, BLOCK_D)`` each, in float32."""
        p = ptr + offs_t[:, None] * stride_t + offs_d[None, :]
        return (tl.load(p, mask=mask, other=0.0).to(tl.float32),
                tl.load(p + HALF, mask=mask, other=0.0).to(tl.float32))

    @triton.jit
    def _store_halves(ptr, offs_t, stride_t, offs_d, HALF, mask, a, b):
        p = ptr + offs_t[:, None] * stride_t + offs_d[None, :]
        tl.store(p, a.to(ptr.dtype.element_ty), mask=mask)
        tl.store(p + HALF, b.to(ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _fwd_kernel(QKV, COS, SIN, Q, K, V, s_b, s_t, s_3, s_h, c_h, c_t, o_b, o_t, o_h, n_heads, T, HALF,
                    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, COPY_V: tl.constexpr):
        """One block of positions of one (image, head): rotate q and k, copy v (``COPY_V``). ``s_*`` are the
        projection's (image, position, q/k/v, head) strides, ``c_*`` the tables' (head, position)
        ones (``c_h`` 0 when the heads share a table), ``o_*`` the outputs' (image, position, head)."""
        bh = tl.program_id(1)
        b, h = (bh // n_heads).to(tl.int64), bh % n_heads
        offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        offs_d = tl.arange(0, BLOCK_D)
        mask = (offs_t < T)[:, None] & (offs_d < HALF)[None, :]
        c1, c2 = _halves(COS + h * c_h, offs_t, c_t, offs_d, HALF, mask)
        s1, s2 = _halves(SIN + h * c_h, offs_t, c_t, offs_d, HALF, mask)
        src = QKV + b * s_b + h * s_h
        dst = b * o_b + h * o_h
        q1, q2 = _halves(src, offs_t, s_t, offs_d, HALF, mask)
        _store_halves(Q + dst, offs_t, o_t, offs_d, HALF, mask, q1 * c1 - q2 * s1, q2 * c2 + q1 * s2)
        k1, k2 = _halves(src + s_3, offs_t, s_t, offs_d, HALF, mask)
        _store_halves(K + dst, offs_t, o_t, offs_d, HALF, mask, k1 * c1 - k2 * s1, k2 * c2 + k1 * s2)
        if COPY_V:
            v1, v2 = _halves(src + 2 * s_3, offs_t, s_t, offs_d, HALF, mask)
            _store_halves(V + dst, offs_t, o_t, offs_d, HALF, mask, v1, v2)

    @triton.jit
    def _bwd_kernel(QKV, COS, SIN, DQ, DK, DV, DQKV, PART, s_b, s_t, s_3, s_h, c_h, c_t,
                    gq_b, gq_t, gq_h, gk_b, gk_t, gk_h, gv_b, gv_t, gv_h, n_heads, B, T, HALF, per_prog,
                    TABLE_GRAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
        """One block of positions of one head, over images ``per_prog * program_id(2)`` onwards:
        rotate dq and dk back, write them and dv into ``DQKV`` (the projection's layout, contiguous),
        and with ``TABLE_GRAD`` store this program's sums over its images of the tables' gradients
        into ``PART`` ``(programs along images, 2, heads, T, 2 * HALF)`` (cos, then sin)."""
        h = tl.program_id(1)
        offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        offs_d = tl.arange(0, BLOCK_D)
        mask = (offs_t < T)[:, None] & (offs_d < HALF)[None, :]
        c1, c2 = _halves(COS + h * c_h, offs_t, c_t, offs_d, HALF, mask)
        s1, s2 = _halves(SIN + h * c_h, offs_t, c_t, offs_d, HALF, mask)
        a_c1 = tl.zeros((BLOCK_T, BLOCK_D), tl.float32)
        a_c2, a_s1, a_s2 = a_c1, a_c1, a_c1
        D = 2 * HALF
        g_t = 3 * n_heads * D  # DQKV's strides
        first = tl.program_id(2) * per_prog
        for i in range(0, per_prog):
            b = (first + i).to(tl.int64)
            ok = mask & (b < B)
            src = QKV + b * s_b + h * s_h
            dst = DQKV + b * T * g_t + h * D
            dq1, dq2 = _halves(DQ + b * gq_b + h * gq_h, offs_t, gq_t, offs_d, HALF, ok)
            _store_halves(dst, offs_t, g_t, offs_d, HALF, ok, dq1 * c1 + dq2 * s2, dq2 * c2 - dq1 * s1)
            dk1, dk2 = _halves(DK + b * gk_b + h * gk_h, offs_t, gk_t, offs_d, HALF, ok)
            _store_halves(dst + n_heads * D, offs_t, g_t, offs_d, HALF, ok, dk1 * c1 + dk2 * s2, dk2 * c2 - dk1 * s1)
            dv1, dv2 = _halves(DV + b * gv_b + h * gv_h, offs_t, gv_t, offs_d, HALF, ok)
            _store_halves(dst + 2 * n_heads * D, offs_t, g_t, offs_d, HALF, ok, dv1, dv2)
            if TABLE_GRAD:
                q1, q2 = _halves(src, offs_t, s_t, offs_d, HALF, ok)
                k1, k2 = _halves(src + s_3, offs_t, s_t, offs_d, HALF, ok)
                a_c1 += dq1 * q1 + dk1 * k1
                a_c2 += dq2 * q2 + dk2 * k2
                a_s1 -= dq1 * q2 + dk1 * k2
                a_s2 += dq2 * q1 + dk2 * k1
        if TABLE_GRAD:
            part = PART + ((tl.program_id(2) * 2 * n_heads + h) * T).to(tl.int64) * D
            _store_halves(part, offs_t, D, offs_d, HALF, mask, a_c1, a_c2)
            _store_halves(part + n_heads * T * D, offs_t, D, offs_d, HALF, mask, a_s1, a_s2)


def _table_strides(cos: Tensor) -> tuple[int, int]:
    return (cos.stride(0) if cos.shape[0] > 1 else 0), cos.stride(1)


def _block_d(D: int) -> int:
    return triton.next_power_of_2(D // 2)


def _forward(qkv: Tensor, cos: Tensor, sin: Tensor, copy_v: bool) -> list[Tensor]:
    """Rotated q and k (and with ``copy_v`` a copy of v), each ``(B, heads, T, D)``, stored
    position-major."""
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    cos, sin = cos.contiguous(), sin.contiguous()
    B, T, _, H, D = qkv.shape
    out = [torch.empty(B, T, H, D, device=qkv.device, dtype=qkv.dtype) for _ in range(3 if copy_v else 2)]
    q, k = out[:2]
    traceable(_fwd_kernel)[(triton.cdiv(T, BLOCK_T), B * H)](  # without copy_v, V (k) is never written
        qkv, cos, sin, q, k, out[-1], qkv.stride(0), qkv.stride(1), qkv.stride(2), qkv.stride(3),
        *_table_strides(cos), q.stride(0), q.stride(1), q.stride(2), H, T, D // 2, BLOCK_T=BLOCK_T,
        BLOCK_D=_block_d(D), COPY_V=copy_v, num_warps=NUM_WARPS)
    return [t.transpose(1, 2) for t in out]


def rope_qkv_forward(qkv: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``qkv`` ``(B, T, 3, heads, D)`` (any strides, the last contiguous), tables ``(heads or 1, T,
    D)`` -> rotated q, rotated k and v, each ``(B, heads, T, D)``, stored position-major."""
    q, k, v = _forward(qkv, cos, sin, copy_v=True)
    return q, k, v


def rope_qk_forward(qkv: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """``rope_qkv_forward`` without v: rotated q and k alone (no gradient is taken through them)."""
    q, k = _forward(qkv, cos, sin, copy_v=False)
    return q, k


def rope_qkv_backward(dq: Tensor, dk: Tensor, dv: Tensor, qkv: Tensor, cos: Tensor, sin: Tensor,
                      table_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The projection's gradient ``(B, T, 3, heads, D)`` (contiguous) and, with ``table_grad``, the
    tables' gradients in float32, shaped as the tables (summed over heads where they are shared);
    otherwise two empty tensors."""
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    cos, sin = cos.contiguous(), sin.contiguous()
    dq, dk, dv = (g if g.stride(-1) == 1 else g.contiguous() for g in (dq, dk, dv))
    B, T, _, H, D = qkv.shape
    dqkv = torch.empty(B, T, 3, H, D, device=qkv.device, dtype=qkv.dtype)
    t_blocks = triton.cdiv(T, BLOCK_T)
    # with the tables' gradient, each program sums a share of the images: enough programs to fill
    # the GPU a few times over; without it, one image each
    chunks = max(1, min(B, BWD_WAVES * multiprocessors(qkv.device) // (t_blocks * H))) if table_grad else B
    per_prog = triton.cdiv(B, chunks)
    chunks = triton.cdiv(B, per_prog)
    part = torch.empty((chunks, 2, H, T, D) if table_grad else (1,), device=qkv.device, dtype=torch.float32)
    traceable(_bwd_kernel)[(t_blocks, H, chunks)](
        qkv, cos, sin, dq, dk, dv, dqkv, part, qkv.stride(0), qkv.stride(1), qkv.stride(2), qkv.stride(3),
        *_table_strides(cos), dq.stride(0), dq.stride(2), dq.stride(1), dk.stride(0), dk.stride(2), dk.stride(1),
        dv.stride(0), dv.stride(2), dv.stride(1), H, B, T, D // 2, per_prog, TABLE_GRAD=table_grad,
        BLOCK_T=BLOCK_T, BLOCK_D=_block_d(D), num_warps=NUM_WARPS)
    if not table_grad:
        empty = cos.new_empty(0, dtype=torch.float32)
        return dqkv, empty, empty.clone()
    # two separate tensors (an operator's outputs may not be views of one another)
    dcos, dsin = part[:, 0].sum(0), part[:, 1].sum(0)  # (H, T, D) each
    if cos.shape[0] == 1:
        dcos, dsin = dcos.sum(0, keepdim=True), dsin.sum(0, keepdim=True)
    return dqkv, dcos, dsin


def _setup(ctx, inputs, output) -> None:
    qkv, cos, sin = inputs
    ctx.save_for_backward(qkv, cos, sin)
    ctx.table_grad = bool(ctx.needs_input_grad[1] or ctx.needs_input_grad[2])


def _grads(ctx, dq, dk, dv, backward) -> tuple:
    qkv, cos, sin = ctx.saved_tensors
    dq, dk, dv = (torch.zeros(qkv.shape[0], qkv.shape[3], qkv.shape[1], qkv.shape[4], device=qkv.device,
                              dtype=qkv.dtype) if g is None else g for g in (dq, dk, dv))
    dqkv, dcos, dsin = backward(dq, dk, dv, qkv, cos, sin, ctx.table_grad)
    if not ctx.table_grad:
        return dqkv, None, None
    return dqkv, dcos.to(cos.dtype), dsin.to(sin.dtype)


# the operators vitpe::rope_qkv(_backward) when compiled, an autograd.Function eager
_call = kernel_op("rope_qkv", rope_qkv_forward, rope_qkv_backward, _setup, _grads)
# without gradients: the operator vitpe::rope_qk when compiled, the function itself eager
_rope_qk = forward_op("rope_qk", rope_qk_forward)


def rope_qkv(qkv: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``qkv`` ``(B, T, 3, heads, D)`` and rotary tables ``(heads or 1, T, D)`` (rotate-half
    layout, as ``pos.functional.rope_tables`` makes them) -> rotated q, rotated k, and v, each
    ``(B, heads, T, D)``: the result of ``apply_rope`` on the projection's q and k, in one pass.

    When no gradient is taken (inference, ``torch.no_grad``), v is a view of ``qkv`` and the pass
    writes q and k alone: two thirds of the memory traffic."""
    if V_VIEW and not (torch.is_grad_enabled() and (qkv.requires_grad or cos.requires_grad or sin.requires_grad)):
        q, k = _rope_qk(qkv, cos, sin)
        return q, k, qkv[:, :, 2].transpose(1, 2)
    return _call(qkv, cos, sin)
