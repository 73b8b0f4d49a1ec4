"""Train DETR, whose encoder uses a chosen 2D positional strategy, on COCO-format data; evaluate with COCOeval.

    python train_det.py --data DIR --backbone resnet18 --pos sine --output runs/sine
    python train_det.py --config configs/det/bccd.yaml --pos learned --eval-sizes 320,480,640
    torchrun --nproc_per_node=2 train_det.py --config ...     # data parallel (NCCL on GPU, gloo on CPU)
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

from vitpe.cli import CLI_KEYS, common_parser, run_cli, run_training
from vitpe.config import save_config, to_dict
from vitpe.data.coco import PadCollate
from vitpe.engine import distributed as dist
from vitpe.engine.checkpoint import check_resumed_classes, save_checkpoint
from vitpe.engine.coco_eval import plot_detections
from vitpe.engine.detection import (DetConfig, build_criterion, build_datasets, build_model, build_optimizer,
                                    compile_model, eval_loader, evaluate, figure_samples, metrics_table,
                                    train_collate, train_one_epoch)
from vitpe.engine.loop import make_loader, restore_training_state, seed_epoch, seed_everything, training_state
from vitpe.engine.metrics_log import MetricsLog, summary_line
from vitpe.engine.optim import build_scheduler
from vitpe.errors import DataError

log = logging.getLogger("train_det")
KEYS = dict(CLI_KEYS, model="model.backbone", backbone="model.backbone", img_size="data.min_size",
            min_size="data.min_size", max_size="data.max_size", num_queries="model.num_queries",
            on_error="data.on_error")
SHOWN = ("AP", "AP50", "AP75", "skipped")  # metrics in the epoch summary
DETECTIONS = "detections_val.json"  # COCO's results file of the latest validation, the one results.json reports


def parse(argv: Sequence[str] | None):
    p = common_parser(__doc__.splitlines()[0])
    p.add_argument("--backbone", metavar="NAME", help="resnet18/34/50/101 or a timm model (--model is the same)")
    p.add_argument("--num-queries", type=int, metavar="N", help="object queries (more than objects per image)")
    p.add_argument("--min-size", type=int, metavar="N", help="shorter side (--img-size is the same)")
    p.add_argument("--max-size", type=int, metavar="N", help="cap on the longer side")
    p.add_argument("--on-error", choices=["error", "skip"],
                   help="bad json entries and images that cannot be read: stop (default) or skip them with a warning")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    return run_training(DetConfig, parse(argv), train, KEYS)


def train(cfg: DetConfig, device, resumed: dict | None) -> int:
    out = Path(cfg.run.output)
    if dist.is_main():
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    train_set, val_set = build_datasets(cfg.data)
    classes = train_set.class_names
    check_resumed_classes(resumed, classes, cfg.data.path)
    most = max((len(boxes) for _, boxes in train_set.samples), default=0)
    if most > cfg.model.num_queries and dist.is_main():  # each query is matched to one box at most
        log.warning("warning: an image of %s has %d boxes, more than model.num_queries=%d: the boxes past "
                    "that are never matched to a query (DETR: 100 queries for COCO's at most 63 boxes)",
                    cfg.data.train_split, most, cfg.model.num_queries)
    seed_everything(cfg.run.seed)  # the same initial weights in every process and every rerun
    model = build_model(cfg.model, len(classes), classes).to(device)
    criterion = build_criterion(cfg.loss, len(classes)).to(device)
    optimizer = build_optimizer(model, cfg.optim, cfg.data.batch_size)
    train_loader = make_loader(train_set, cfg.data.batch_size, True, cfg.run.seed, cfg.data.workers,
                               train_collate(model, cfg.data), source=cfg.data.path)
    val_loader = make_loader(val_set, cfg.eval.batch_size, False, cfg.run.seed, cfg.data.workers,
                             PadCollate(model.size_divisibility))
    scheduler = build_scheduler(optimizer, cfg.optim, len(train_loader), cfg.run.epochs)
    start = restore_training_state(resumed, model, optimizer, scheduler) if resumed else 0
    best = resumed.get("best_ap", -1.0) if resumed else -1.0
    if cfg.run.compile and device.type == "cuda":
        dist.compile_under_ddp(cfg.run.compile_ddp)
        compile_model(model, mode=cfg.run.compile_mode)  # the transformer, in place, for every batch size
    net = dist.wrap_model(model, device)
    metrics = MetricsLog(out / "metrics.jsonl", resume_epoch=start if resumed else None)
    val: dict[str, Any] = {}
    for epoch in range(start, cfg.run.epochs):
        train_loader.sampler.set_epoch(epoch)
        seed_epoch(cfg.run.seed, epoch)  # per process and epoch: exact resume under DDP too
        record: dict[str, Any] = {"epoch": epoch, **train_one_epoch(net, criterion, train_loader, optimizer,
                                                                      scheduler, device, epoch, cfg)}
        last = epoch + 1 == cfg.run.epochs
        if last or (epoch + 1) % cfg.eval.interval == 0:
            try:
                val = evaluate(model, val_loader, val_set, device, cfg.run.amp, detections=out / DETECTIONS)
            except Exception as e:  # (an unreadable validation image, COCOeval refusing the json): the epoch's
                metrics.log(record)  # training is kept before the run stops
                if dist.is_main():
                    save_epoch(cfg, out, model, optimizer, scheduler, epoch, classes, {}, best)
                if isinstance(e, DataError):  # every process raised (evaluate): none ends the run before
                    dist.barrier()  # the checkpoint is written
                raise
            record.update({f"val_{k}": v for k, v in val.items() if k in SHOWN or k == "stats"})
        metrics.log(record)
        if dist.is_main():
            log.info(summary_line(epoch, cfg.run.epochs, {k: v for k, v in record.items() if k != "val_stats"}))
            best = save_epoch(cfg, out, model, optimizer, scheduler, epoch, classes, val, best)
    dist.barrier()
    if dist.is_main():
        finish(cfg, out, model, train_set, val_set, val, device)
    # No barrier after the final evaluation: it runs on the main process alone and may outlast the
    # collective timeout; the other processes simply finish.
    return 0


def save_epoch(cfg, out, model, optimizer, scheduler, epoch, classes, val, best) -> float:
    """``checkpoint.pt`` every epoch (atomically), ``best.pt`` when validation AP improves (first,
    as in train_cls.py)."""
    ap = val.get("AP", -1.0)
    state = training_state(model, optimizer, scheduler, epoch + 1, to_dict(cfg), classes=classes,
                           best_ap=max(best, ap), val={k: val[k] for k in ("AP", "stats") if k in val})
    if ap > best:
        save_checkpoint(state, out / "best.pt")
    save_checkpoint(state, out / "checkpoint.pt")
    return max(best, ap)


def finish(cfg: DetConfig, out: Path, model, train_set, val_set, val: dict[str, Any], device) -> None:
    """results.json (the last epoch's COCO metrics, whose detections are in ``detections_val.json``,
    and those at ``--eval-sizes``), detections.png and a printed table."""
    div = model.size_divisibility
    if not val:  # no epoch ran (a resumed run that had already finished): evaluate here
        val = evaluate(model, eval_loader(val_set, cfg, div, cfg.data.min_size), val_set, device, cfg.run.amp,
                       "final eval", gather=False, detections=out / DETECTIONS)
    rows = {f"{cfg.data.min_size} (train)": val}
    sizes = {}
    for s in cfg.eval.sizes:
        sizes[str(s)] = evaluate(model, eval_loader(val_set, cfg, div, s), val_set, device, cfg.run.amp,
                                 f"eval {s}", gather=False)
        rows[str(s)] = sizes[str(s)]
    strip = lambda m: {k: v for k, v in m.items() if k != "summary"}  # noqa: E731
    results = {"coco": strip(val), "eval_sizes": {s: strip(m) for s, m in sizes.items()}, "pos": cfg.model.pos,
               "backbone": cfg.model.backbone, "min_size": cfg.data.min_size, "max_size": cfg.data.max_size,
               "classes": val_set.class_names, "category_ids": val_set.cat_ids,
               "dropped": {"train": dict(train_set.index.dropped), "val": dict(val_set.index.dropped)},
               "clipped": {"train": train_set.index.clipped, "val": val_set.index.clipped}}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    samples = figure_samples(model, val_set, cfg.eval.figure_images, device, div, cfg.run.amp)
    plot_detections(samples, val_set.class_names, out / "detections.png", cfg.eval.score_threshold,
                    f"DETR, encoder pos={cfg.model.pos}: predictions (red, score >= {cfg.eval.score_threshold}) "
                    f"and ground truth (dashed green)")
    print(val.get("summary", ""))
    print(metrics_table(rows))
    ap = {k: f"{100 * val[k]:.1f}" if val.get(k, -1) >= 0 else "n/a" for k in ("AP", "AP50")}  # COCO's -1: no boxes
    print(f"final val AP {ap['AP']}  AP50 {ap['AP50']}  (outputs in {out})")


if __name__ == "__main__":
    run_cli(main)
