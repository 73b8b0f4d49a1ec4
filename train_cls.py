"""Train an image classifier with a chosen positional strategy, then evaluate it across resolutions.

    python train_cls.py                                   # tiny ViT on the synthetic task, CPU, minutes
    python train_cls.py --config configs/cls/cifar10.yaml --pos peg --output runs/peg
    torchrun --nproc_per_node=2 train_cls.py --device cpu ...    # data parallel (gloo on CPU, NCCL on GPU)
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.utils import ModelEmaV3

from vitpe.cli import common_parser, run_cli, run_training
from vitpe.config import save_config, to_dict
from vitpe.data.classification import build_train_val, norm_stats, resolve_crop_pct
from vitpe.data.folder import cached_skips, collate_skipping
from vitpe.engine import distributed as dist
from vitpe.engine.checkpoint import check_resumed_classes, save_checkpoint
from vitpe.engine.classification import (ClsConfig, build_criterion, build_mixup, build_model, build_train_loader,
                                         default_kwargs_warning, evaluate, model_label, model_pos, train_one_epoch)
from vitpe.engine.loop import make_loader, restore_training_state, seed_epoch, seed_everything, training_state
from vitpe.engine.metrics_log import MetricsLog, summary_line
from vitpe.engine.optim import build_optimizer, build_scheduler
from vitpe.evaluate import check_sizes, evaluate_sizes, write_report

log = logging.getLogger("train_cls")


def model_stats(name: str) -> tuple[tuple, tuple]:
    """The model's normalisation statistics (CIFAR's for vitpe's 32-px models), ImageNet's otherwise."""
    import vitpe  # noqa: F401  (registers vitpe's models, so their configs are found)

    pc = timm.get_pretrained_cfg(name)
    return (tuple(pc.mean), tuple(pc.std)) if pc else (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)


def main(argv: Sequence[str] | None = None) -> int:
    return run_training(ClsConfig, common_parser(__doc__.splitlines()[0]).parse_args(argv), train)


def train(cfg: ClsConfig, device, resumed: dict | None) -> int:
    out = Path(cfg.run.output)
    note = default_kwargs_warning(cfg.model)
    if note and resumed is None and dist.is_main():
        log.warning(note)
    resolve_crop_pct(cfg.data, cfg.model.name)
    if dist.is_main():
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    mean, std = norm_stats(cfg.data, *model_stats(cfg.model.name))
    train_set, val_set, classes = build_train_val(cfg.data, cfg.aug, mean, std, cfg.run.seed)
    check_resumed_classes(resumed, classes, cfg.data.path)
    if dist.is_main():  # class names in index order: timm's validate.py --class-map reads this file
        (out / "class_map.txt").write_text("".join(f"{c}\n" for c in classes))
    seed_everything(cfg.run.seed)  # the same initial weights in every process and every rerun
    model = build_model(cfg.model, len(classes), cfg.data.img_size).to(device)
    check_sizes(cfg.eval.sizes, model)  # fail now, not after training
    ema = ModelEmaV3(model, decay=cfg.ema.decay, use_warmup=cfg.ema.warmup) if cfg.ema.enabled else None
    train_loader = build_train_loader(cfg, train_set, device, mean, std)  # data.decode=gpu: decoded on the device
    val_loader = make_loader(val_set, cfg.eval.batch_size, False, cfg.run.seed, cfg.data.workers, collate_skipping)
    optimizer = build_optimizer(model, cfg.optim, cfg.data.batch_size)
    scheduler = build_scheduler(optimizer, cfg.optim, len(train_loader), cfg.run.epochs)
    start = restore_training_state(resumed, model, optimizer, scheduler, ema.module if ema else None) if resumed else 0
    best = resumed.get("best_top1", -1.0) if resumed else -1.0
    net = dist.wrap_model(model, device)
    if cfg.run.compile and device.type == "cuda":
        dist.compile_under_ddp(cfg.run.compile_ddp)
        net = torch.compile(net, mode=None if cfg.run.compile_mode == "default" else cfg.run.compile_mode)
    mixup = build_mixup(cfg.aug, len(classes), cfg.data.path == "synthetic", cfg.data.batch_size // dist.world_size())
    criterion = build_criterion(cfg.aug, mixup)
    metrics = MetricsLog(out / "metrics.jsonl", resume_epoch=start if resumed else None)
    # Under DDP, evaluate the bare model: shards may differ in length by one batch, and DDP's forward
    # would wait on a buffer broadcast from a process that has already finished.
    eval_net = model if dist.is_distributed() else net
    for epoch in range(start, cfg.run.epochs):
        train_loader.sampler.set_epoch(epoch)
        seed_epoch(cfg.run.seed, epoch)  # per process and epoch: exact resume under DDP too
        stats = train_one_epoch(net, train_loader, optimizer, scheduler, criterion, device, epoch, cfg, mixup, ema)
        val = evaluate(ema.module if ema else eval_net, val_loader, device, cfg.run.amp)
        stats["skipped"] += cached_skips(train_set)  # data.cache: files that failed to decode up front
        val["skipped"] += cached_skips(val_set)
        record = {"epoch": epoch, **stats,
                  **{f"val_{k}": v for k, v in val.items() if k in ("top1", "top5", "loss", "skipped")}}
        metrics.log(record)
        if dist.is_main():
            log.info(summary_line(epoch, cfg.run.epochs, record))
            best = save_epoch(cfg, out, model, optimizer, scheduler, ema, epoch, classes, mean, std, val, best)
    dist.barrier()
    if dist.is_main():
        finish(cfg, out, ema.module if ema else model, val_loader, device, classes, mean, std)
    # No barrier after the final evaluation: it runs on the main process alone and may outlast the
    # collective timeout; the other processes simply finish.
    return 0


def save_epoch(cfg, out, model, optimizer, scheduler, ema, epoch, classes, mean, std, val, best) -> float:
    """``checkpoint.pt`` every epoch (atomically), ``best.pt`` when validation top-1 improves; best
    first: a run stopped between the two resumes from the previous checkpoint, and does not count
    as best an epoch whose ``best.pt`` was never written."""
    best_now = max(best, val["top1"])
    state = training_state(model, optimizer, scheduler, epoch + 1, to_dict(cfg), ema.module if ema else None,
                           classes=classes, mean=list(mean), std=list(std), best_top1=best_now, val=val)
    if val["top1"] > best:
        save_checkpoint(state, out / "best.pt")
    save_checkpoint(state, out / "checkpoint.pt")
    return best_now


def finish(cfg, out, model, val_loader, device, classes, mean, std) -> None:
    """Final validation, the resolution evaluation, results.json and the printed table."""
    final_loader = torch.utils.data.DataLoader(val_loader.dataset, batch_size=cfg.eval.batch_size,
                                  num_workers=cfg.data.workers, collate_fn=collate_skipping)
    val = evaluate(model, final_loader, device, cfg.run.amp, reduce=False)
    val["skipped"] += cached_skips(val_loader.dataset)
    results = {"top1": val["top1"], "top5": val["top5"], "n": val["n"], "skipped": val["skipped"],
               "pos": model_pos(cfg.model), "model": cfg.model.name, "train_size": cfg.data.img_size, "resolution": {}}
    if cfg.eval.sizes:
        sizes = evaluate_sizes(model, cfg, cfg.eval.sizes, device, mean, std, classes)
        results["resolution"] = {str(s): v["top1"] for s, v in sizes.items() if "top1" in v}
        failed = {str(s): v["error"] for s, v in sizes.items() if "error" in v}
        if failed:
            results["resolution_errors"] = failed
        results["throughput"] = {str(s): v["img_per_s"] for s, v in sizes.items() if "img_per_s" in v}
        report = {model_label(cfg.model): {"checkpoint": str(out / "checkpoint.pt"), "train_size": cfg.data.img_size,
                                  "sizes": sizes}}
        print(write_report(report, out))
    (out / "results.json").write_text(json.dumps(results, indent=2))
    skipped = f", {val['skipped']} unreadable skipped" if val["skipped"] else ""
    print(f"final val top-1 {val['top1']:.2f}%  top-5 {val['top5']:.2f}%  ({val['n']} images{skipped}; "
          f"outputs in {out})")


if __name__ == "__main__":
    run_cli(main)
