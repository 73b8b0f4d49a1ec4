"""How fast a ViT training step could be if only its matrix products and attention took time.

    python benchmarks/step_ceiling.py --size base --batch-size 256 --output runs/ceiling

Times, alone and in bf16, every matrix product of one block's training step at the model's shapes
(forward, input gradient and weight gradient of qkv, proj, fc1 and fc2, as ``F.linear`` and
plain products: cuBLAS on a GPU) and the block's attention forward + backward through
``scaled_dot_product_attention`` (torch's choice of kernel), and a large square product for the
card's own peak. Sums them over the blocks and reports the step's ceiling: its FLOPs over the
time of these products and attention alone, as TFLOP/s and as a share of ``--peak-tflops``.
Compared with a measured step (``throughput.py``), the difference is the time of everything
else: layer norms, biases and GELU, residual adds, copies, casts and the optimizer. Writes
``step_ceiling.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import timed, write_rows  # noqa: E402

from vitpe.models.vit import _SIZES as SIZES  # noqa: E402  (width, depth and heads of each size)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="base", choices=sorted(SIZES))
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--resolution", type=int, default=224)
    p.add_argument("--patch", type=int, default=16)
    p.add_argument("--depth", type=int, default=None, help="override the block count")
    p.add_argument("--square", type=int, default=8192, help="side of the square product timed for the peak")
    p.add_argument("--peak-tflops", type=float, default=798.0, help="the peak the ceiling is a share of")
    p.add_argument("--calls", type=int, default=50, help="timed calls of each product")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--output", type=Path, default=Path("runs/step_ceiling"))
    return p.parse_args(argv)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    width, heads = SIZES[args.size]["embed_dim"], SIZES[args.size]["num_heads"]
    depth = args.depth or SIZES[args.size]["depth"]
    tokens = (args.resolution // args.patch) ** 2 + 1  # and the class token
    M = args.batch_size * tokens
    like = {"device": device, "dtype": dtype}
    rows = []
    for name, n_out, k in (("qkv", 3 * width, width), ("proj", width, width), ("fc1", 4 * width, width),
                           ("fc2", width, 4 * width)):
        x, w, b = torch.randn(M, k, **like), torch.randn(n_out, k, **like), torch.randn(n_out, **like)
        gy = torch.randn(M, n_out, **like)
        for part, fn in (("forward", lambda: F.linear(x, w, b)), ("input gradient", lambda: gy @ w),
                         ("weight gradient", lambda: gy.t() @ x)):
            t = 1e3 * timed(fn, args.calls, 3, device)  # ms a call
            rows.append({"product": name, "part": part, "shape": f"{M}x{k} -> {n_out}", "ms": t,
                         "gflop": 2 * M * n_out * k / 1e9})
    q, k, v = (torch.randn(args.batch_size, heads, tokens, width // heads, **like, requires_grad=True)
               for _ in range(3))
    go = torch.randn_like(q)

    def attention() -> None:
        torch.autograd.grad(F.scaled_dot_product_attention(q, k, v), (q, k, v), go)

    att_ms = 1e3 * timed(attention, args.calls, 3, device)
    # counted as throughput.py counts a step: three forwards of two (tokens x tokens) products a head
    att_gflop = 3 * 4 * args.batch_size * heads * tokens ** 2 * (width // heads) / 1e9
    big = torch.randn(args.square, args.square, **like)
    square_ms = 1e3 * timed(lambda: big @ big, max(3, args.calls // 5), 3, device)
    products_ms = depth * sum(r["ms"] for r in rows)
    products_gflop = depth * sum(r["gflop"] for r in rows)
    floor_ms = products_ms + depth * att_ms
    gflop = products_gflop + depth * att_gflop
    tflops = gflop / floor_ms  # GFLOP per ms = TFLOP/s
    return {"size": args.size, "depth": depth, "batch_size": args.batch_size, "tokens": tokens, "dtype": str(dtype),
            "square_tflops": 2 * args.square ** 3 / square_ms / 1e9, "products": rows,
            "products_ms": products_ms, "products_tflops": products_gflop / products_ms,
            "attention_ms_per_block": att_ms, "attention_tflops": att_gflop / att_ms, "attention_ms": depth * att_ms,
            "ceiling_ms": floor_ms, "ceiling_gflop": gflop, "ceiling_tflops": tflops,
            "ceiling_share_of_peak": tflops / args.peak_tflops, "peak_tflops": args.peak_tflops}


def markdown(r: dict[str, Any]) -> str:
    lines = [f"ViT-{r['size']} ({r['depth']} blocks), batch {r['batch_size']}, {r['tokens']} tokens, {r['dtype']}; "
             f"a {r['square_tflops']:.0f} TFLOP/s square product", "",
             "| product | part | shape | ms | TFLOP/s |", "|---|---|---|---|---|"]
    lines += [f"| {p['product']} | {p['part']} | {p['shape']} | {p['ms']:.3f} | {p['gflop'] / p['ms']:.0f} |"
              for p in r["products"]]
    lines += ["", "| part of the step | ms | TFLOP/s |", "|---|---|---|",
              f"| all blocks' products | {r['products_ms']:.1f} | {r['products_tflops']:.0f} |",
              f"| all blocks' attention | {r['attention_ms']:.1f} | {r['attention_tflops']:.0f} |",
              f"| both: the step's ceiling | {r['ceiling_ms']:.1f} | {r['ceiling_tflops']:.0f} "
              f"({100 * r['ceiling_share_of_peak']:.0f} % of {r['peak_tflops']:.0f}) |"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    result = measure(args)
    table = markdown(result)
    write_rows(args, "step_ceiling", [result], table)
    print(table)
    return result


if __name__ == "__main__":
    main()
