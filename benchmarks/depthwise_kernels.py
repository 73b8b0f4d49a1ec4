"""Forward and forward + backward time of Mix-FFN's token convolution and GELU, per way of computing it.

    python benchmarks/depthwise_kernels.py --output runs/depthwise          # on a GPU, bf16
    python benchmarks/depthwise_kernels.py --smoke --output runs/smoke      # tiny, on CPU too
    python benchmarks/depthwise_kernels.py --tiles '' 'CONV_WARPS=8' 'WG_TILE=1024,WG_WAVES=4'  # a sweep
    python benchmarks/depthwise_kernels.py --variants fused --tiles '' 'STRIP_FIT=1'  # one way, two settings

Shapes ``B,H,W,C,P`` (batch, grid, channels, prefix tokens): Mix-FFN's hidden layer of ViT-S/16 at
224 px (256,14,14,1536,1) and at 384 px with batch 64 (64,24,24,1536,1), and of MiT-B2's first two
stages at 512 px, batch 8 (8,128,128,256,0 and 8,64,64,512,0). Each row is one way of computing
``gelu(conv(x))`` on ``(B, P + H*W, C)`` tokens, with the gradients of ``x``, the weight, the bias
and of a bias added to ``x`` before (fc1's in Mix-FFN, handed to the convolution as ``input_bias``:
summed by the kernels' backward with ``BWD_MERGED=1``, by torch otherwise):

- ``unfused``: ``vitpe.kernels.depthwise_conv_tokens``, then torch's GELU;
- ``fused``: the same kernel with ``gelu=True`` (the activation inside the convolution's kernels);
- ``cudnn``: the tokens as a channels-last map through ``nn.Conv2d`` (cuDNN), then torch's GELU;
- ``copy``: a copy of the tokens (one read and one write), the scale for the column ``passes``:
  a row's time in units of one pass over the tensor (half the copy's).

``--variants`` picks some of the first three (``copy`` is always timed; errors are measured
against ``cudnn``'s output, computed once whether or not its row is timed).

Tokens in bf16 and the convolution's parameters in float32 under autocast, as in mixed-precision
training (float32 throughout on CPU). Without the Triton kernels (CPU) ``unfused`` and ``fused``
run ``GridConv``'s torch path, and the column ``kernel`` says so. Times are per call over
``--steps`` calls after ``--warmup``: on a GPU the kernels' own time under the profiler (the
host's launches would otherwise be what is timed), on CPU the median wall-clock time.
``max_err`` is the largest difference of the output and of ``x``'s gradient from ``cudnn``'s. On a
GPU each row also gets its kernels' times per forward + backward (``kernels_us``; the three
longest in the table), which says which of the convolution, weight-gradient and GELU kernels a
tile setting changed.
Writes ``depthwise_kernels.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import failure, parse_tiles, tile_settings, write_rows  # noqa: E402

from vitpe import kernels  # noqa: E402
from vitpe.pos.functional import GridConv  # noqa: E402

SHAPES = [(256, 14, 14, 1536, 1), (64, 24, 24, 1536, 1), (8, 128, 128, 256, 0), (8, 64, 64, 512, 0)]
SMOKE_SHAPES = [(2, 3, 4, 8, 1), (1, 4, 4, 16, 0)]
VARIANTS = ("unfused", "fused", "cudnn", "copy")
Shape = tuple[int, int, int, int, int]


def median_ms(fn: Callable[[], Any], steps: int, warmup: int, device: torch.device,
              by_kernel: dict[str, float] | None = None) -> float:
    """Milliseconds of one call of ``fn``. On a GPU, the time of its kernels, summed under the
    profiler over ``steps`` calls: one call's launches take the host longer than its kernels take
    the GPU, so timing the call itself (events or the clock) measures the host. On CPU, the
    median of the calls' wall-clock times."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        from torch.autograd import DeviceType
        from torch.profiler import ProfilerActivity, profile

        torch.cuda.synchronize(device)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                fn()
            torch.cuda.synchronize(device)
        kernels_us = {e.key: e.self_device_time_total / steps for e in prof.key_averages()
                      if e.device_type == DeviceType.CUDA and e.self_device_time_total > 0}
        if by_kernel is not None:
            by_kernel.update(kernels_us)
        return sum(kernels_us.values()) / 1000
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


def forward_of(variant: str, conv: GridConv, grid: tuple[int, int], num_prefix: int,
               input_bias: torch.Tensor) -> Callable:
    """``x -> gelu(conv(x))`` computed as ``variant`` says, ``input_bias`` getting its gradient."""
    def unfused(x: torch.Tensor) -> torch.Tensor:
        return F.gelu(conv(x, grid, num_prefix, input_bias=input_bias))

    def fused(x: torch.Tensor) -> torch.Tensor:
        return conv(x, grid, num_prefix, gelu=True, input_bias=input_bias)

    def cudnn(x: torch.Tensor) -> torch.Tensor:
        kernels.depthwise.ENABLED, saved = False, kernels.depthwise.ENABLED
        try:
            return F.gelu(conv(x, grid, num_prefix, input_bias=input_bias))
        finally:
            kernels.depthwise.ENABLED = saved

    return {"unfused": unfused, "fused": fused, "cudnn": cudnn}[variant]


