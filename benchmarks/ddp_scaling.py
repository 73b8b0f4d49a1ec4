"""Data-parallel scaling of a ViT training step: images/s on N processes against one.

    torchrun --standalone --nproc_per_node=2 benchmarks/ddp_scaling.py --output runs/ddp/scaling.json
    python benchmarks/ddp_scaling.py --driver 1,2 --output runs/ddp/scaling.json   # both, then the ratio

Every process trains ``--model`` (ViT-S/16 at 224 by default, ``--pos`` its strategy) on random
tensors already on its device, with a fixed batch per process (weak scaling: the global batch
grows with the processes, as in a run that keeps its per-GPU batch), bf16 autocast,
channels_last input and AdamW; the model is wrapped by vitpe's ``wrap_model`` (DDP with several
processes, the bare model with one), optionally compiled. After ``--warmup`` steps ``--steps``
are timed, and the slowest process's time gives the global images/s. The main process then
checks that the replicas hold identical weights and adds the result under the process count to
the JSON, keeping the other entries, so that runs on 1 and 2 processes fill one file.

``--driver 1,2`` launches ``torchrun`` once per count (on CPU with gloo too: ``--device cpu``),
then prints a markdown table with the scaling ratio against one process (also written beside the
JSON as ``.md``).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import timm
import torch
import torch.distributed as torch_dist
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import vitpe  # noqa: E402,F401  (registers the models)
from vitpe.engine import distributed as dist  # noqa: E402


def build(args: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    """The benchmarked model, the same initial weights in every process."""
    torch.manual_seed(0)
    kw = {k: v for k, v in (("depth", args.depth), ("embed_dim", args.embed_dim), ("num_heads", args.num_heads))
          if v is not None}
    model = timm.create_model(args.model, pos=args.pos, img_size=args.img_size, num_classes=args.num_classes, **kw)
    return model.to(device).to(memory_format=torch.channels_last)


def time_steps(args: argparse.Namespace, model: torch.nn.Module, device: torch.device) -> float:
    """Seconds for ``args.steps`` training steps after ``args.warmup`` untimed ones, the slowest process's."""
    gen = torch.Generator(device).manual_seed(dist.rank())
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device, generator=gen)
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, args.num_classes, (args.batch_size,), device=device, generator=gen)
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if args.amp else nullcontext()
    net = dist.wrap_model(model, device)
    if args.compile:
        dist.compile_under_ddp(args.compile_ddp)
        net = torch.compile(net)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step() -> None:
        with amp:
            loss = F.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    sync()
    dist.barrier()  # every process starts the clock together
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64, device=device)
    if dist.is_distributed():
        torch_dist.all_reduce(elapsed, op=torch_dist.ReduceOp.MAX)
    return float(elapsed.item())


def replicas_in_sync(model: torch.nn.Module) -> bool:
    """True when every process holds bit-identical weights (DDP averaged the same gradients)."""
    with torch.no_grad():
        flat = torch.cat([p.detach().float().flatten() for p in model.parameters()])
        digest = (float(flat.double().sum()), float(flat.double().abs().sum()), float(flat[::97].double().norm()))
    return len(set(dist.gather_objects(digest))) == 1


def measure(args: argparse.Namespace) -> dict[str, Any] | None:
    """Run in every process; the main process gets the result, the others None."""
    device = dist.init_distributed(args.device)
    try:
        model = build(args, device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        seconds = time_steps(args, model, device)
        in_sync = replicas_in_sync(model)
        world = dist.world_size()
        mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
        result = dict(processes=world, batch_per_process=args.batch_size, global_batch=world * args.batch_size,
                      img_s=world * args.batch_size * args.steps / seconds,
                      img_s_per_process=args.batch_size * args.steps / seconds, step_ms=1e3 * seconds / args.steps,
                      replicas_in_sync=in_sync, peak_mem_gib=mem,
                      backend=torch_dist.get_backend() if dist.is_distributed() else "none",
                      device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu")
        return result if dist.is_main() else None
    finally:
        dist.cleanup()


def update_json(path: Path, args: argparse.Namespace, result: dict[str, Any]) -> dict[str, Any]:
    """Add ``result`` under its process count; a file measured with other settings is started afresh."""
    settings = {k: getattr(args, k) for k in ("model", "pos", "img_size", "batch_size", "amp", "compile",
                                               "compile_ddp", "steps", "warmup", "depth", "embed_dim",
                                               "num_heads")}
    data = json.loads(path.read_text()) if path.is_file() else {}
    if data.get("settings") != settings:
        data = {"settings": settings, "runs": {}}
    data.update(torch=torch.__version__, timm=timm.__version__)
    data["runs"][str(result["processes"])] = result
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))
    return data


