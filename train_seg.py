"""Fine-tune a segmentation model (MiT + All-MLP head, or ViT + simple head) with a chosen positional strategy.

    python train_seg.py --data DIR --num-classes 150 --reduce-zero-label --crop-size 512 --pos mixffn
    python train_seg.py --config configs/seg/camvid.yaml --pos peg --eval-scales 0.5,1.0,1.5 --output runs/peg
    torchrun --nproc_per_node=2 train_seg.py --config ...     # data parallel (NCCL on GPU, gloo on CPU)
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any, Sequence

import torch

from vitpe.cli import CLI_KEYS, common_parser, parse_scales, run_cli, run_training
from vitpe.config import ConfigError, save_config, to_dict
from vitpe.data.segmentation import list_collate
from vitpe.engine import distributed as dist
from vitpe.engine.checkpoint import check_resumed_classes, save_checkpoint
from vitpe.engine.loop import make_loader, restore_training_state, seed_epoch, seed_everything, training_state
from vitpe.engine.metrics_log import MetricsLog, summary_line
from vitpe.engine.optim import build_scheduler
from vitpe.engine.seg_metrics import json_safe
from vitpe.engine.seg_plot import plot_segmentation
from vitpe.engine.segmentation import (SegConfig, build_datasets, build_model, build_optimizer, compile_model,
                                       evaluate, figure_samples, results_table, slide_settings, summarize,
                                       train_one_epoch)

log = logging.getLogger("train_seg")
KEYS = {k: v for k, v in CLI_KEYS.items() if k != "eval_sizes"}
KEYS.update(img_size="data.crop_size", crop_size="data.crop_size", num_classes="data.num_classes",
            ignore_index="data.ignore_index", reduce_zero_label="data.reduce_zero_label", eval_scales="eval.scales",
            on_error="data.on_error")


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = common_parser(__doc__.splitlines()[0], eval_sizes=False)
    a = p.add_argument
    a("--crop-size", type=int, metavar="N", help="square training crop (--img-size is the same)")
    a("--num-classes", type=int, metavar="N", help="classes (default: as many as DIR/classes.json lists)")
    a("--ignore-index", type=int, metavar="N", help="label value never scored (default 255)")
    a("--reduce-zero-label", action="store_const", const=True, help="ADE20K: label 0 is ignored, the rest shift down")
    a("--eval-scales", type=parse_scales, metavar="S1,S2,...", help="scales of the final evaluation, e.g. 0.5,1.0,1.5")
    a("--on-error", choices=["error", "skip"],
      help="bad pairs (masks, images that cannot be decoded): stop (default) or skip them with a warning")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    if args.eval_sizes:
        raise ConfigError("--eval-sizes is for classification; segmentation evaluates at --eval-scales")
    return run_training(SegConfig, args, train, KEYS)


def train(cfg: SegConfig, device: torch.device, resumed: dict | None) -> int:
    out = Path(cfg.run.output)
    slide_settings(cfg)  # a bad sliding window stops the run now, not after training
    if dist.is_main():
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    train_set, val_set = build_datasets(cfg.data)
    check_resumed_classes(resumed, list(train_set.classes), cfg.data.path)
    seed_everything(cfg.run.seed)  # the same initial weights in every process and every rerun
    model = build_model(cfg.model, train_set.num_classes, cfg.data.crop_size).to(device)
    if dist.is_distributed() and device.type == "cuda":  # SyncBatchNorm runs on GPUs only
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # the decoder's BN sees the global batch
    optimizer = build_optimizer(model, cfg.optim, cfg.data.batch_size)
    loader = make_loader(train_set, cfg.data.batch_size, True, cfg.run.seed, cfg.data.workers, list_collate,
                               source=cfg.data.path)
    scheduler = build_scheduler(optimizer, cfg.optim, len(loader), cfg.run.epochs)
    start = restore_training_state(resumed, model, optimizer, scheduler) if resumed else 0
    best = resumed.get("best_miou", -1.0) if resumed else -1.0
    pending = resumed.get("pending_val") if resumed else None  # an epoch trained, its validation not done
    net = dist.wrap_model(model, device)
    if cfg.run.compile and device.type == "cuda":
        dist.compile_under_ddp(cfg.run.compile_ddp)
        net = compile_model(net, mode=cfg.run.compile_mode)
    # the pending epoch's line, if the interrupted run got as far as writing it, is written again
    metrics = MetricsLog(out / "metrics.jsonl", resume_epoch=(start - 1 if pending else start) if resumed else None)
    log.info("%d training / %d validation images, %d classes, %d skipped", len(train_set), len(val_set),
             train_set.num_classes, len(train_set.skipped) + len(val_set.skipped))
    if pending:
        best = validate_epoch(cfg, out, model, optimizer, scheduler, val_set, device, dict(pending), best, metrics)
    for epoch in range(start, cfg.run.epochs):
        loader.sampler.set_epoch(epoch)
        seed_epoch(cfg.run.seed, epoch)  # per process and epoch: exact resume under DDP too
        record: dict[str, Any] = {"epoch": epoch, **train_one_epoch(net, loader, optimizer, scheduler, device, epoch, cfg)}
        due = (epoch + 1) % cfg.eval.interval == 0 or epoch + 1 == cfg.run.epochs
        if not due:  # the metrics line first, then the checkpoint, as an epoch without validation ends
            metrics.log(json_safe(record))
            if dist.is_main():
                log.info(summary_line(epoch, cfg.run.epochs, record))
        if dist.is_main():  # before validation, which may fail: the epoch's training is never lost
            save_checkpoint(epoch_state(cfg, model, optimizer, scheduler, val_set.classes, record, best, due),
                            out / "checkpoint.pt")
        if due:
            best = validate_epoch(cfg, out, model, optimizer, scheduler, val_set, device, record, best, metrics)
    dist.barrier()
    finish(cfg, out, model, train_set, val_set, device)
    dist.barrier()
    return 0


def epoch_state(cfg, model, optimizer, scheduler, classes, record, best, pending) -> dict[str, Any]:
    """The checkpoint of the epoch ``record`` has trained; ``pending``: its validation is due and not
    done, so the record goes in as ``pending_val`` and ``--resume`` validates that epoch first."""
    extra = {"pending_val": json_safe(record)} if pending else {}
    return training_state(model, optimizer, scheduler, record["epoch"] + 1, to_dict(cfg), classes=classes,
                          best_miou=best, **extra)


def validate_epoch(cfg, out, model, optimizer, scheduler, val_set, device, record, best, metrics) -> float:
    """Validate the epoch ``record`` has trained (whole image at scale 1), write its line of
    metrics.jsonl and, on the main process, ``checkpoint.pt`` again (atomically: no longer pending,
    with the best mIoU so far) and ``best.pt`` when the mIoU improves; returns the best mIoU."""
    val = summarize(evaluate(model, val_set, device, cfg.run.amp, crop=cfg.data.crop_size, desc="validation",
                             base_size=cfg.data.base_size), val_set.classes)
    record.update(val_mIoU=val["mIoU"], val_aAcc=val["aAcc"])
    metrics.log(json_safe(record))
    if not dist.is_main():
        return best
    log.info(summary_line(record["epoch"], cfg.run.epochs, record))
    miou = -1.0 if val["mIoU"] != val["mIoU"] else val["mIoU"]  # NaN (no labelled pixel) never counts as best
    state = epoch_state(cfg, model, optimizer, scheduler, val_set.classes, record, max(best, miou), False)
    if miou > best:  # best first, as in train_cls.py
        save_checkpoint(state, out / "best.pt")
    save_checkpoint(state, out / "checkpoint.pt")
    return max(best, miou)


def finish(cfg: SegConfig, out: Path, model, train_set, val_set, device: torch.device) -> None:
    """The final evaluation (every process takes its share), results.json, predictions.png and the table."""
    e = cfg.eval
    fuse = tuple(sorted(set(e.scales)))  # 'ms' fuses the listed scales only, as mmseg does
    scales = tuple(sorted(set(fuse) | {1.0}))  # scale 1.0 is always scored alone: the headline
    crop, stride = slide_settings(cfg)
    conf = evaluate(model, val_set, device, cfg.run.amp, tuple(e.modes), scales, crop, stride, "final eval",
                    cfg.data.base_size, fuse)
    if not dist.is_main():
        return
    results = {**summarize(conf, val_set.classes), "pos": cfg.model.pos, "model": cfg.model.name,
               "crop_size": cfg.data.crop_size, "base_size": cfg.data.base_size,
               "slide": {"crop": crop, "stride": stride}, "ms_scales": list(fuse) if len(fuse) > 1 else [],
               "skipped": {"train": [s._asdict() for s in train_set.skipped],
                           "val": [s._asdict() for s in val_set.skipped]}}
    (out / "results.json").write_text(json.dumps(json_safe(results), indent=2))
    samples = figure_samples(model, val_set, e.figure_images, device, cfg.run.amp, cfg.data.base_size)
    plot_segmentation(samples, val_set.classes, out / "predictions.png",
                      f"{cfg.model.name}, pos={cfg.model.pos}: whole-image predictions", val_set.ignore_index)
    print(results_table(results["scales"]))
    if results["aAcc"] != results["aAcc"]:  # NaN: nothing to score
        log.warning("warning: %s: no pixel of the validation masks is labelled (every one is ignore_index %d "
                    "or reduced to it): mIoU, mAcc and aAcc are undefined", cfg.data.val_split, val_set.ignore_index)
    print(f"final val mIoU {results['mIoU']:.2f}  mAcc {results['mAcc']:.2f}  aAcc {results['aAcc']:.2f}  "
          f"(whole image, scale 1.0; outputs in {out})")


if __name__ == "__main__":
    run_cli(main)
