"""Forward + backward time of one attention call, with and without an additive bias, per kernel.

    python benchmarks/attention_kernels.py --shape 256,6,197,64 --output runs/attention

This is the attention of one ViT-S/16 block at 224 px (batch 256, 6 heads, 197 tokens, head width
64), in bf16. ``rpb`` adds a learned ``(heads, T, T)`` bias, shared by the batch, whose gradient
is needed; the other strategies call the same function without one. Each row is one way of
computing it:

- ``sdpa:<backend>``: ``scaled_dot_product_attention`` restricted to one backend (``flash``,
  ``efficient``, ``cudnn``, ``math``); a backend that refuses the inputs is reported, not timed;
- ``explicit``: softmax(q k^T / sqrt(d) + bias) v written out, under ``torch.compile``;
- ``vitpe``: ``vitpe.layers.attention.attend``, what the models call (with a bias, in half
  precision, ``vitpe.kernels.attention``).

``--tiles`` times the kernels again with other values of ``vitpe.kernels.attention``'s tile
constants. Writes ``attention_kernels.json`` and ``.md`` (milliseconds per call, forward + backward).
On a GPU a call's time is its kernels' time under the profiler, as ``depthwise_kernels.py`` takes
it: timing the call itself gave 1.87 ms for ``vitpe`` with a bias, where the same kernels took
about 0.84 ms of a block in the model (the host's launches and the gradients' accumulation into
the inputs are the likely difference). Each row also names its longest kernels. The inputs'
gradients are dropped before each call, so none is accumulated, as in the model, where these
gradients flow on to the projections.
"""
from __future__ import annotations

import argparse
import math
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from depthwise_kernels import largest, median_ms  # noqa: E402
from throughput import parse_tiles, sdpa_backends, tile_settings, write_rows  # noqa: E402

from vitpe import kernels  # noqa: E402
from vitpe.layers.attention import attend  # noqa: E402
from vitpe.pos.base import BlockPos  # noqa: E402

Attn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def sdpa_with(backend: str) -> Attn:
    from torch.nn.attention import sdpa_kernel

    kind = sdpa_backends()[backend]

    def call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        with sdpa_kernel([kind]):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=None if bias is None else bias.to(q.dtype))
    return call


@torch.compile
def explicit(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    logits = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    if bias is not None:
        logits = logits + bias.to(q.dtype)
    return logits.float().softmax(-1).to(q.dtype) @ v


def vitpe_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return attend(q, k, v, BlockPos((1, q.shape[-2]), 0, bias=bias))


KERNELS: dict[str, Attn] = {"sdpa:flash": sdpa_with("flash"), "sdpa:efficient": sdpa_with("efficient"),
                            "sdpa:cudnn": sdpa_with("cudnn"), "sdpa:math": sdpa_with("math"),
                            "explicit": explicit, "vitpe": vitpe_attend}


def time_one(fn: Attn, args: argparse.Namespace, with_bias: bool) -> dict[str, Any]:
    """Milliseconds of forward + backward, and the bias gradient's error against float32 math."""
    device, dtype = torch.device(args.device), torch.bfloat16 if args.device != "cpu" else torch.float32
    B, h, T, D = args.shape
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(B, h, T, D, generator=g).to(device, dtype).requires_grad_() for _ in range(3))
    table = (0.5 * torch.randn(h, T, T, generator=g)).to(device).requires_grad_() if with_bias else None
    grad = torch.randn(B, h, T, D, generator=g).to(device, dtype)

    def step() -> None:  # the float32 bias, as the models hand it over (torch's kernels need it cast)
        for t in (q, k, v, table):
            if t is not None:
                t.grad = None
        fn(q, k, v, table).backward(grad)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            step()
        except Exception as e:  # a backend that refuses the inputs, or a tile setting the GPU cannot run
            reasons = "; ".join(str(w.message).splitlines()[0] for w in caught)[:300]
            return {"ms": None, "error": (str(e).splitlines()[0] + (f" ({reasons})" if reasons else ""))[:400]}
    out: dict[str, Any] = {}
    if table is not None:  # the first call's bias gradient against float32 math
        qf, kf, vf = (t.detach().float() for t in (q, k, v))
        ref = table.detach().clone().requires_grad_()
        attn = ((qf @ kf.transpose(-1, -2)) / math.sqrt(D) + ref).softmax(-1)
        (attn @ vf).backward(grad.float())
        out["bias_grad_rel_err"] = ((table.grad - ref.grad).norm() / ref.grad.norm()).item()
    by_kernel: dict[str, float] = {}
    out["ms"] = median_ms(step, args.steps, args.warmup, device, by_kernel)
    if by_kernel:
        out["kernels_us"] = dict(sorted(by_kernel.items(), key=lambda kv: -kv[1]))
    return out


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every tile setting, kernel and bias choice; the files are rewritten after each row."""
    rows = []
    for spec in args.tiles:
        with tile_settings(kernels.attention, spec):
            for name in args.kernels:
                for with_bias in (False, True):
                    r = dict(kernel=name, tiles=spec or "default", bias=with_bias,
                             **time_one(KERNELS[name], args, with_bias))
                    rows.append(r)
                    print(markdown([r], header=len(rows) == 1), flush=True)
                    write_rows(args, "attention_kernels", rows, markdown(rows))
    return rows


def markdown(rows: list[dict[str, Any]], header: bool = True) -> str:
    lines = ["| kernel | tiles | bias | fwd+bwd ms | bias grad rel. error | largest kernels, µs per call | note |",
             "|---|---|---|---|---|---|---|"] if header else []
    for r in rows:
        ms = "-" if r["ms"] is None else f"{r['ms']:.3f}"
        err = f"{r['bias_grad_rel_err']:.1e}" if "bias_grad_rel_err" in r else "-"
        lines.append(f"| {r['kernel']} | {r['tiles']} | {'yes' if r['bias'] else 'no'} | {ms} | {err} | "
                     f"{largest(r.get('kernels_us') or {})} | {r.get('error', '')} |")
    return "\n".join(lines)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", type=lambda s: tuple(int(v) for v in s.split(",")), default=(256, 6, 197, 64),
                   metavar="B,HEADS,T,D")
    p.add_argument("--kernels", type=lambda s: s.split(","), default=list(KERNELS), help=", ".join(KERNELS))
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiles", nargs="*", default=[""], metavar="NAME=V,...",
                   help="tile settings of vitpe.kernels.attention to time one after another, each a comma-"
                   "separated list of its constants (e.g. 'BWD_BLOCK_M=64,BWD_NUM_WARPS=8'); '' is its own")
    p.add_argument("--output", type=Path, default=Path("runs/attention"))
    args = p.parse_args(argv)
    bad = [k for k in args.kernels if k not in KERNELS]
    if bad:
        p.error(f"unknown kernel {bad[0]!r}; choose from {', '.join(KERNELS)}")
    for spec in args.tiles:
        try:
            parse_tiles(kernels.attention, spec)
        except ValueError as e:
            p.error(str(e))
    return args


if __name__ == "__main__":
    run(parse())
