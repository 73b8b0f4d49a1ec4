"""Fused attention with an additive bias shared by the batch, whose gradient is wanted, in Triton.

``rpb`` adds a learned ``(heads, T, S)`` bias to the logits of every image. torch's fused kernels
either refuse a bias (flash, cuDNN) or, in the memory-efficient kernel, take one at about three
times the cost of attention without it (1.49 against 0.48 ms for a ViT-S block's forward and
backward at batch 256 on an H200). Here:

- the forward is flash attention (online softmax, nothing of size ``T x S`` kept), reading the
  bias tile by tile, and keeps each row's log-sum-exp;
- the backward first sums ``delta = rowsum(dO * O)`` per query, then runs one kernel per block of
  keys that recomputes the probabilities (transposed, keys by queries), accumulates the key and
  value gradients, and writes the logits' gradient ``dS = P * (dP - delta)`` once, in the inputs'
  dtype; a last kernel makes the query gradient ``dS K`` from it, and the bias gradient is ``dS``
  summed over the batch.

Half-precision inputs (bf16 autocast), head widths 16, 32, 64 and 128, no dropout; otherwise
callers keep ``scaled_dot_product_attention``. The backward holds ``dS`` for one layer at a time
(``B * heads * T * S`` elements, 126 MB for a ViT-S block at batch 256).
"""
from __future__ import annotations

import math
import os

import torch
from torch import Tensor

from ._triton import INTERPRET, kernel_op, multiprocessors, traceable

try:
    import triton
    import triton.language as tl
except ImportError:  # torch builds without Triton keep scaled_dot_product_attention
    triton = None

ENABLED = os.environ.get("VITPE_TRITON", "1") != "0"
BLOCK_M, BLOCK_N, NUM_WARPS, NUM_STAGES = 64, 32, 4, 2  # forward: queries x keys per step
BWD_BLOCK_M, BWD_BLOCK_N, BWD_NUM_WARPS, BWD_NUM_STAGES = 32, 128, 4, 3  # backward: queries per step x keys per program
# query and bias gradients together while all keys fit one tile: up to DQ_MAX_KEYS keys, tiles of
# DQ_TILE elements, DQ_WAVES programs per multiprocessor (each sums its share of the batch)
DQ_MAX_KEYS, DQ_TILE, DQ_WAVES = 512, 8192, 4
_LOG2E = 1.4426950408889634


def available(q: Tensor, bias: Tensor | None, dropout_p: float = 0.0) -> bool:
    """Whether the kernels take this call: a ``(heads, T, S)`` bias, no dropout, a supported width."""
    # float32 stays with torch: on the GPU the kernels' products would round to TF32 (the
    # interpreter, which computes exactly, takes it for the CPU tests)
    dtypes = (torch.float16, torch.bfloat16) + ((torch.float32,) if INTERPRET else ())
    return (ENABLED and triton is not None and (q.is_cuda or INTERPRET) and bias is not None and bias.dim() == 3
            and dropout_p == 0.0 and q.shape[-1] in (16, 32, 64, 128) and q.dtype in dtypes)