def time_shape(shape: Shape, args: argparse.Namespace, tiles: str = "default") -> list[dict[str, Any]]:
    """The rows of one shape, one per variant; ``tiles`` labels them."""
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    B, H, W, C, P = shape
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(B, P + H * W, C, generator=g).to(device, torch.bfloat16 if cuda else torch.float32)
    x.requires_grad_()
    grad = torch.randn(x.shape, generator=g).to(device, x.dtype)
    conv = GridConv(C).to(device)
    input_bias = torch.zeros(C, device=device, requires_grad=True)
    params = [x, conv.proj.weight, conv.proj.bias, input_bias]
    src, out = x.detach(), x.detach().clone()
    copy_ms = median_ms(lambda: out.copy_(src), args.steps, args.warmup, device)
    pass_ms = copy_ms / 2
    rows = [dict(shape=list(shape), tiles=tiles, variant="copy", kernel=False, fwd_ms=copy_ms, fwd_bwd_ms=None,
                 passes=2.0, max_err=None)]
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
        fns = {v: forward_of(v, conv, (H, W), P, input_bias) for v in VARIANTS[:3]}
        ref = fns["cudnn"](x)
        ref_grad = torch.autograd.grad(ref, x, grad)[0]
        for variant, fn in fns.items():
            if variant not in args.variants:
                continue
            def forward() -> None:
                with torch.no_grad():
                    fn(x)

            def step() -> None:
                torch.autograd.grad(fn(x), params, grad)

            row = dict(shape=list(shape), tiles=tiles, variant=variant, kernel=variant != "cudnn" and kernels.available(x))
            try:
                y = fn(x)
                err = max((y - ref).abs().max().item(),
                          (torch.autograd.grad(y, x, grad)[0] - ref_grad).abs().max().item())
                by_kernel: dict[str, float] = {}
                fwd_bwd = median_ms(step, args.steps, args.warmup, device, by_kernel)
                row.update(fwd_ms=median_ms(forward, args.steps, args.warmup, device), fwd_bwd_ms=fwd_bwd,
                           passes=fwd_bwd / pass_ms, max_err=err,
                           kernels_us=dict(sorted(by_kernel.items(), key=lambda kv: -kv[1])))
            except Exception as e:  # e.g. a tile setting the GPU cannot run: the row says so, the sweep goes on
                row.update(fwd_ms=None, fwd_bwd_ms=None, passes=None, max_err=None, error=failure(
                    f"{','.join(map(str, shape))} {tiles} {variant}", e)["error"])
            rows.append(row)
    return rows


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every tile setting and shape; the files are rewritten after each, so a run cut short keeps
    what it measured."""
    rows: list[dict[str, Any]] = []
    for spec in args.tiles:
        with tile_settings(kernels.depthwise, spec):
            for shape in args.shapes:
                new = time_shape(shape, args, spec or "default")
                print(markdown(new, header=not rows), flush=True)
                rows += new
                write_rows(args, "depthwise_kernels", rows, markdown(rows))
    return rows


def largest(kernels_us: dict[str, float], n: int = 3) -> str:
    """The ``n`` longest kernels as ``name time``, names cut to the function (GPU runs only)."""
    return ", ".join(f"{name.split('(')[0].split('<')[0].split('::')[-1][-32:]} {us:.0f}"
                     for name, us in list(kernels_us.items())[:n]) or "-"


def markdown(rows: list[dict[str, Any]], header: bool = True) -> str:
    lines = ["| B,H,W,C,P | tiles | variant | kernel | fwd ms | fwd+bwd ms | fwd+bwd passes | max err | "
             "largest kernels, µs per fwd+bwd |", "|---|---|---|---|---|---|---|---|---|"] if header else []
    for r in rows:
        shape = ",".join(map(str, r["shape"]))
        fwd = "-" if r["fwd_ms"] is None else f"{r['fwd_ms']:.3f}"
        fwd_bwd = "-" if r["fwd_bwd_ms"] is None else f"{r['fwd_bwd_ms']:.3f}"
        passes = "-" if r["passes"] is None else f"{r['passes']:.1f}"
        err = "-" if r["max_err"] is None else f"{r['max_err']:.1e}"
        note = f"failed: {r['error'].replace('|', '/')}" if "error" in r else largest(r.get("kernels_us") or {})
        lines.append(f"| {shape} | {r['tiles']} | {r['variant']} | {'yes' if r['kernel'] else 'no'} | {fwd} | "
                     f"{fwd_bwd} | {passes} | {err} | {note} |")
    return "\n".join(lines)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", type=lambda s: [tuple(int(v) for v in t.split(",")) for t in s.split(";")],
                   default=None, metavar="B,H,W,C,P;...", help="default: the four above")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--smoke", action="store_true", help="tiny shapes, 2 steps after 1 warm-up: checks the script runs")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiles", nargs="*", default=[""], metavar="NAME=V,...",
                   help="tile settings to time one after another, each a comma-separated list of "
                   "vitpe.kernels.depthwise's constants (e.g. 'WG_WARPS=8' 'CONV_TILE=1024,CONV_WARPS=8'); "
                   "'' is the module's own (the default)")
    p.add_argument("--variants", type=lambda s: s.split(","), default=list(VARIANTS[:3]), metavar="V,...",
                   help=f"which of {', '.join(VARIANTS[:3])} to time (default: all; copy always)")
    p.add_argument("--output", type=Path, default=Path("runs/depthwise"))
    args = p.parse_args(argv)
    unknown = sorted(set(args.variants) - set(VARIANTS[:3]))
    if unknown:
        p.error(f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(VARIANTS[:3])}")
    for spec in args.tiles:
        try:
            parse_tiles(kernels.depthwise, spec)
        except ValueError as e:
            p.error(str(e))
    if args.smoke:
        args.shapes, args.steps, args.warmup = args.shapes or SMOKE_SHAPES, 2, 1
    args.shapes = args.shapes or SHAPES
    bad = [s for s in args.shapes if len(s) != 5]
    if bad:
        p.error(f"a shape is B,H,W,C,P; got {bad[0]}")
    return args


if __name__ == "__main__":
    run(parse())
