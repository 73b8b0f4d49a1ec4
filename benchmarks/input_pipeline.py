"""End-to-end classification training throughput: synthetic tensors against real JPEGs decoded on CPU or GPU.

    python benchmarks/input_pipeline.py --workers 8,16 --output runs/input_pipeline     # H100, ~2 minutes

Writes a folder of JPEGs (ImageNet layout, ``--image-size`` like ImageNet's typical 500x375, smooth
random colour fields plus noise, so that they compress like photographs rather than flat colour)
into a temporary folder, then trains ``--model`` for ``--warmup`` + ``--steps`` steps through
train_cls.py's own training functions (``build_train_val``, ``build_train_loader``,
``train_one_epoch``) on: ``synthetic``, a fixed batch already on the device (no data loading at
all: the upper bound); ``cpu``, PIL decoding and timm's transform in W DataLoader workers, for
each W of ``--workers``; ``gpu``, ``data.decode=gpu`` (files read in ``--gpu-workers`` workers,
decoded with nvjpeg, cropped, flipped and normalised on the GPU). Reports images/s over the timed
steps, the ratio to ``synthetic``, and the share of the time the loop waited for a batch.
Writes ``input_pipeline.json`` and ``input_pipeline.md`` to ``--output``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torchvision
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_cls  # noqa: E402  (the script's own helpers: model_stats)
from vitpe.config import ModelConfig, OptimConfig, RunConfig  # noqa: E402
from vitpe.data.classification import AugConfig, ClsDataConfig, build_train_val, resolve_crop_pct  # noqa: E402
from vitpe.engine.classification import (ClsConfig, build_criterion, build_model, build_train_loader,  # noqa: E402
                                         train_one_epoch)
from vitpe.engine.loop import seed_epoch, seed_everything  # noqa: E402
from vitpe.engine.optim import build_optimizer, build_scheduler  # noqa: E402


# -- the JPEG folder -----------------------------------------------------------------------------
def render_jpeg(args: tuple[int, int, int, Path]) -> int:
    """One ``w`` x ``h`` JPEG: a bicubic-upscaled 1/32-size random field plus pixel noise. Returns its bytes."""
    seed, w, h, path = args
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (max(h // 32, 2), max(w // 32, 2), 3), dtype=np.uint8))
    smooth = np.asarray(coarse.resize((w, h), Image.BICUBIC), dtype=np.float32)
    img = np.clip(smooth + rng.normal(0, 10, smooth.shape), 0, 255).astype(np.uint8)
    Image.fromarray(img).save(path, quality=90)
    return path.stat().st_size


def write_folder(root: Path, total: int, unique: int, classes: int, size: tuple[int, int], jobs: int) -> dict:
    """``root/train/cNN/*.jpg`` and a one-image ``root/val``: ``unique`` rendered JPEGs, repeated
    as hard links up to ``total`` files (decoding cost does not depend on repetition)."""
    base = root / "unique"
    base.mkdir(parents=True)
    paths = [base / f"{i:05d}.jpg" for i in range(unique)]
    todo = [(i, *size, p) for i, p in enumerate(paths)]
    if jobs > 1 and unique >= 64:
        with ProcessPoolExecutor(jobs) as pool:
            sizes = list(pool.map(render_jpeg, todo, chunksize=16))
    else:
        sizes = [render_jpeg(t) for t in todo]
    for split, n in (("train", total), ("val", classes)):
        for i in range(n):
            dst = root / split / f"c{i % classes:02d}" / f"{i:06d}.jpg"
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(paths[i % unique], dst)
            except OSError:  # a file system without hard links
                shutil.copyfile(paths[i % unique], dst)
    return {"files": total, "unique": unique, "mean_kb": float(np.mean(sizes)) / 1024, "size": list(size)}


# -- timing --------------------------------------------------------------------------------------
class Timed:
    """Wraps a loader: notes when batch ``warmup`` is requested (after a device sync) and how long
    the loop then waits for each batch."""

    def __init__(self, loader: Any, warmup: int, device: torch.device) -> None:
        self.loader, self.warmup, self.device = loader, warmup, device
        self.sampler = loader.sampler
        self.start, self.wait = 0.0, 0.0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        it = iter(self.loader)
        for k in range(len(self.loader)):
            if k == self.warmup:
                sync(self.device)
                self.start = time.perf_counter()
            t = time.perf_counter()
            item = next(it)
            if k >= self.warmup:
                self.wait += time.perf_counter() - t
            yield item


class SyntheticBatches:
    """The same device-resident batch ``n`` times: training with no data loading at all."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, n: int) -> None:
        self.x, self.y, self.n = x, y, n
        self.sampler = self  # train_cls calls loader.sampler.set_epoch

    def set_epoch(self, epoch: int) -> None:
        pass

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return iter([(self.x, self.y)] * self.n)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- the runs ------------------------------------------------------------------------------------
def config(args: argparse.Namespace, folder: Path, decode: str, workers: int) -> ClsConfig:
    """train_cls's config for one run: DeiT's crop scale, flip, label smoothing; no mixup (it does
    not touch decoding)."""
    data = ClsDataConfig(path=str(folder), img_size=args.img_size, batch_size=args.batch_size, workers=workers,
                         decode=decode)
    model = ModelConfig(name=args.model, pos=args.pos, kwargs=json.loads(args.model_kwargs))
    run = RunConfig(epochs=1, output=str(folder / "run"), device=args.device, amp=args.bf16, compile=args.compile,
                    log_interval=10**9)
    return ClsConfig(data=data, model=model, optim=OptimConfig(lr=1e-4, warmup_epochs=0.0),
                     aug=AugConfig(scale=(0.08, 1.0)), run=run)


def run_mode(net: torch.nn.Module, cfg: ClsConfig, mode: str, device: torch.device, warmup: int, steps: int,
             num_classes: int) -> dict[str, Any]:
    """Train one epoch of ``warmup`` + ``steps`` steps (the folder holds that many batches); images/s
    over the last ``steps``."""
    mean, std = train_cls.model_stats(cfg.model.name)
    n = cfg.data.batch_size
    if mode == "synthetic":
        x = torch.randn(n, 3, cfg.data.img_size, cfg.data.img_size, device=device)
        loader: Any = SyntheticBatches(x.contiguous(memory_format=torch.channels_last),
                                       torch.randint(0, num_classes, (n,), device=device), warmup + steps)
    else:
        resolve_crop_pct(cfg.data, cfg.model.name)
        train_set, _, _ = build_train_val(cfg.data, cfg.aug, mean, std, cfg.run.seed)
        loader = build_train_loader(cfg, train_set, device, mean, std)
    timed = Timed(loader, warmup, device)
    optimizer = build_optimizer(net, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, len(timed), 1)
    seed_epoch(cfg.run.seed, 0)
    stats = train_one_epoch(net, timed, optimizer, scheduler, build_criterion(cfg.aug, None), device, 0, cfg)
    elapsed = time.perf_counter() - timed.start  # train_one_epoch ends on a device sync (the loss sum)
    images = (len(timed) - warmup) * n - stats["skipped"]
    return {"img_s": images / elapsed, "wait_share": timed.wait / elapsed, "seconds": elapsed,
            "train_loss": stats["train_loss"], "skipped": stats["skipped"]}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    a = p.add_argument
    a("--model", default="vitpe_vit_small_patch16_224")
    a("--pos", default="learned")
    a("--model-kwargs", default="{}", help='JSON, e.g. \'{"depth": 1}\'')
    a("--img-size", type=int, default=224)
    a("--batch-size", type=int, default=256)
    a("--warmup", type=int, default=10, help="untimed steps (worker start-up, cuDNN/compile warm-up)")
    a("--steps", type=int, default=30, help="timed steps")
    a("--workers", default="8,16", help="DataLoader workers of the cpu runs, comma-separated")
    a("--gpu-workers", type=int, default=6, help="DataLoader workers (file reading only) of the gpu run")
    a("--modes", default="synthetic,cpu,gpu")
    a("--unique", type=int, default=1024, help="distinct JPEGs rendered (the rest are hard links)")
    a("--image-size", default="500x375", help="JPEG width x height")
    a("--classes", type=int, default=10)
    a("--data", help="use this ImageNet-layout folder (with train/) instead of writing one")
    a("--device", default="auto")
    a("--no-bf16", dest="bf16", action="store_false")
    a("--compile", action="store_true")
    a("--output", default="runs/input_pipeline")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    args.device = str(device)
    modes = args.modes.split(",")
    total = (args.warmup + args.steps) * args.batch_size
    with tempfile.TemporaryDirectory(prefix="vitpe_jpegs_") as tmp:
        folder = Path(args.data) if args.data else Path(tmp)
        w, h = (int(v) for v in args.image_size.split("x"))
        made = {} if args.data else write_folder(folder, total, args.unique, args.classes, (w, h), os.cpu_count() or 1)
        num_classes = len(build_train_val(ClsDataConfig(path=str(folder), crop_pct=1.0), AugConfig(), (0,) * 3,
                                           (1,) * 3)[2])
        seed_everything(0)
        cfg0 = config(args, folder, "cpu", 0)
        model = build_model(cfg0.model, num_classes, args.img_size).to(device)
        net = torch.compile(model) if args.compile else model
        runs = [("synthetic", 0)] if "synthetic" in modes else []
        runs += [("cpu", int(k)) for k in args.workers.split(",")] if "cpu" in modes else []
        runs += [("gpu", args.gpu_workers)] if "gpu" in modes else []
        rows = []
        for mode, workers in runs:
            cfg = config(args, folder, "gpu" if mode == "gpu" else "cpu", workers)
            row = {"mode": mode, "workers": workers,
                   **run_mode(net, cfg, mode, device, args.warmup, args.steps, num_classes)}
            rows.append(row)
            print(f"{mode:9s} workers={workers:2d}: {row['img_s']:8.1f} img/s  (waiting for data "
                  f"{100 * row['wait_share']:.0f}% of the time)", flush=True)
    base = next((r["img_s"] for r in rows if r["mode"] == "synthetic"), None)
    for r in rows:
        r["ratio"] = r["img_s"] / base if base else None
    result = {"args": vars(args), "data": made, "rows": rows, "env": environment(device)}
    write_outputs(result, Path(args.output))
    return result


def environment(device: torch.device) -> dict[str, Any]:
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "cpus": os.cpu_count(), "torch": torch.__version__, "torchvision": torchvision.__version__}


def write_outputs(result: dict[str, Any], out: Path) -> None:
    """``input_pipeline.json`` and ``input_pipeline.md`` (one row per run)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "input_pipeline.json").write_text(json.dumps(result, indent=2))
    a, env = result["args"], result["env"]
    lines = [f"{a['model']} ({a['pos']}), {a['img_size']} px, batch {a['batch_size']}, "
             f"{'bf16' if a['bf16'] else 'fp32'}{', compiled' if a['compile'] else ''}; {env['device']}, "
             f"{env['cpus']} CPUs, torch {env['torch']}, torchvision {env['torchvision']}", "",
             "| input | workers | img/s | vs synthetic | waiting for data |", "|---|---|---|---|---|"]
    names = {"synthetic": "synthetic tensors on the device", "cpu": "JPEG, PIL + timm transform in workers",
             "gpu": "JPEG, decode_jpeg + crop/flip on the device"}
    for r in result["rows"]:
        ratio = f"{r['ratio']:.2f}x" if r["ratio"] is not None else "-"
        lines.append(f"| {names[r['mode']]} | {r['workers']} | {r['img_s']:.1f} | {ratio} | "
                     f"{100 * r['wait_share']:.0f}% |")
    (out / "input_pipeline.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