if triton is not None:
    @triton.jit
    def _rows(base, offs, stride, offs_d, ok):
        """The ``(len(offs), D)`` tile of rows ``offs`` (``stride`` apart) from ``base``, zero where not ``ok``."""
        return tl.load(base + offs[:, None] * stride + offs_d[None, :], mask=ok[:, None], other=0.0)

    @triton.jit
    def _program(n_heads, length, BLOCK: tl.constexpr):
        """This program's (image * heads + head), image and head (int64: offsets into large
        tensors), and its block of ``BLOCK`` positions out of ``length``, with their mask."""
        bh = tl.program_id(1).to(tl.int64)
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        return bh, bh // n_heads, bh % n_heads, offs, offs < length

    @triton.jit
    def _logits(q, k, bias_ptrs, mask, qk_scale):
        """``q k^T * scale + bias`` in log2 units (the softmax runs on ``exp2``), float32. The
        scales are compile-time constants (of the head width): as runtime floats, compiled code
        passes them in float64."""
        bias = tl.load(bias_ptrs, mask=mask, other=0.0).to(tl.float32)
        return tl.dot(q, tl.trans(k)) * qk_scale + bias * 1.4426950408889634

    @triton.jit
    def _fwd_kernel(Q, K, V, Bias, O, LSE, sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son, sbh, sbm,
                    n_heads, T, S, bias_cols, lse_row, QK_SCALE: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr):
        """One block of queries of one (image, head): ``O = softmax(Q K^T * scale + bias) V`` by
        blocks of keys, with the running max and sum; ``LSE`` in log2 units. ``sqb, sqh, sqn`` etc.
        are the (image, head, position) strides; the last dimension is contiguous. The bias's rows
        hold ``bias_cols`` elements (``S`` padded to a multiple of 16, zeros after ``S``): its loads
        are masked by that, which is constant over 16 columns, so they can be 16-byte copies.
        ``LSE``'s rows hold ``lse_row`` (``T`` padded the same way), all of them written: the padded
        queries, all zeros, get a finite log-sum-exp that the backward reads in whole vectors."""
        bh, b, h, offs_m, m_ok = _program(n_heads, T, BLOCK_M)
        offs_d = tl.arange(0, D)
        q = _rows(Q + b * sqb + h * sqh, offs_m, sqn, offs_d, m_ok)
        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, D), tl.float32)
        kb = K + b * skb + h * skh
        vb = V + b * svb + h * svh
        bb = Bias + h * sbh + offs_m[:, None] * sbm
        for start in range(0, S, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            n_ok = offs_n < S
            k = _rows(kb, offs_n, skn, offs_d, n_ok)
            s = _logits(q, k, bb + offs_n[None, :], m_ok[:, None] & (offs_n < bias_cols)[None, :], QK_SCALE)
            s = tl.where(n_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.exp2(s - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = _rows(vb, offs_n, svn, offs_d, n_ok)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        acc = acc / l_i[:, None]
        tl.store(O + b * sob + h * soh + offs_m[:, None] * son + offs_d[None, :],
                 acc.to(O.dtype.element_ty), mask=m_ok[:, None])
        tl.store(LSE + bh * lse_row + offs_m, m_i + tl.log2(l_i), mask=offs_m < lse_row)

    @triton.jit
    def _delta_kernel(O, DO, DELTA, sob, soh, son, sdob, sdoh, sdon, n_heads, T, lse_row, D: tl.constexpr,
                      BLOCK_M: tl.constexpr):
        """``delta = rowsum(dO * O)`` (float32, ``(B * heads, lse_row)``, zeros after ``T``) for one
        block of queries of one (image, head): the softmax's share of every logit's gradient, read
        once per row."""
        bh, b, h, offs_m, m_ok = _program(n_heads, T, BLOCK_M)
        offs_d = tl.arange(0, D)
        o = _rows(O + b * sob + h * soh, offs_m, son, offs_d, m_ok).to(tl.float32)
        do = _rows(DO + b * sdob + h * sdoh, offs_m, sdon, offs_d, m_ok).to(tl.float32)
        tl.store(DELTA + bh * lse_row + offs_m, tl.sum(o * do, 1), mask=offs_m < lse_row)

    @triton.jit
    def _bwd_kernel(Q, K, V, BiasT, DO, LSE, DELTA, DS, DK, DV, sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
                    sdob, sdoh, sdon, sbh, sbn, ds_row, n_heads, T, S, bias_rows, QK_SCALE: tl.constexpr,
                    SCALE: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """One block of keys of one (image, head): over all query blocks, recompute ``P``, add up
        ``dV = P^T dO`` and ``dK = dS^T Q * scale``, and write ``dS = P * (dO V^T - delta)``
        (``DS``: ``(B, heads, T, ds_row)``, rows padded to a multiple of 16 with zeros, so that
        it is stored and read 16 bytes at a time). Everything is
        computed transposed, keys by queries, so that every product has the block of keys as its
        long side (Hopper's warp-group products want 64 rows or more). ``DK``, ``DV`` are
        ``(B, heads, S, D)`` contiguous. ``BiasT`` is the bias transposed, ``(heads, S,
        bias_rows)``: ``T`` padded to a multiple of 16 (zeros after ``T``), so that its tiles, keys
        by queries, are read 16 bytes at a time along the queries; ``LSE`` and ``DELTA``'s rows
        have that length too."""
        bh, b, h, offs_n, n_ok = _program(n_heads, S, BLOCK_N)
        offs_d = tl.arange(0, D)
        k = _rows(K + b * skb + h * skh, offs_n, skn, offs_d, n_ok)
        v = _rows(V + b * svb + h * svh, offs_n, svn, offs_d, n_ok)
        dk = tl.zeros((BLOCK_N, D), tl.float32)
        dv = tl.zeros((BLOCK_N, D), tl.float32)
        qb = Q + b * sqb + h * sqh
        dob = DO + b * sdob + h * sdoh
        dsb = DS + bh * T * ds_row + offs_n[:, None]
        biasb = BiasT + h * sbh + offs_n[:, None] * sbn
        for start in range(0, T, BLOCK_M):
            offs_m = start + tl.arange(0, BLOCK_M)
            m_ok = offs_m < T
            both = n_ok[:, None] & m_ok[None, :]
            qT = tl.load(qb + offs_m[None, :] * sqn + offs_d[:, None], mask=m_ok[None, :], other=0.0)
            do = _rows(dob, offs_m, sdon, offs_d, m_ok)
            row_ok = offs_m < bias_rows  # constant over 16 queries, unlike m_ok: whole-vector loads
            lse = tl.load(LSE + bh * bias_rows + offs_m, mask=row_ok, other=0.0)
            delta = tl.load(DELTA + bh * bias_rows + offs_m, mask=row_ok, other=0.0)
            bias = tl.load(biasb + offs_m[None, :], mask=n_ok[:, None] & (offs_m < bias_rows)[None, :],
                           other=0.0).to(tl.float32)
            sT = tl.dot(k, qT) * QK_SCALE + bias * 1.4426950408889634
            pT = tl.where(both, tl.exp2(sT - lse[None, :]), 0.0)
            dv += tl.dot(pT.to(do.dtype), do)
            dpT = tl.dot(v, tl.trans(do))
            dsT = (pT * (dpT - delta[None, :])).to(do.dtype)
            # the padded keys' dS, zero, is stored too: the store is masked per 16 keys
            tl.store(dsb + offs_m[None, :] * ds_row, dsT, mask=(offs_n < ds_row)[:, None] & m_ok[None, :])
            dk += tl.dot(dsT, tl.trans(qT))
        out = bh * S * D + offs_n[:, None] * D + offs_d[None, :]
        tl.store(DK + out, (dk * SCALE).to(DK.dtype.element_ty), mask=n_ok[:, None])
        tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=n_ok[:, None])

    @triton.jit
    def _dq_kernel(DS, K, DQ, skb, skh, skn, n_heads, T, S, ds_row, SCALE: tl.constexpr, D: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """``dQ = dS K * scale`` for one block of queries of one (image, head); ``DQ`` is
        ``(B, heads, T, D)`` contiguous."""
        bh, b, h, offs_m, m_ok = _program(n_heads, T, BLOCK_M)
        offs_d = tl.arange(0, D)
        acc = tl.zeros((BLOCK_M, D), tl.float32)
        dsb = DS + bh * T * ds_row + offs_m[:, None] * ds_row
        kb = K + b * skb + h * skh
        for start in range(0, S, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            n_ok = offs_n < S
            ds = tl.load(dsb + offs_n[None, :], mask=m_ok[:, None] & (offs_n < ds_row)[None, :], other=0.0)
            acc += tl.dot(ds, _rows(kb, offs_n, skn, offs_d, n_ok))
        tl.store(DQ + bh * T * D + offs_m[:, None] * D + offs_d[None, :],
                 (acc * SCALE).to(DQ.dtype.element_ty), mask=m_ok[:, None])

    @triton.jit
    def _dq_dbias_kernel(DS, K, DQ, PART, skb, skh, skn, n_heads, B, T, S, ds_row, per_prog, SCALE: tl.constexpr,
                         D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr):
        """For one block of queries of one head and a share of the batch, with all ``S`` keys in
        one tile: ``dQ = dS K * scale`` for each image, and this program's part of the bias
        gradient, ``dS`` summed over its images (``PART``: ``(chunks, heads, T, S)`` float32,
        added up afterwards). ``dS`` is read once for both."""
        h, chunk = tl.program_id(1), tl.program_id(2)
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_s = tl.arange(0, BLOCK_S)
        offs_d = tl.arange(0, D)
        m_ok, s_ok = offs_m < T, offs_s < S
        both = m_ok[:, None] & s_ok[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_S), tl.float32)
        first = chunk.to(tl.int64) * per_prog  # int64: offsets into large tensors
        for i in range(0, tl.minimum(per_prog, B - chunk * per_prog)):
            b = first + i
            bh = b * n_heads + h
            ds = tl.load(DS + bh * T * ds_row + offs_m[:, None] * ds_row + offs_s[None, :],
                         mask=m_ok[:, None] & (offs_s < ds_row)[None, :], other=0.0)
            k = _rows(K + b * skb + h * skh, offs_s, skn, offs_d, s_ok)
            dq = tl.dot(ds, k) * SCALE
            tl.store(DQ + bh * T * D + offs_m[:, None] * D + offs_d[None, :], dq.to(DQ.dtype.element_ty),
                     mask=m_ok[:, None])
            acc += ds.to(tl.float32)
        tl.store(PART + ((chunk * n_heads + h) * T + offs_m[:, None]).to(tl.int64) * S + offs_s[None, :], acc,
                 mask=both)

def _strides(t: Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _last_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _padded(n: int) -> int:
    """``n`` rounded up to a multiple of 16: the row length of the kernels' padded tensors, whose
    loads and stores are masked per 16 elements and so can move 16 bytes at a time."""
    return triton.cdiv(n, 16) * 16


def _padded_rows(t: Tensor) -> Tensor:
    """``t`` ``(heads, rows, n)`` contiguous, with ``n`` padded with zeros to a multiple of 16."""
    n = t.shape[-1]
    return torch.nn.functional.pad(t, (0, _padded(n) - n)) if n % 16 else t.contiguous()


def attention_bias_forward(q: Tensor, k: Tensor, v: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
    """``q`` ``(B, heads, T, D)``, ``k``, ``v`` ``(B, heads, S, D)``, ``bias`` ``(heads, T, S)`` ->
    the output ``(B, heads, T, D)`` (stored position-major, as the caller reshapes it) and the
    log-sum-exp ``(B * heads, T)`` padded to a multiple of 16 (log2 units, float32)."""
    q, k, v = (_last_contiguous(t) for t in (q, k, v))
    B, H, T, D = q.shape
    S = k.shape[2]
    bias = _padded_rows(bias)  # (heads, T, S rounded up to 16)
    # kernels write whole tensors (not views of them), as compiled code traces their launches
    out = torch.empty(B, T, H, D, device=q.device, dtype=q.dtype)
    lse_row = _padded(T)
    lse = torch.empty(B * H, lse_row, device=q.device, dtype=torch.float32)
    scale = 1.0 / math.sqrt(D)
    traceable(_fwd_kernel)[(triton.cdiv(lse_row, BLOCK_M), B * H)](
        q, k, v, bias, out, lse, *_strides(q), *_strides(k), *_strides(v), out.stride(0), out.stride(2),
        out.stride(1), bias.stride(0), bias.stride(1), H, T, S, bias.shape[-1], lse_row, QK_SCALE=scale * _LOG2E, D=D,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    return out.transpose(1, 2), lse


def attention_bias_backward(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, bias: Tensor, out: Tensor,
                            lse: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients for ``q``, ``k``, ``v`` and ``bias`` (in ``bias``'s dtype, summed over the batch)."""
    q, k, v, grad, out = (_last_contiguous(t) for t in (q, k, v, grad, out))
    B, H, T, D = q.shape
    S = k.shape[2]
    bias_t = _padded_rows(bias.transpose(1, 2))  # (heads, S, T rounded up to 16)
    # rows of dS padded to a multiple of 16 elements: aligned, so its tiles are written whole
    ds = torch.empty(B, H, T, _padded(S), device=q.device, dtype=q.dtype)
    dk = torch.empty(B, H, S, D, device=q.device, dtype=k.dtype)
    dv = torch.empty(B, H, S, D, device=q.device, dtype=v.dtype)
    scale = 1.0 / math.sqrt(D)
    delta = torch.empty_like(lse)  # (B * heads, T padded to 16), as the log-sum-exp
    traceable(_delta_kernel)[(triton.cdiv(lse.shape[1], BLOCK_M), B * H)](
        out, grad, delta, *_strides(out), *_strides(grad), H, T, lse.shape[1], D=D, BLOCK_M=BLOCK_M)
    traceable(_bwd_kernel)[(triton.cdiv(S, BWD_BLOCK_N), B * H)](
        q, k, v, bias_t, grad, lse, delta, ds, dk, dv, *_strides(q), *_strides(k), *_strides(v), *_strides(grad),
        bias_t.stride(0), bias_t.stride(1), ds.stride(2), H, T, S, bias_t.shape[-1], QK_SCALE=scale * _LOG2E,
        SCALE=scale, D=D,
        BLOCK_M=BWD_BLOCK_M, BLOCK_N=BWD_BLOCK_N, num_warps=BWD_NUM_WARPS, num_stages=BWD_NUM_STAGES)
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    keys = max(16, triton.next_power_of_2(S))  # a product's inner size is 16 or more
    if keys <= DQ_MAX_KEYS:
        # all keys in one tile: the query gradient and the bias gradient's batch sum in one read of dS
        block_m = min(64, max(16, DQ_TILE // keys))
        m_blocks = triton.cdiv(T, block_m)
        chunks = max(1, min(B, DQ_WAVES * multiprocessors(q.device) // (m_blocks * H)))
        per_prog = triton.cdiv(B, chunks)
        chunks = triton.cdiv(B, per_prog)
        part = torch.empty(chunks, H, T, S, device=q.device, dtype=torch.float32)
        traceable(_dq_dbias_kernel)[(m_blocks, H, chunks)](
            ds, k, dq, part, *_strides(k), H, B, T, S, ds.stride(2), per_prog, SCALE=scale, D=D, BLOCK_M=block_m,
            BLOCK_S=keys, num_warps=NUM_WARPS)
        dbias = part.sum(0).to(bias.dtype)
    else:
        traceable(_dq_kernel)[(triton.cdiv(T, BLOCK_M), B * H)](
            ds, k, dq, *_strides(k), H, T, S, ds.stride(2), SCALE=scale, D=D, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
            num_warps=NUM_WARPS, num_stages=NUM_STAGES)
        dbias = ds[..., :S].sum(0, dtype=torch.float32).to(bias.dtype)
    return dq, dk, dv, dbias


def _setup(ctx, inputs, output) -> None:
    q, k, v, bias = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, bias, out, lse)


def _grads(ctx, grad: Tensor, _grad_lse: Tensor | None, backward) -> tuple:
    return backward(grad, *ctx.saved_tensors)


# the operators vitpe::attention_bias(_backward) when compiled, an autograd.Function eager
_call = kernel_op("attention_bias", attention_bias_forward, attention_bias_backward, _setup, _grads,
                  non_differentiable=(1,))  # the log-sum-exp


def attention_with_bias(q: Tensor, k: Tensor, v: Tensor, bias: Tensor) -> Tensor:
    """``softmax(q k^T / sqrt(D) + bias) v``: ``q`` ``(B, heads, T, D)``, ``k``, ``v`` ``(B, heads,
    S, D)``, ``bias`` ``(heads, T, S)`` shared by the batch (any float dtype; its gradient comes
    back in it). The output is ``(B, heads, T, D)``, a view of a position-major tensor."""
    args = (q, k, v, bias)
    return _call(*args)[0]
