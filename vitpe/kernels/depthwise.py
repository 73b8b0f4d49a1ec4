"""A depthwise 3x3 convolution read and written in the tokens' own layout, in Triton.

Mix-FFN and PEG convolve the patch tokens ``(B, P + H*W, C)`` of a grid. cuDNN's depthwise kernels
take 10-20 memory passes for what needs about one (forward 0.35 ms where a pass over the tensor is
0.03 ms, for ViT-S's Mix-FFN on an H200), and they need a ``(B, C, H, W)`` map. These kernels read
the tokens in place. The convolution and the weight gradient walk down the grid: each program
takes a strip of columns x a block of channels and steps through an image's rows (or a chunk of
them), loading each input row once, at three column shifts (two of them from cache), while the
next row's loads are in flight; the rows above and below that a row still adds to stay in
registers. That is 20 instructions per output where a tile of positions reading its 9 neighbours
took 42 (sm_90a), and the two launches of ViT-S's convolution take 303 µs against 411. The
backward is two kernels: the input gradient is the same convolution with the kernel flipped; the
weight and bias gradients are per-program partial sums, added up afterwards.

Holding the next row in registers caps those kernels at 2 programs per multiprocessor and one
row ahead: they wait on their loads. ``_conv_staged_kernel`` and ``_weight_grad_staged_kernel``
leave the rows ahead to Triton's software pipeliner instead (asynchronous copies into shared
memory, no registers held; ``CONV_STAGES`` / ``WG_STAGES`` rows in flight). On an H200 they take
the convolution and its backward without the GELU from 0.750 to 0.643 ms on ViT-S's Mix-FFN shape
(10-15 % less on MiT-B2's): the weight gradient has only the pipelined kernel now, and the
convolution takes it unless the GELU is inside (inference), where the register-carrying kernel
measured faster (0.219 against 0.262 ms; docs/performance.md, eleventh round).

The backward is one kernel (``_backward_staged_kernel``, ``BWD_MERGED``, the default; 0 keeps the
two kernels): it reads the output gradient once for the input gradient and the weight and
bias gradients, and sums the input gradient as it writes it, which is the gradient of a bias the
caller added to the input (``input_bias``: Mix-FFN hands fc1's bias over, saving autograd's
separate pass over the hidden layer for it). Three passes over the hidden layer where the two
kernels and autograd's sum take five.

Prefix tokens pass through (or, with ``residual``, are returned unchanged as ``x + 0``).

With ``gelu`` the convolution also applies Mix-FFN's activation (the exact, erf GELU; its ``erf``
from a polynomial, ``_phi``, as accurate as torch's float32 GELU), which
otherwise costs its own passes over the FFN's hidden layer, the largest activation of the block:
the forward stores ``gelu(conv(x) + bias)`` and keeps only ``x`` for the backward, not the
pre-activation. The backward recomputes the pre-activation with the convolution's kernel, whose
last step multiplies the output gradient by GELU's derivative there and writes that gradient of
the pre-activation; the weight-gradient and input-gradient kernels take it as they take the output
gradient without the GELU. That is 9 passes over the hidden layer where the convolution followed
by torch's GELU takes 11 (the forward no longer writes the pre-activation and reads it back, the
backward no longer reads it for the GELU's backward, but reads ``x`` once more), and autograd keeps
one tensor of that size less for the backward (``benchmarks/depthwise_kernels.py`` times both
ways). Prefix rows come out as ``gelu(x)``. Mix-FFN models fuse the GELU when no gradient is
recorded, and in training only when asked (``GridConv.gelu_with_grad``, for the memory): on an
H200 the fused forward is the faster one (0.220 against 0.260 ms on ViT-S's shape), the fused
backward is not (forward and backward 0.875 against 0.788 ms: the recomputing convolution with
GELU's derivative costs more than torch's GELU backward). With ``SAVE_GELU_GRAD`` (the default)
the forward writes GELU's derivative beside the output instead, the backward multiplies it in (in
the merged kernel, ``BWD_MERGED``, as it loads the gradient), and nothing is recomputed: Mix-FFN
then hands its GELU to the kernel in training too.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from ._triton import INTERPRET, kernel_op, multiprocessors, traceable

try:
    import triton
    import triton.language as tl
except ImportError:  # torch builds without Triton keep cuDNN's convolution
    triton = None

ENABLED = os.environ.get("VITPE_TRITON", "1") != "0"
# (benchmarks/depthwise_kernels.py --tiles times other values of these)
# the convolution's and the weight gradient's row-walking programs: elements of a row tile
# (columns x channels, ``_strip``), warps, and programs per multiprocessor that images are cut
# into row chunks to fill. Measured on an H200 (ViT-S's and MiT-B2's shapes): 1024-element tiles,
# 4096 in 8 warps and 2048 in 8 warps all slower for the convolution; the weight gradient at 1024
# in 2 warps and 8 programs a multiprocessor 4 % faster on ViT-S's shape, 24 % slower on MiT's;
# loading two rows ahead instead of one, no faster. At the default the convolution uses 236
# registers (16 x 128 tile), the weight gradient 255 and spills 128 bytes, and is still the fastest
CONV_TILE, CONV_WARPS, CONV_WAVES = 2048, 4, 4
# the tile of the convolution with the GELU inside (``_conv_kernel``, ``ACT`` 1-3): the ``erf``
# raises its registers (213 a thread at 2048 elements, 157 at 1024; sm_90, offline). 0 (the
# default) picks it by the grid's width (``_gelu_tile``): 1024 where that still leaves 64 channels
# (128 bytes in bf16) to a row of the strip, else 2048. Measured per launch on an H100
# (benchmarks/depthwise_kernels.py, docs/performance.md "Thirteenth round"), 1024 was 7 % faster on
# ViT-S's 14 x 14 grid (a 16-column strip: 64 channels instead of 128) and 3-5 % slower on the
# 24 x 24, 64 x 64 and 128 x 128 grids (32-column strips: 32 channels instead of 64); the rule
# picks the faster tile on each. A positive value sets the tile for every shape
GELU_TILE = 0
WG_TILE, WG_WARPS, WG_WAVES = 2048, 4, 2
# rows in flight with Triton's software pipeliner (``_conv_staged_kernel``, ``_weight_grad_staged_kernel``:
# the loads of the rows ahead copied asynchronously into shared memory; the weight gradient's at
# least 1). ``CONV_STAGES = 0``: the convolution's kernel that carries the next row in registers,
# which the convolution with the GELU always takes. Measured on an H200, fwd+bwd ms on ViT-S's
# shape: 0.750 with both kernels carrying rows in registers, 0.658 at 3, 0.643 at 4; with the
# GELU, forward 0.219 in registers, 0.262 at 3 and 4
CONV_STAGES, WG_STAGES = 4, 4
# the backward in one kernel (``_backward_staged_kernel``): the input gradient, the weight and bias
# gradients, and the gradient of a bias the caller added to the input (Mix-FFN's fc1), from one
# read of the output gradient; 0 keeps the two kernels (the convolution with the kernel flipped,
# then the weight gradient, which read the output gradient once each) and a separate sum.
# The default since it was timed with ``SAVE_GELU_GRAD`` (H100, compiled ViT-S Mix-FFN training
# 0.84 -> 0.94 of ``learned``, docs/performance.md "Thirteenth round"). Its tile is smaller than the others': 11 sums and the convolution's two
# carried rows stay in registers (about 20 tiles; at 1024 elements in 4 warps, 8 of each a thread)
BWD_MERGED = 1
BWD_TILE, BWD_WARPS, BWD_WAVES, BWD_STAGES = 1024, 4, 2, 3
# with gradients recorded, the GELU inside the convolution's forward kernel, which also writes GELU's
# derivative at the pre-activation for the backward (a tensor of the output's size, in its dtype,
# kept instead of the pre-activation that torch's GELU keeps); the backward multiplies the output
# gradient by it as it loads it (in the merged kernel) instead of running the GELU's backward. Three
# passes over the hidden layer fewer than the GELU outside the kernel (with ``BWD_MERGED``).
# The default with ``BWD_MERGED``; the derivative in bfloat16 rounds the gradient no more than the
# GELU's backward in bfloat16 does (``tests/test_kernels.py``)
SAVE_GELU_GRAD = 1
# the GELU's normal CDF in the kernels from a polynomial and a reciprocal square root (``_phi``; as
# accurate as torch's float32 GELU) instead of libdevice's ``erf``; 0 restores ``erf``. Measured on
# an H100 (docs/performance.md, eighteenth round), ViT-S's Mix-FFN convolution with the GELU:
# inference forward 0.197 -> 0.175 ms a launch, training forward + backward 0.595 -> 0.570; compiled
# ViT-S ``mixffn`` 0.92 / 0.90 -> 0.93 / 0.92 of ``learned`` (nineteenth round). ``bias_gelu`` takes
# ``_phi`` too (its own ``ERF_POLY``)
ERF_POLY = 1
# ``_conv_kernel`` starts each output row's sum from the bias: its first product a multiply-add with
# it, and no addition of the bias after the taps (34.2 instructions an output in the inference loop
# against 35.5, compiled offline for sm_90: docs/performance.md, nineteenth round). Measured on an
# H100 (twentieth round): ViT-S's Mix-FFN convolution with the GELU, inference forward 0.177 -> 0.169
# ms a launch (0.121 -> 0.117 on 64 x 24 x 24, 0.083 -> 0.082 on MiT-B2's 128 x 128), training
# forward + backward unchanged; compiled ViT-S ``mixffn`` inference 26458 -> 26638 img/s. 0: the
# bias added after the taps
BIAS_FIRST = 1
# the strip of columns a row-walking program takes (``_strip``): 0, the grid's width rounded up to a
# power of two (at most 32), whose extra columns idle (2 lanes in 16 on a 14-wide grid, 8 in 32 on
# a 24-wide one); 1 (the default), the strip and channel block that leave the fewest lanes idle (14
# wide: 2 columns x 512 channels of ViT-S's Mix-FFN; 24 wide: 8 columns), at the cost of reading
# more columns of the neighbouring strips (one each side of every strip). Measured on an H100
# (docs/performance.md, fifteenth round): Mix-FFN's convolution and GELU, forward + backward, 0.646
# -> 0.603 ms on ViT-S's 14 x 14 grid and 0.545 -> 0.450 on 24 x 24; compiled ViT-S ``mixffn``
# 0.91 / 0.89 -> 0.92 / 0.90 of ``learned`` (train / infer), 0.93 / 0.91 in the every-strategy run
STRIP_FIT = 1
MIN_ROWS = 8  # fewest rows a program walks when an image's rows are split between programs


def available(x: Tensor, kernel_size: int = 3) -> bool:
    """Whether the Triton kernels can run on ``x`` with this kernel size (3x3 only)."""
    return ENABLED and triton is not None and kernel_size == 3 and (x.is_cuda or INTERPRET)


if triton is not None:
    @triton.jit
    def _phi(z):
        """The standard normal CDF ``Phi(z) = (1 + erf(z / sqrt 2)) / 2`` by Abramowitz and Stegun's
        7.1.28, ``erf(x) = 1 - (1 + a1 x + ... + a6 x^6)^-16`` for ``x >= 0`` (within 3e-7). The
        coefficients are scaled for ``|z|`` and by ``2^(1/16)``, so that ``p^32`` is four times the
        polynomial's 32nd power and ``rsqrt(p^32)`` is ``(1 - erf) / 2`` itself: 6 multiply-adds,
        5 squarings and one reciprocal square root, no branch. libdevice's ``erff`` selects one of
        two polynomials' coefficients for each element and takes an ``exp``: the convolution's loop
        with the GELU inside issues 54 instructions an output with it and 35.5 with this (ViT-S's
        Mix-FFN, sm_90, compiled offline; docs/performance.md). Against float64, the
        GELU made with it is off by at most 8.2e-7, torch's float32 GELU by 1.2e-6 (4 million
        points in [-12, 12]; ``tests/test_kernels.py`` holds the kernels to 1e-6). Past ``|z|`` of
        9.67 ``p^32`` overflows to infinity and the tail is 0, where it is below 2e-22."""
        x = tl.abs(z)
        p = 5.6212997e-06 * x + 5.1055209e-05
        p = p * x + 3.9686137e-05
        p = p * x + 0.0034227392
        p = p * x + 0.022076998
        p = p * x + 0.052075163
        p = p * x + 1.0442738
        p = p * p
        p = p * p
        p = p * p
        p = p * p
        tail = tl.math.rsqrt(p * p)  # Phi(-|z|)
        return tl.where(z >= 0, 1.0 - tail, tail)

    @triton.jit
    def _cdf(z, POLY: tl.constexpr):
        """``Phi(z)``: from ``_phi`` with ``POLY``, else from libdevice's ``erf``."""
        if POLY:
            cdf = _phi(z)
        else:
            cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
        return cdf

    @triton.jit
    def _gelu(z, POLY: tl.constexpr = False):
        """The exact GELU, ``z * Phi(z)``."""
        return z * _cdf(z, POLY)

    @triton.jit
    def _gelu_grad(z, POLY: tl.constexpr = False):
        """GELU's derivative ``Phi(z) + z * phi(z)``."""
        return _cdf(z, POLY) + z * tl.exp(-0.5 * z * z) * 0.3989422804014327

    @triton.jit
    def _gelu_and_grad(z, POLY: tl.constexpr = False):
        """The exact GELU and its derivative, sharing ``Phi(z)``."""
        cdf = _cdf(z, POLY)
        return z * cdf, cdf + z * tl.exp(-0.5 * z * z) * 0.3989422804014327

    @triton.jit
    def _row(ptr, i: tl.constexpr, C, cmask):
        """Row ``i`` of a ``(rows, C)`` float table (``ptr`` already at the channel block) as a
        ``(1, BLOCK_C)`` float32 tile: a tap's weights, or the bias."""
        return tl.load(ptr + i * C, mask=cmask, other=0.0).to(tl.float32)[None, :]

    @triton.jit
    def _store_sums(out, C, cmask, a0, a1, a2, a3, a4, a5, a6, a7, a8, ab):
        """The 9 taps' and the bias's partial sums, reduced over positions, into rows 0-9 of ``out``
        (already at the program's row block and channel block)."""
        tl.store(out, tl.sum(a0, axis=0), mask=cmask)
        tl.store(out + C, tl.sum(a1, axis=0), mask=cmask)
        tl.store(out + 2 * C, tl.sum(a2, axis=0), mask=cmask)
        tl.store(out + 3 * C, tl.sum(a3, axis=0), mask=cmask)
        tl.store(out + 4 * C, tl.sum(a4, axis=0), mask=cmask)
        tl.store(out + 5 * C, tl.sum(a5, axis=0), mask=cmask)
        tl.store(out + 6 * C, tl.sum(a6, axis=0), mask=cmask)
        tl.store(out + 7 * C, tl.sum(a7, axis=0), mask=cmask)
        tl.store(out + 8 * C, tl.sum(a8, axis=0), mask=cmask)
        tl.store(out + 9 * C, tl.sum(ab, axis=0), mask=cmask)

    @triton.jit
    def _row_setup(pid_strip, pid_c, C, W, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr, EVEN_C: tl.constexpr):
        """A program's column strip and channel block: each element's offset within a row
        ``(BLOCK_W, BLOCK_C)``, the channels and their mask, and the masks of the strip's columns
        shifted one left, unshifted and shifted one right (zero padding at the grid's sides)."""
        offs_w = pid_strip * BLOCK_W + tl.arange(0, BLOCK_W)
        offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = offs_c < C
        offs = (offs_w * C)[:, None] + offs_c[None, :]
        ok_l, ok_m, ok_r = (offs_w >= 1) & (offs_w <= W), offs_w < W, offs_w + 1 < W
        c_ok = (cmask | EVEN_C)[None, :]  # all true for whole channel blocks: masks constant along channels
        return offs, offs_c, cmask, ok_l[:, None] & c_ok, ok_m[:, None] & c_ok, ok_r[:, None] & c_ok

    @triton.jit
    def _row3(row_ptr, offs, C, m_l, m_m, m_r, ok):
        """One grid row's tile at the columns one left, unshifted and one right, as stored; zero
        outside the grid, and everywhere unless the scalar ``ok`` (the row is in the grid). The
        walking kernels load a row one step before they use it, so the loads of the next row are in
        flight while this one's products are computed."""
        x_l = tl.load(row_ptr + offs - C, mask=m_l & ok, other=0.0)
        x_m = tl.load(row_ptr + offs, mask=m_m & ok, other=0.0)
        x_r = tl.load(row_ptr + offs + C, mask=m_r & ok, other=0.0)
        return x_l, x_m, x_r

    @triton.jit
    def _f32(x_l, x_m, x_r):
        """A row's three tiles in float32."""
        return x_l.to(tl.float32), x_m.to(tl.float32), x_r.to(tl.float32)

    @triton.jit
    def _tap(w_ptr, offs_c, cmask, i: tl.constexpr, FLIP: tl.constexpr):
        """Tap ``i`` (row-major in the 3x3 kernel; with ``FLIP``, of the kernel turned by 180
        degrees) of the block's channels of a contiguous ``(C, 1, 3, 3)`` weight, as a
        ``(1, BLOCK_C)`` float32 tile."""
        return tl.load(w_ptr + offs_c * 9 + (8 - i if FLIP else i), mask=cmask, other=0.0).to(tl.float32)[None, :]

    @triton.jit
    def _taps9(w_ptr, offs_c, cmask, FLIP: tl.constexpr):
        """The 9 taps of the block's channels (``_tap``), read from the weight as the module holds it:
        no transposed copy of it is made at each call."""
        return _tap(w_ptr, offs_c, cmask, 0, FLIP), _tap(w_ptr, offs_c, cmask, 1, FLIP), \
            _tap(w_ptr, offs_c, cmask, 2, FLIP), _tap(w_ptr, offs_c, cmask, 3, FLIP), \
            _tap(w_ptr, offs_c, cmask, 4, FLIP), _tap(w_ptr, offs_c, cmask, 5, FLIP), \
            _tap(w_ptr, offs_c, cmask, 6, FLIP), _tap(w_ptr, offs_c, cmask, 7, FLIP), \
            _tap(w_ptr, offs_c, cmask, 8, FLIP)

    @triton.jit
    def _unit(unit, n_chunks, n_units, rows, H):
        """An (image, rows) unit of the programs that sum partial gradients: its image ``b`` and
        rows ``r0`` to ``r1``; past the last unit, no rows (``r1 = r0 - 2``, so no steps)."""
        b, r0 = (unit // n_chunks).to(tl.int64), (unit % n_chunks) * rows
        return b, r0, tl.where(unit < n_units, tl.minimum(r0 + rows, H), r0 - 2)

    @triton.jit
    def _conv_start(w_ptr, n_strips, n_chunks, rows, H, W, C, FLIP: tl.constexpr, EVEN_C: tl.constexpr,
                    BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
        """What both convolution kernels set up: the program's image ``b`` and its rows ``r0`` to
        ``r1``, its tile's offsets, channels and masks (``_row_setup``), and the 9 taps' rows."""
        pid = tl.program_id(0)
        strip, unit = pid % n_strips, pid // n_strips
        b, r0 = (unit // n_chunks).to(tl.int64), (unit % n_chunks) * rows
        r1 = tl.minimum(r0 + rows, H)
        offs, offs_c, cmask, m_l, m_m, m_r = _row_setup(strip, tl.program_id(1), C, W, BLOCK_W, BLOCK_C, EVEN_C)
        t0, t1, t2, t3, t4, t5, t6, t7, t8 = _taps9(w_ptr, offs_c, cmask, FLIP)
        return b, r0, r1, offs, offs_c, cmask, m_l, m_m, m_r, t0, t1, t2, t3, t4, t5, t6, t7, t8

    @triton.jit
    def _prefix_rows(x_ptr, y_ptr, b, sxb, syb, n_prefix, C, offs_c, cmask, GELU: tl.constexpr, POLY: tl.constexpr):
        """The prefix rows of image ``b``, the program's channel block: ``y = x``, or with ``GELU``
        ``gelu(x)``. The convolution kernels' programs that start an image's first strip write them
        (``PREFIX``), instead of a launch of their own."""
        for p in range(0, n_prefix):
            v = tl.load(x_ptr + b * sxb + p * C + offs_c, mask=cmask, other=0.0)
            if GELU:
                v = _gelu(v.to(tl.float32), POLY)
            tl.store(y_ptr + b * syb + p * C + offs_c, v.to(y_ptr.dtype.element_ty), mask=cmask)

    @triton.jit
    def _bias_row(b_ptr, offs_c, C, cmask, HAS_BIAS: tl.constexpr, BLOCK_C: tl.constexpr):
        """The convolution's bias as a ``(1, BLOCK_C)`` float32 row, zero without one."""
        if HAS_BIAS:
            bias = _row(b_ptr + offs_c, 0, C, cmask)
        else:
            bias = tl.zeros((1, BLOCK_C), dtype=tl.float32)
        return bias

    @triton.jit
    def _conv_kernel(x_ptr, w_ptr, b_ptr, y_ptr, ga_ptr, skip, n_prefix, H, W, C, sxb, syb, sgb, rows, n_chunks,
                     n_strips, HAS_BIAS: tl.constexpr, RESIDUAL: tl.constexpr, ACT: tl.constexpr, POLY: tl.constexpr,
                     BIAS_FIRST: tl.constexpr, PREFIX: tl.constexpr, FLIP: tl.constexpr, EVEN_C: tl.constexpr,
                     BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
        """``z[b, h, w, c] = sum_{i,j} x[b, h + i - 1, w + j - 1, c] * w[c, 0, i, j] (+ bias)
        (+ x)`` (with ``FLIP``, ``w[c, 0, 2 - i, 2 - j]``), zero outside the grid, stored in ``y``
        as ``z`` (``ACT`` 0), ``gelu(z)`` (1), ``ga * gelu'(z)`` (2: the GELU's backward, ``ga``
        laid out as ``y``), or ``gelu(z)`` with ``gelu'(z)`` stored in ``ga`` (3: the forward that
        keeps the derivative); positions are row-major within an image, channels contiguous,
        starting ``skip`` elements into each image (after the prefix tokens; with ``PREFIX`` the
        kernel also writes the ``n_prefix`` prefix rows: ``x``'s, or their GELU with ``ACT`` 1 or
        3). Each program walks down ``rows`` rows of one image within a strip of
        ``BLOCK_W`` columns and ``BLOCK_C`` channels, reading each input row once (at three column
        shifts, the two shifted ones from cache) and keeping the two output rows it still adds to:
        a row's three kernel rows go to the output rows above, at and below it."""
        b, r0, r1, offs, offs_c, cmask, m_l, m_m, m_r, t0, t1, t2, t3, t4, t5, t6, t7, t8 = _conv_start(
            w_ptr, n_strips, n_chunks, rows, H, W, C, FLIP, EVEN_C, BLOCK_W, BLOCK_C)
        if PREFIX:
            if (tl.program_id(0) % n_strips == 0) & (r0 == 0):
                _prefix_rows(x_ptr, y_ptr, b, sxb, syb, n_prefix, C, offs_c, cmask, (ACT == 1) | (ACT == 3), POLY)
        x_img = x_ptr + skip + b * sxb
        y_img = y_ptr + skip + b * syb
        row_len = W * C
        if BIAS_FIRST:  # the sums start from it
            bias = _bias_row(b_ptr, offs_c, C, cmask, HAS_BIAS, BLOCK_C)
        # the row above the first: its kernel row 0 goes to output row r0 (zero at the grid's top)
        x_l, x_m, x_r = _f32(*_row3(x_img + (r0 - 1) * row_len, offs, C, m_l, m_m, m_r, r0 > 0))
        if BIAS_FIRST:
            below = bias + x_l * t0 + x_m * t1 + x_r * t2  # output row r0 so far
        else:
            below = x_l * t0 + x_m * t1 + x_r * t2
        # the first row: kernel row 1 to itself, row 0 to the row below
        x_l, x_m, x_r = _f32(*_row3(x_img + r0 * row_len, offs, C, m_l, m_m, m_r, r0 < H))
        at = below + x_l * t3 + x_m * t4 + x_r * t5  # output row r0, wanting its row below
        if BIAS_FIRST:
            below = bias + x_l * t0 + x_m * t1 + x_r * t2  # output row r0 + 1
        else:
            below = x_l * t0 + x_m * t1 + x_r * t2
            bias = _bias_row(b_ptr, offs_c, C, cmask, HAS_BIAS, BLOCK_C)  # added after the taps
        # the next row's loads (and the GELU backward's output gradient) are in flight while a row's
        # products are computed
        n_l, n_m, n_r = _row3(x_img + (r0 + 1) * row_len, offs, C, m_l, m_m, m_r, r0 + 1 < H)
        ga_img = ga_ptr + skip + b * sgb
        if ACT == 2:
            n_ga = tl.load(ga_img + r0 * row_len + offs, mask=m_m, other=0.0)
        for s in range(r0 + 1, r1 + 1):
            # input row s completes output row s - 1 (zero below the grid's last row)
            x_l, x_m, x_r = _f32(n_l, n_m, n_r)
            n_l, n_m, n_r = _row3(x_img + (s + 1) * row_len, offs, C, m_l, m_m, m_r, (s + 1 <= r1) & (s + 1 < H))
            if ACT == 2:
                ga = n_ga.to(tl.float32)
                n_ga = tl.load(ga_img + s * row_len + offs, mask=m_m & (s < r1), other=0.0)
            out = at + x_l * t6 + x_m * t7 + x_r * t8
            at = below + x_l * t3 + x_m * t4 + x_r * t5
            if BIAS_FIRST:
                below = bias + x_l * t0 + x_m * t1 + x_r * t2
            else:
                below = x_l * t0 + x_m * t1 + x_r * t2
                if HAS_BIAS:
                    out += bias
            if RESIDUAL:
                out += tl.load(x_img + (s - 1) * row_len + offs, mask=m_m, other=0.0).to(tl.float32)
            if ACT == 1:
                out = _gelu(out, POLY)
            if ACT == 2:
                out = ga * _gelu_grad(out, POLY)
            if ACT == 3:
                out, d = _gelu_and_grad(out, POLY)
                tl.store(ga_img + (s - 1) * row_len + offs, d.to(ga_ptr.dtype.element_ty), mask=m_m)
            tl.store(y_img + (s - 1) * row_len + offs, out.to(y_ptr.dtype.element_ty), mask=m_m)

    @triton.jit
    def _conv_staged_kernel(x_ptr, w_ptr, b_ptr, y_ptr, skip, n_prefix, H, W, C, sxb, syb, rows, n_chunks, n_strips,
                            HAS_BIAS: tl.constexpr, RESIDUAL: tl.constexpr, PREFIX: tl.constexpr,
                            FLIP: tl.constexpr, EVEN_C: tl.constexpr,
                            BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr, STAGES: tl.constexpr):
        """``_conv_kernel``'s convolution without the GELU (``ACT`` 0), with the loads of the rows
        ahead issued by Triton's software pipeliner (``STAGES`` - 1 rows ahead, copied
        asynchronously into shared memory) instead of carried in registers: each step loads input
        row ``s`` and completes output row ``s - 1``, from the row above the program's first to the
        row below its last."""
        b, r0, r1, offs, offs_c, cmask, m_l, m_m, m_r, t0, t1, t2, t3, t4, t5, t6, t7, t8 = _conv_start(
            w_ptr, n_strips, n_chunks, rows, H, W, C, FLIP, EVEN_C, BLOCK_W, BLOCK_C)
        if PREFIX:  # copied
            if (tl.program_id(0) % n_strips == 0) & (r0 == 0):
                _prefix_rows(x_ptr, y_ptr, b, sxb, syb, n_prefix, C, offs_c, cmask, False, False)
        bias = _bias_row(b_ptr, offs_c, C, cmask, HAS_BIAS, BLOCK_C)
        x_img = x_ptr + skip + b * sxb
        y_img = y_ptr + skip + b * syb
        row_len = W * C
        # the output rows s - 1 and s so far, two zero tiles made apart: Triton carries a name
        # through a loop when the body changes its value, and a hand-over such as ``at = below``
        # would not look like a change if both started as the same tile (a kernel row's sums then
        # came out zero on the GPU, right in the interpreter)
        at = tl.zeros((BLOCK_W, BLOCK_C), dtype=tl.float32)
        below = tl.zeros((BLOCK_W, BLOCK_C), dtype=tl.float32)
        for s in tl.range(r0 - 1, r1 + 1, num_stages=STAGES):
            x_l, x_m, x_r = _f32(*_row3(x_img + s * row_len, offs, C, m_l, m_m, m_r, (s >= 0) & (s < H)))
            done = s > r0  # output row s - 1 is the program's
            out = at + x_l * t6 + x_m * t7 + x_r * t8
            at = below + x_l * t3 + x_m * t4 + x_r * t5
            below = x_l * t0 + x_m * t1 + x_r * t2
            out += bias
            if RESIDUAL:
                out += tl.load(x_img + (s - 1) * row_len + offs, mask=m_m & done, other=0.0).to(tl.float32)
            tl.store(y_img + (s - 1) * row_len + offs, out.to(y_ptr.dtype.element_ty), mask=m_m & done)

    @triton.jit
    def _weight_grad_staged_kernel(x_ptr, g_ptr, part_ptr, skip, H, W, C, sxb, sgb, rows, n_chunks, n_units,
                                   units_per_prog, EVEN_C: tl.constexpr, BLOCK_W: tl.constexpr,
                                   BLOCK_C: tl.constexpr, STAGES: tl.constexpr):
        """``part[prog, strip, tap, c]``: this program's share of ``sum_p g[p, c] * x[p + offset, c]``
        for the 9 taps of a 3x3 kernel, and in row 9 of ``sum_p g[p, c]`` (the bias gradient), over
        its (image, ``rows`` rows) units within one strip of columns and block of channels. Each
        program walks down the rows: input row ``s`` meets kernel row ``i`` at the gradient of
        output row ``s + 1 - i``. Products are accumulated elementwise and reduced over columns
        once. The rows ahead are loaded by Triton's software pipeliner (as ``_conv_staged_kernel``):
        step ``s`` loads input row ``s`` and the gradients of output rows ``s + 1`` and, again (from
        cache), ``s - 1``; it carries only the gradient row ``s`` to the next step, since the
        pipeliner leaves a loop alone when one carried row is handed on to another (``g_up, g_at =
        g_at, g_dn``; a kernel that carried both in registers measured 184 µs a launch against 156
        on ViT-S's shape, H200)."""
        prog, strip, nprog = tl.program_id(0), tl.program_id(1), tl.num_programs(0)
        offs, offs_c, cmask, m_l, m_m, m_r = _row_setup(strip, tl.program_id(2), C, W, BLOCK_W, BLOCK_C, EVEN_C)
        row_len = W * C
        zero = tl.zeros((BLOCK_W, BLOCK_C), dtype=tl.float32)
        a0, a1, a2, a3, a4, a5, a6, a7, a8, ab = zero, zero, zero, zero, zero, zero, zero, zero, zero, zero
        for u in range(0, units_per_prog):
            b, r0, r1 = _unit(prog + u * nprog, n_chunks, n_units, rows, H)
            x_img = x_ptr + skip + b * sxb
            g_img = g_ptr + skip + b * sgb
            g_at = tl.zeros((BLOCK_W, BLOCK_C), dtype=tl.float32)  # the gradient of output row s
            for s in tl.range(r0 - 1, r1 + 1, num_stages=STAGES):
                g_up = tl.load(g_img + (s - 1) * row_len + offs, mask=m_m & (s > r0), other=0.0).to(tl.float32)
                g_dn = tl.load(g_img + (s + 1) * row_len + offs, mask=m_m & (s + 1 < r1), other=0.0).to(tl.float32)
                x_l, x_m, x_r = _f32(*_row3(x_img + s * row_len, offs, C, m_l, m_m, m_r, (s >= 0) & (s < H)))
                ab += g_dn
                a0 += g_dn * x_l
                a1 += g_dn * x_m
                a2 += g_dn * x_r
                a3 += g_at * x_l
                a4 += g_at * x_m
                a5 += g_at * x_r
                a6 += g_up * x_l
                a7 += g_up * x_m
                a8 += g_up * x_r
                g_at = g_dn
        _store_sums(part_ptr + (prog * tl.num_programs(1) + strip) * 10 * C + offs_c, C, cmask,
                    a0, a1, a2, a3, a4, a5, a6, a7, a8, ab)

    @triton.jit
    def _backward_staged_kernel(x_ptr, g_ptr, d_ptr, w_ptr, gx_ptr, part_ptr, skip, H, W, C, sxb, sgb, sdb, sgxb,
                                rows, n_chunks, n_units, units_per_prog, RESIDUAL: tl.constexpr,
                                GATED: tl.constexpr, EVEN_C: tl.constexpr, BLOCK_W: tl.constexpr,
                                BLOCK_C: tl.constexpr, STAGES: tl.constexpr):
        """The whole backward of ``_conv_kernel``'s convolution (no GELU) from one read of the
        output gradient ``g``: the input gradient ``gx`` (the convolution of ``g`` with the
        weight ``w`` turned by 180 degrees; ``+ g`` with ``RESIDUAL``) and, as ``_weight_grad_staged_kernel``,
        per-program partial sums in ``part[prog, strip]``: rows 0-8 the taps' gradients, 9 the
        bias's (``sum_p g[p]``), 10 the sum of ``gx`` over the patch rows (the gradient of a bias
        added to the input). Programs walk their (image, ``rows`` rows) units as the weight
        gradient's do. Step ``s`` loads the gradient row ``s`` at three column shifts, which serve
        both: the input gradient's convolution completes its row ``s - 1`` (as ``_conv_staged_kernel``),
        and the taps' sums take the gradient row shifted against the input rows ``s - 1``, ``s``
        and ``s + 1`` unshifted (the last two from cache): the tap ``(i, j)`` pairs ``g[h, w]``
        with ``x[h + i - 1, w + j - 1]``, that is the input row ``s + i - 1`` with the gradient
        shifted by ``1 - j`` columns. Only the gradient rows of the program's own rows count
        towards the sums; the rows above and below its first and last serve the convolution. With
        ``GATED`` the gradient is ``g * d`` (``d`` laid out as ``g``: the GELU's derivative kept by
        the forward), multiplied as it is loaded."""
        prog, strip, nprog = tl.program_id(0), tl.program_id(1), tl.num_programs(0)
        offs, offs_c, cmask, m_l, m_m, m_r = _row_setup(strip, tl.program_id(2), C, W, BLOCK_W, BLOCK_C, EVEN_C)
        t0, t1, t2, t3, t4, t5, t6, t7, t8 = _taps9(w_ptr, offs_c, cmask, True)
        row_len = W * C
        zero = tl.zeros((BLOCK_W, BLOCK_C), dtype=tl.float32)
        a0, a1, a2, a3, a4, a5, a6, a7, a8, ab, ai = zero, zero, zero, zero, zero, zero, zero, zero, zero, zero, zero
        for u in range(0, units_per_prog):
            b, r0, r1 = _unit(prog + u * nprog, n_chunks, n_units, rows, H)
            x_img = x_ptr + skip + b * sxb
            g_img = g_ptr + skip + b * sgb
            gx_img = gx_ptr + skip + b * sgxb
            d_img = d_ptr + skip + b * sdb
            # the input gradient's rows s - 1 and s so far (two zero tiles made apart, as in
            # ``_conv_staged_kernel``)
            at = tl.zeros((BLOCK_W, BLOCK_C), dtype=tl.float32)
            below = tl.zeros((BLOCK_W, BLOCK_C), dtype=tl.float32)
            for s in tl.range(r0 - 1, r1 + 1, num_stages=STAGES):
                g_l, g_m, g_r = _f32(*_row3(g_img + s * row_len, offs, C, m_l, m_m, m_r, (s >= 0) & (s < H)))
                if GATED:
                    d_l, d_m, d_r = _f32(*_row3(d_img + s * row_len, offs, C, m_l, m_m, m_r, (s >= 0) & (s < H)))
                    g_l, g_m, g_r = g_l * d_l, g_m * d_m, g_r * d_r
                own = (s >= r0) & (s < r1)  # the gradient row is the program's: it counts towards the sums
                x_up = tl.load(x_img + (s - 1) * row_len + offs, mask=m_m & own & (s >= 1), other=0.0).to(tl.float32)
                x_at = tl.load(x_img + s * row_len + offs, mask=m_m & own, other=0.0).to(tl.float32)
                x_dn = tl.load(x_img + (s + 1) * row_len + offs, mask=m_m & own & (s + 1 < H),
                               other=0.0).to(tl.float32)
                done = s > r0  # the input gradient's row s - 1 is the program's
                out = at + g_l * t6 + g_m * t7 + g_r * t8
                at = below + g_l * t3 + g_m * t4 + g_r * t5
                below = g_l * t0 + g_m * t1 + g_r * t2
                if RESIDUAL:
                    out += tl.load(g_img + (s - 1) * row_len + offs, mask=m_m & done, other=0.0).to(tl.float32)
                tl.store(gx_img + (s - 1) * row_len + offs, out.to(gx_ptr.dtype.element_ty), mask=m_m & done)
                ai += tl.where(m_m & done, out, 0.0)
                ab += tl.where(own, g_m, 0.0)
                a0 += g_r * x_up
                a1 += g_m * x_up
                a2 += g_l * x_up
                a3 += g_r * x_at
                a4 += g_m * x_at
                a5 += g_l * x_at
                a6 += g_r * x_dn
                a7 += g_m * x_dn
                a8 += g_l * x_dn
        out_ptr = part_ptr + (prog * tl.num_programs(1) + strip) * 11 * C + offs_c
        _store_sums(out_ptr, C, cmask, a0, a1, a2, a3, a4, a5, a6, a7, a8, ab)
        tl.store(out_ptr + 10 * C, tl.sum(ai, axis=0), mask=cmask)

    @triton.jit
    def _prefix_kernel(src_ptr, x_ptr, dst_ptr, n, ssb, sxb, sdb, GELU: tl.constexpr, POLY: tl.constexpr,
                       BLOCK: tl.constexpr):
        """The backward's prefix rows, the first ``n`` elements of each image: ``dst = src``, or with
        ``GELU`` ``src * gelu'(x)`` (the GELU's backward), in the tensors themselves (a slice
        assignment in the operator would be traced as a copy of the whole). The forward's are
        written by the convolution kernels (``_prefix_rows``)."""
        b = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < n
        v = tl.load(src_ptr + b * ssb + offs, mask=ok, other=0.0).to(tl.float32)
        if GELU:
            v = v * _gelu_grad(tl.load(x_ptr + b * sxb + offs, mask=ok, other=0.0).to(tl.float32), POLY)
        tl.store(dst_ptr + b * sdb + offs, v.to(dst_ptr.dtype.element_ty), mask=ok)


def _launch_prefix(src: Tensor, x: Tensor, dst: Tensor, num_prefix: int, gelu: bool) -> None:
    """Write the prefix rows of ``dst`` from those of ``src`` (and ``x``); see ``_prefix_kernel``."""
    B, _, C = src.shape
    n = num_prefix * C
    block = min(1024, triton.next_power_of_2(n))
    traceable(_prefix_kernel)[(B, triton.cdiv(n, block))](src, x, dst, n, src.stride(0), x.stride(0), dst.stride(0),
                                                        GELU=gelu, POLY=bool(ERF_POLY), BLOCK=block)


def _strip(W: int, C: int, tile: int) -> tuple[int, int]:
    """Columns and channels of a row-walking program's tile of about ``tile`` elements: the grid's
    width (to a power of two, at most 32), channels for the rest (16 to 128). With ``STRIP_FIT``,
    the powers of two (at least 2 columns, 16 to 1024 channels, ``tile / 2`` to ``tile`` elements,
    or fewer where the grid's channels are fewer) that leave the fewest idle lanes in the padded
    grid row, the wider strip on a tie."""
    block_w = min(triton.next_power_of_2(W), 32)
    if not STRIP_FIT:
        return block_w, max(16, min(128, tile // block_w, triton.next_power_of_2(C)))
    widths = [block_w >> i for i in range(block_w.bit_length()) if block_w >> i >= min(2, block_w)]
    channels = [c for c in (16 << i for i in range(7)) if c <= max(16, triton.next_power_of_2(C))]
    shapes = [(bw, bc) for bw in widths for bc in channels if bw * bc <= tile] or [(block_w, 16)]
    least = min(tile // 2, max(bw * bc for bw, bc in shapes))  # no tile much smaller than asked for
    return min((s for s in shapes if s[0] * s[1] >= least),
               key=lambda s: (triton.cdiv(W, s[0]) * s[0] * triton.cdiv(C, s[1]) * s[1], -s[0], -s[1]))


def _gelu_tile(W: int, C: int) -> int:
    """The tile of the convolution with the GELU inside: ``GELU_TILE`` if set, else the smaller of
    1024 and 2048 elements that gives a strip row at least 64 channels (``_strip``)."""
    if GELU_TILE > 0:
        return GELU_TILE
    return 1024 if _strip(W, C, 1024)[1] >= 64 else 2048


def _walk(x: Tensor, H: int, W: int, tile: int, waves: int) -> tuple[int, int, int, int, int, int]:
    """How row-walking programs cover ``x`` ``(B, P + H*W, C)``: a strip's columns and channels
    (``_strip``), the strips and channel blocks, the rows each program walks, and the chunks of
    rows per image. A program walks a whole image's rows when the images' strips x channel blocks
    fill the GPU ``waves`` times over, else fewer (at least ``MIN_ROWS``; each chunk reads two more
    rows)."""
    B, _, C = x.shape
    block_w, block_c = _strip(W, C, tile)
    strips, c_blocks = triton.cdiv(W, block_w), triton.cdiv(C, block_c)
    want, have = waves * multiprocessors(x.device), B * strips * c_blocks
    rows = H if have >= want else min(H, max(MIN_ROWS, triton.cdiv(H, triton.cdiv(want, have))))
    return block_w, block_c, strips, c_blocks, rows, triton.cdiv(H, rows)


def _launch_conv(src: Tensor, weight: Tensor, bias: Optional[Tensor], out: Tensor, grid_hw: tuple[int, int],
                 num_prefix: int, flip: bool, residual: bool, act: int = 0, grad: Optional[Tensor] = None,
                 prefix: bool = False) -> None:
    """Convolve the patch rows of ``src`` ``(B, P + H*W, C)`` into those of ``out`` (same shape),
    then (``act``) the GELU (1), the GELU's backward of ``grad`` (2: ``out = grad * gelu'(z)``), or
    the GELU with its derivative written into ``grad`` (3); ``flip`` turns the kernel by 180
    degrees (the input gradient). With ``prefix`` (not with ``act`` 2) the prefix rows of ``out``
    are written too: those of ``src``, their GELU with ``act`` 1 or 3 (no derivative)."""
    if prefix and act == 2:
        raise ValueError("the GELU's backward writes no prefix rows")
    B, _, C = src.shape
    H, W = grid_hw
    tile = _gelu_tile(W, C) if act else CONV_TILE
    block_w, block_c, strips, c_blocks, rows, chunks = _walk(src, H, W, tile, CONV_WAVES)
    # whole tensors and the prefix's length: a kernel that writes into a slice would have to be
    # traced as a mutation of a view
    grid = (B * chunks * strips, c_blocks)
    b = bias if bias is not None else weight  # (unread)
    tiles = dict(HAS_BIAS=bias is not None, RESIDUAL=residual, PREFIX=bool(prefix and num_prefix), FLIP=flip,
                 EVEN_C=C % block_c == 0, BLOCK_W=block_w, BLOCK_C=block_c, num_warps=CONV_WARPS)
    if CONV_STAGES and act == 0:
        traceable(_conv_staged_kernel)[grid](
            src, weight, b, out, num_prefix * C, num_prefix, H, W, C, src.stride(0), out.stride(0), rows, chunks,
            strips, STAGES=CONV_STAGES, **tiles)
        return
    grad = out if grad is None else grad  # read with act 2, written with act 3
    traceable(_conv_kernel)[grid](
        src, weight, b, out, grad, num_prefix * C, num_prefix, H, W, C, src.stride(0), out.stride(0), grad.stride(0),
        rows, chunks, strips, ACT=act, POLY=bool(ERF_POLY), BIAS_FIRST=bool(BIAS_FIRST), **tiles)


def _programs(units: int, blocks: int, waves: int, device: torch.device) -> tuple[int, int]:
    """Programs along the (image, rows) units, and units per program, for the weight gradient's
    ``blocks`` strips x channel blocks: enough programs to fill the GPU ``waves`` times over, each
    summing its share."""
    progs = max(1, min(units, waves * multiprocessors(device) // blocks))
    return progs, triton.cdiv(units, progs)


def _weight_grad(x: Tensor, grad: Tensor, H: int, W: int, num_prefix: int) -> Tensor:
    """``(programs x strips, 10, C)`` float32 partial sums of the 9 taps' and the bias's gradients."""
    B, _, C = x.shape
    block_w, block_c, strips, c_blocks, rows, chunks = _walk(x, H, W, WG_TILE, WG_WAVES)
    units = B * chunks
    progs, per_prog = _programs(units, strips * c_blocks, WG_WAVES, x.device)
    part = torch.empty(progs * strips, 10, C, device=x.device, dtype=torch.float32)
    traceable(_weight_grad_staged_kernel)[(progs, strips, c_blocks)](
        x, grad, part, num_prefix * C, H, W, C, x.stride(0), grad.stride(0), rows, chunks, units, per_prog,
        EVEN_C=C % block_c == 0, BLOCK_W=block_w, BLOCK_C=block_c, num_warps=WG_WARPS, STAGES=WG_STAGES)
    return part


def _backward_merged(grad: Tensor, x: Tensor, weight: Tensor, grad_x: Tensor, H: int, W: int, num_prefix: int,
                     residual: bool, gate: Optional[Tensor] = None) -> Tensor:
    """Write the patch rows of ``grad_x`` and return ``(programs x strips, 11, C)`` float32 partial
    sums: the 9 taps', the bias's and the input bias's gradients (``_backward_staged_kernel``), of
    the output gradient ``grad`` or, given ``gate``, of ``grad * gate``."""
    B, _, C = x.shape
    block_w, block_c, strips, c_blocks, rows, chunks = _walk(x, H, W, BWD_TILE, BWD_WAVES)
    units = B * chunks
    progs, per_prog = _programs(units, strips * c_blocks, BWD_WAVES, x.device)
    part = torch.empty(progs * strips, 11, C, device=x.device, dtype=torch.float32)
    d = grad if gate is None else gate
    traceable(_backward_staged_kernel)[(progs, strips, c_blocks)](
        x, grad, d, weight, grad_x, part, num_prefix * C, H, W, C, x.stride(0), grad.stride(0),
        d.stride(0), grad_x.stride(0), rows, chunks, units, per_prog, RESIDUAL=residual, GATED=gate is not None,
        EVEN_C=C % block_c == 0, BLOCK_W=block_w, BLOCK_C=block_c, num_warps=BWD_WARPS, STAGES=BWD_STAGES)
    return part


def conv_tokens(x: Tensor, weight: Tensor, bias: Optional[Tensor], H: int, W: int, num_prefix: int,
                residual: bool, gelu: bool, input_bias: Optional[Tensor],
                save_gelu_grad: bool) -> tuple[Tensor, Tensor]:
    """The forward: a new contiguous ``(B, P + H*W, C)`` tensor, and with ``save_gelu_grad`` (and
    ``gelu``) GELU's derivative at the pre-activation of its patch rows for the backward (prefix
    rows unset), else an empty tensor. ``input_bias`` is only given a gradient, in the backward."""
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    # the prefix rows (x, or its GELU) written by the convolution's kernel
    if save_gelu_grad:
        gelu_grad = torch.empty_like(out)
        _launch_conv(x, weight, bias, out, (H, W), num_prefix, flip=False, residual=False, act=3, grad=gelu_grad,
                     prefix=True)
    else:
        gelu_grad = out.new_empty(0)
        _launch_conv(x, weight, bias, out, (H, W), num_prefix, flip=False, residual=residual, act=1 if gelu else 0,
                     prefix=True)
    return out, gelu_grad


def conv_tokens_backward(grad: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], gelu_grad: Optional[Tensor],
                         H: int, W: int, num_prefix: int, residual: bool, gelu: bool,
                         input_bias_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients for ``x``, ``weight``, the bias (float32 ``(C,)``, also when there is none) and,
    with ``input_bias_grad``, a bias added to ``x`` (``x``'s gradient summed over all its rows,
    float32 ``(C,)``; empty without). With ``gelu``, the pre-activation's gradient is ``grad``
    times ``gelu_grad`` where the forward kept it, else ``bias`` is read to recompute the
    pre-activation."""
    grad = grad.contiguous()
    grad_pre, gate = grad, None
    if gelu and gelu_grad is not None:
        if BWD_MERGED:
            gate = gelu_grad  # multiplied in as the merged kernel loads the gradient
        else:
            grad_pre = grad * gelu_grad  # (prefix rows unset and unread)
    elif gelu:
        # the pre-activation recomputed and its gradient written whole (prefix rows left unset and unread)
        grad_pre = torch.empty_like(grad)
        _launch_conv(x, weight, bias, grad_pre, (H, W), num_prefix, flip=False, residual=False, act=2, grad=grad)
    grad_x = torch.empty_like(grad)
    if num_prefix:
        _launch_prefix(grad, x, grad_x, num_prefix, gelu)
    grad_input_bias = grad_x.new_empty(0, dtype=torch.float32)
    if BWD_MERGED:
        sums = _backward_merged(grad_pre, x, weight, grad_x, H, W, num_prefix, residual, gate).sum(0)  # (11, C)
        if input_bias_grad:  # the kernel summed the patch rows; the prefix rows' gradient passed through
            grad_input_bias = sums[10]
            if num_prefix:
                grad_input_bias = grad_input_bias + grad_x[:, :num_prefix].sum((0, 1), dtype=torch.float32)
    else:
        sums = _weight_grad(x, grad_pre, H, W, num_prefix).sum(0)  # (10, C)
        # the input gradient: the same convolution of the output's (with gelu, the pre-activation's)
        # gradient with the kernel flipped
        _launch_conv(grad_pre, weight, None, grad_x, (H, W), num_prefix, flip=True, residual=residual)
        if input_bias_grad:
            grad_input_bias = grad_x.sum((0, 1), dtype=torch.float32)
    grad_w = sums[:9].t().reshape(weight.shape).to(weight.dtype).contiguous()
    return grad_x, grad_w, sums[9].clone(), grad_input_bias


def _setup(ctx, inputs, output) -> None:
    x, weight, bias, H, W, num_prefix, residual, gelu, input_bias, save_gelu_grad = inputs
    gelu_grad = output[1] if save_gelu_grad else None
    ctx.save_for_backward(x, weight, bias if gelu and gelu_grad is None else None, gelu_grad)
    ctx.args = (H, W, num_prefix, residual, gelu, input_bias is not None)
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.input_bias_dtype = None if input_bias is None else input_bias.dtype


def _grads(ctx, grad: Tensor, grad_gelu_grad: Optional[Tensor], backward) -> tuple:
    x, weight, bias, gelu_grad = ctx.saved_tensors
    grad_x, grad_w, grad_b, grad_ib = backward(grad, x, weight, bias, gelu_grad, *ctx.args)
    grad_b = None if ctx.bias_dtype is None else grad_b.to(ctx.bias_dtype)
    grad_ib = None if ctx.input_bias_dtype is None else grad_ib.to(ctx.input_bias_dtype)
    return grad_x, grad_w, grad_b, None, None, None, None, None, grad_ib, None


# the operators vitpe::depthwise_conv_tokens(_backward) when compiled, an autograd.Function eager
_call = kernel_op("depthwise_conv_tokens", conv_tokens, conv_tokens_backward, _setup, _grads, non_differentiable=(1,))


def depthwise_conv_tokens(x: Tensor, weight: Tensor, bias: Optional[Tensor], grid: tuple[int, int],
                          num_prefix: int = 0, residual: bool = False, gelu: bool = False,
                          input_bias: Optional[Tensor] = None) -> Tensor:
    """``x`` ``(B, P + H*W, C)`` -> same shape: the patch rows convolved depthwise (``weight``
    ``(C, 1, k, k)``, zero padding ``k // 2``), plus themselves with ``residual``; prefix rows
    unchanged. With ``gelu``, the exact (erf) GELU of all that, prefix rows included: Mix-FFN's
    ``gelu(conv(x))`` in one kernel (not with ``residual``). Computed in float32, returned in
    ``x``'s dtype. With ``gelu``, recording gradients and ``SAVE_GELU_GRAD`` set, the forward
    also keeps GELU's derivative for the backward.

    ``input_bias`` ``(C,)``: a bias the caller has already added to ``x`` with its gradient cut
    (``F.linear(t, w, b.detach())``), whose gradient, ``x``'s summed over all rows, this call
    returns instead: with ``BWD_MERGED`` the backward kernel sums it in passing, saving the
    separate pass over ``x``'s gradient that autograd would make (Mix-FFN's fc1 bias). The output
    does not depend on it."""
    if weight.shape[-2:] != (3, 3):
        raise ValueError(f"the token depthwise kernels are 3x3; got a {tuple(weight.shape[-2:])} weight")
    if gelu and residual:
        raise ValueError("the token depthwise kernels apply GELU only without the residual (Mix-FFN, not PEG)")
    if input_bias is not None and input_bias.shape != (x.shape[-1],):
        raise ValueError(f"input_bias must have one value per channel ({x.shape[-1]}); got {tuple(input_bias.shape)}")
    if x.stride(-1) != 1 or x.stride(1) != x.shape[-1]:
        x = x.contiguous()
    save_gelu_grad = bool(gelu and SAVE_GELU_GRAD and torch.is_grad_enabled())
    args = (x, weight.contiguous(), bias, int(grid[0]), int(grid[1]), int(num_prefix), bool(residual), bool(gelu),
            input_bias, save_gelu_grad)
    return _call(*args)[0]