def compiled(settings: dict[str, Any]) -> str:
    """``eager``, or ``compiled`` and how under DDP."""
    if not settings["compile"]:
        return "eager"
    return f"compiled ({settings.get('compile_ddp', 'buckets').replace('_', ' ')} under DDP)"


def markdown(data: dict[str, Any]) -> str:
    """One row per process count with the ratio of images/s to one process's."""
    runs = {int(k): v for k, v in data["runs"].items()}
    base = runs.get(1, {}).get("img_s")
    s = data["settings"]
    lines = [f"{s['model']} pos={s['pos']} {s['img_size']}px, batch {s['batch_size']} per process, "
             f"{'bf16' if s['amp'] else 'fp32'}, {compiled(s)}", "",
             "| processes | global batch | img/s | img/s per process | step ms | scaling | efficiency | in sync |",
             "|---|---|---|---|---|---|---|---|"]
    for n, r in sorted(runs.items()):
        ratio = r["img_s"] / base if base else float("nan")
        lines.append(f"| {n} | {r['global_batch']} | {r['img_s']:.0f} | {r['img_s_per_process']:.0f} | "
                     f"{r['step_ms']:.1f} | {ratio:.2f}x | {ratio / n:.0%} | {r['replicas_in_sync']} |")
    return "\n".join(lines)


def drive(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    """Launch torchrun with each process count in turn (one JSON gathers them), then print the table."""
    worker = [a for i, a in enumerate(argv)
              if a != "--driver" and not a.startswith("--driver=") and (i == 0 or argv[i - 1] != "--driver")]
    if args.output.is_file():
        args.output.unlink()  # a fresh comparison, never one mixed with an older run
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    for n in args.driver:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
               str(Path(__file__).resolve()), *worker]
        subprocess.run(cmd, env=env, check=True)
    data = json.loads(args.output.read_text())
    table = markdown(data)
    args.output.with_suffix(".md").write_text(table + "\n")
    print(table, flush=True)
    return data


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vitpe_vit_small_patch16_224")
    p.add_argument("--pos", default="learned", help="positional strategy")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=256, help="per process (the global batch grows with N)")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--depth", type=int, help="override the block count (quick checks)")
    p.add_argument("--embed-dim", type=int, help="override the width (quick checks)")
    p.add_argument("--num-heads", type=int, help="override the head count (quick checks)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True, help="bf16 autocast")
    p.add_argument("--compile", action="store_true", help="torch.compile the DDP-wrapped model")
    p.add_argument("--compile-ddp", choices=("one_graph", "buckets"), default="one_graph",
                   help="compiled under DDP: one graph (as the training scripts by default), or one per "
                   "gradient bucket (torch's default); see vitpe.engine.distributed.compile_under_ddp")
    p.add_argument("--device", default="auto", help="auto, cuda or cpu (gloo)")
    p.add_argument("--output", type=Path, default=Path("runs/ddp/scaling.json"))
    p.add_argument("--driver", type=lambda s: [int(v) for v in s.split(",") if v], metavar="N1,N2,...",
                   help="launch torchrun with each of these process counts and print the scaling")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    if args.driver:
        drive(args, argv)
        return
    result = measure(args)
    if result is not None:
        data = update_json(args.output, args, result)
        print(json.dumps(data["runs"][str(result["processes"])]), flush=True)


if __name__ == "__main__":
    main()
