"""Detection: the config, DETR and its criterion, one epoch of training, and COCO evaluation."""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ..config import EvalConfig, OptimConfig, RunConfig, plus_joined
from ..data.coco import CocoDetection, PadCollate, load_coco
from ..data.det_transforms import eval_transform, train_transform
from ..data.folder import Skipped, warn_skipped
from ..errors import DataError, UserError
from ..models.detr import DETR, postprocess
from ..models.detr_convert import load_detr_checkpoint, load_detr_file
from ..models.detr_criterion import SetCriterion
from ..models.detr_matcher import HungarianMatcher
from . import distributed as dist
from .coco_eval import coco_evaluate, to_coco_results, write_results
from .loop import LossMeter, autocast, optimizer_step, pass_step, progress
from .optim import adamw, lr_scale, param_groups

_logger = logging.getLogger(__name__)


@dataclass
class DetDataConfig:
    path: str = ""  # COCO-layout folder: annotations/instances_<split>.json and <split>/ images
    train_split: str = "train2017"  # names of the json and the image folder of each split
    val_split: str = "val2017"
    min_size: int = 800  # shorter side at evaluation; training draws 0.6..1.0 of it (DETR: 800)
    max_size: int = 1333  # cap on the longer side (DETR: 1333)
    batch_size: int = 8  # global batch (split over processes under torchrun)
    workers: int = 2  # DataLoader processes
    flip: float = 0.5  # probability of a horizontal flip
    multiscale: bool = True  # draw the training shorter side from 0.6..1.0 x min_size
    crop_prob: float = 0.5  # probability of DETR's resize-crop-resize branch
    on_error: Literal["error", "skip"] = "error"  # bad json entries (unknown ids, boxes outside) and unreadable
    # images (corrupt, or of another size than the json says): stop, or drop them, named in the log and counted
    cache: bool = False  # decode every image once into memory (small datasets, many epochs)
    clip_boxes: bool = False  # clip training boxes that reach more than a pixel past their image to it, as DETR's
    # loader does, counted and logged (else they are bad entries, see on_error); COCOeval scores the json as it is
    pad_multiple: int = 0  # training batches padded to a multiple of this and of the backbone's stride (0: the
    # stride alone, the least padding); a coarser one (64, 128) leaves fewer distinct batch shapes for shape-
    # specialised kernels (cuDNN autotuning); run.compile needs none (compile_model: one graph for all sizes)


@dataclass
class DetModelConfig:
    backbone: str = "resnet50"  # resnet18/34/50/101 (torchvision) or any timm model with features_only
    backbone_weights: str | None = None  # local file of backbone weights; nothing is ever downloaded
    # local file of a whole DETR-R50/R101 (facebookresearch/detr's .pth, Hugging Face's model.safetensors
    # or a vitpe checkpoint; model.pos=sine): every weight, but a classifier of another class count,
    # which stays new (fine-tuning COCO's DETR on another dataset)
    weights: str | None = None
    frozen_bn: bool = True  # FrozenBatchNorm2d (right with pretrained weights; set false from scratch)
    freeze_stem: bool | None = None  # keep a ResNet's stem and layer1 fixed; None: as DETR, which trains only
    # layer2-4 of its (pretrained) backbone: fixed when weights are loaded (backbone_weights or weights),
    # trained when the backbone starts from random weights
    backbone_pos: str | None = None  # a vitpe ViT backbone's own positional strategy
    backbone_stages: int = 4  # ResNet stages kept: 4 ends at stride 32 (DETR), 3 at stride 16 (finer grid)
    pos: str = "sine"  # the encoder's strategy: sine, learned, none, rope_axial, rope_mixed, peg, or a+b
    pos_kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)  # per-strategy options
    pos_grid: int = 32  # native grid of grid-shaped strategies (length of the learned row/column tables)
    num_queries: int = 100  # object queries: more than the most objects in one image
    dim: int = 256  # transformer width
    num_heads: int = 8
    enc_layers: int = 6
    dec_layers: int = 6
    ffn_dim: int = 2048
    dropout: float = 0.1
    aux_loss: bool = True  # losses on every decoder layer's output (DETR converges much slower without)
    box_refs: bool = False  # per-query reference centres: boxes predicted around them (Deformable DETR) and the
    # encoder's additive encoding at each centre added to the cross-attention's query (Conditional DETR)
    spatial_prior: bool = False  # a Gaussian around each reference centre on the cross-attention's logits (SMCA)

    def __post_init__(self) -> None:
        self.pos, self.backbone_pos = plus_joined(self.pos), plus_joined(self.backbone_pos)


@dataclass
class LossConfig:
    cost_class: float = 1.0  # matching costs (DETR's)
    cost_bbox: float = 5.0
    cost_giou: float = 2.0
    ce: float = 1.0  # loss weights
    bbox: float = 5.0
    giou: float = 2.0
    eos_coef: float = 0.1  # weight of the "no object" class: most queries are empty


@dataclass
class DetOptimConfig(OptimConfig):
    lr: float = 1e-4  # DETR's transformer rate
    backbone_lr: float = 1e-5  # the backbone learns 10x slower (DETR); 0 freezes it
    weight_decay: float = 1e-4
    warmup_epochs: float = 0.0
    schedule: Literal["cosine", "poly", "constant", "step"] = "step"  # DETR: x0.1 at 2/3 of training
    clip_grad: float | None = 0.1  # DETR's max gradient norm


@dataclass
class DetEvalConfig(EvalConfig):
    sizes: list[int] = field(default_factory=list)  # other shorter sides evaluated after training
    batch_size: int = 8
    interval: int = 1  # epochs between validations (the last epoch is always validated)
    figure_images: int = 4  # validation images drawn in detections.png
    score_threshold: float = 0.5  # predictions drawn in the figure


@dataclass
class DetConfig:
    data: DetDataConfig = field(default_factory=DetDataConfig)
    model: DetModelConfig = field(default_factory=DetModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: DetOptimConfig = field(default_factory=DetOptimConfig)
    run: RunConfig = field(default_factory=lambda: RunConfig(epochs=50, output="runs/det"))
    eval: DetEvalConfig = field(default_factory=DetEvalConfig)


def build_datasets(cfg: DetDataConfig) -> tuple[CocoDetection, CocoDetection]:
    if not cfg.path:
        raise DataError("no dataset: set --data DIR (COCO layout: DIR/annotations/instances_<split>.json, DIR/<split>/)")
    augment = train_transform(cfg.min_size, cfg.max_size, cfg.flip, cfg.multiscale, cfg.crop_prob)
    train = CocoDetection(cfg.path, cfg.train_split, augment, cfg.on_error, cfg.cache, clip_boxes=cfg.clip_boxes)
    val_index = load_coco(Path(cfg.path) / "annotations" / f"instances_{cfg.val_split}.json",
                          Path(cfg.path) / cfg.val_split, cfg.on_error, cfg.clip_boxes)
    extra = sorted(set(val_index.cat_ids) - set(train.index.cat_ids), key=str)
    if extra:
        raise DataError(f"{cfg.path}: categories of {cfg.val_split} {extra[:10]} are not in {cfg.train_split}'s "
                        f"{train.index.cat_ids[:10]}: the model has no class for them")
    # a validation json listing only some of the training categories (as some exporters write each
    # split's own) is read in the training split's label space; the categories it leaves out are
    # not scored, as COCOeval scores the ground truth's categories
    val = CocoDetection(cfg.path, cfg.val_split, eval_transform(cfg.min_size, cfg.max_size), cfg.on_error, cfg.cache,
                        index=val_index, labels=(train.index.cat_ids, train.index.class_names))
    if len(val) == 0:
        raise DataError(f"{val.index.path}: no validation images (the json lists none that can be used)")
    if not any(boxes for _, boxes in val.samples):
        _logger.warning("warning: %s: no boxes in the validation images: COCO AP is undefined (n/a)",
                        val.index.path.name)
    if val.index.cat_ids != train.index.cat_ids:
        _logger.info("%s: %s lists %d of %s's %d categories; those it leaves out are not scored",
                     cfg.path, cfg.val_split, len(val.index.cat_ids), cfg.train_split, len(train.index.cat_ids))
    val_names = dict(zip(val.index.cat_ids, val.index.class_names))
    renamed = [(i, a, val_names[i]) for i, a in zip(train.index.cat_ids, train.index.class_names)
               if i in val_names and val_names[i] != a]
    if renamed:  # the same ids: scored alike; the figures and results.json name the training json's
        _logger.warning("warning: %s: category names differ between %s and %s (id: train / val): %s",
                        cfg.path, cfg.train_split, cfg.val_split,
                        ", ".join(f"{i}: {a!r} / {b!r}" for i, a, b in renamed[:5]))
    return train, val


def stem_fixed(cfg: DetModelConfig) -> bool:
    """``model.freeze_stem``, or where unset DETR's rule: a pretrained backbone's stem and layer1 stay
    fixed, a backbone trained from scratch trains them."""
    return cfg.freeze_stem if cfg.freeze_stem is not None else bool(cfg.backbone_weights or cfg.weights)


def build_model(cfg: DetModelConfig, num_classes: int, class_names: Sequence[str] | None = None) -> DETR:
    """DETR as ``cfg`` describes it, with ``model.weights`` loaded; ``class_names`` (the data's, in
    class order) let a COCO-trained classifier keep the rows of COCO's categories among them."""
    try:
        model = DETR(num_classes=num_classes, backbone=cfg.backbone, backbone_weights=cfg.backbone_weights,
                    frozen_bn=cfg.frozen_bn, freeze_stem=stem_fixed(cfg), backbone_pos=cfg.backbone_pos,
                    backbone_stages=cfg.backbone_stages, dim=cfg.dim,
                    num_heads=cfg.num_heads, enc_layers=cfg.enc_layers, dec_layers=cfg.dec_layers,
                    ffn_dim=cfg.ffn_dim, dropout=cfg.dropout, num_queries=cfg.num_queries, pos=cfg.pos,
                    pos_kwargs=cfg.pos_kwargs or None, pos_grid=cfg.pos_grid, aux_loss=cfg.aux_loss,
                    box_refs=cfg.box_refs, spatial_prior=cfg.spatial_prior)
    except (KeyError, ValueError) as e:  # unknown strategy or backbone, widths that do not divide
        raise UserError(f"model: {e.args[0] if isinstance(e, KeyError) and e.args else e}") from None
    if cfg.weights:
        try:
            new = load_detr_checkpoint(model, load_detr_file(cfg.weights), new_classifier=True,
                                       class_names=class_names)
        except (FileNotFoundError, KeyError, ValueError) as e:
            raise UserError(f"model.weights {cfg.weights}: {e.args[0] if isinstance(e, KeyError) and e.args else e}"
                            ) from None
        _logger.info("model.weights: loaded %s%s", cfg.weights,
                     f" (its classifier has another class count: {', '.join(new)} left new)" if new else "")
    return model


def train_collate(model: DETR, cfg: DetDataConfig) -> PadCollate:
    """Pads training batches to a multiple of ``data.pad_multiple`` and of the model's stride."""
    if cfg.pad_multiple < 0:
        raise UserError(f"data.pad_multiple must be 0 (the backbone's stride) or positive, got {cfg.pad_multiple}")
    return PadCollate(math.lcm(model.size_divisibility, cfg.pad_multiple or 1))


def compile_model(model: DETR, dynamic: bool | None = None, whole: bool = False,
                  backend: str = "inductor", mode: str = "default") -> nn.Module:
    """``torch.compile`` for training; the criterion never (its Hungarian matching runs on the host).

    By default the transformer is compiled, in place (state-dict keys unchanged): it is where eager
    mode loses most, in hundreds of small kernels. Training batches come padded to many sizes:
    with ``dynamic=None`` the first batch compiles with its sizes fixed, the first batch of another
    size once more with the sizes that changed symbolic, and that graph serves every later size.
    (``dynamic=True`` would make every size symbolic from the start, the 2 of the reference points
    ``(Q, 2)`` too, and dynamo, which gives equal sizes one symbol, then fixes a batch of 2.)
    The backbone stays eager: Inductor fixes a convolution's backward to its input's strides, so
    it would compile once per batch shape until dynamo's recompile limit, then run eager for good.
    For an input of one fixed size (a benchmark) ``whole=True`` with ``dynamic=False`` compiles
    the whole forward, fusing the backbone's batch-norm affine, ReLU and residual sums too.
    With ``mode="reduce-overhead"`` (CUDA graphs) a graph is recorded per padded batch shape;
    ``data.pad_multiple`` keeps their number down.
    Returns what to call: ``model`` itself, or its compiled wrapper when ``whole``."""
    options = dict(dynamic=dynamic, backend=backend, mode=None if mode == "default" else mode)
    if whole:
        return torch.compile(model, **options)
    model.transformer.compile(**options)
    return model


def build_criterion(cfg: LossConfig, num_classes: int) -> SetCriterion:
    matcher = HungarianMatcher(cfg.cost_class, cfg.cost_bbox, cfg.cost_giou)
    return SetCriterion(num_classes, matcher, eos_coef=cfg.eos_coef,
                        weights={"loss_ce": cfg.ce, "loss_bbox": cfg.bbox, "loss_giou": cfg.giou},
                        num_boxes_reduce=lambda n: dist.all_reduce_mean(n))


def build_optimizer(model: DETR, cfg: DetOptimConfig, batch_size: int | None = None) -> torch.optim.AdamW:
    """AdamW with the shared decay groups, each split into backbone (at ``backbone_lr``) and the rest
    (all scaled as ``lr_scale`` says). DETR's own training decays every parameter; here norms,
    biases, the encoder's position parameters, the reference centres, the spatial prior's widths and
    what a timm backbone's ``no_weight_decay()`` names (a ViT's tables, class token) are not decayed.
    The encoder's position parameters (``learned``'s tables, ``peg``'s convolution, ``rope_mixed``'s
    frequencies) learn at the transformer's rate: DETR's learned tables sit in its backbone module
    and so learn at the backbone's, 10x slower, a placement of code rather than a choice, which
    would also freeze them with the backbone."""
    backbone = {id(p) for p in model.backbone.parameters()}
    # a timm backbone's own exclusions (a ViT's tables, class token), as the same model has alone
    inner = getattr(model.backbone, "no_weight_decay", set)()
    skip = ["transformer.pos", "box_refs", "spatial_prior", *(f"backbone.{n}" for n in inner)]
    groups = []
    for g in param_groups(model, cfg.weight_decay, skip=skip):
        for is_bb, lr in ((True, cfg.backbone_lr), (False, cfg.lr)):
            ps = [p for p in g["params"] if (id(p) in backbone) == is_bb]
            if ps and lr > 0:
                groups.append({"params": ps, "weight_decay": g["weight_decay"], "lr": lr})
            elif ps:
                for p in ps:
                    p.requires_grad_(False)
    return adamw(groups, cfg.lr, cfg.betas, lr_scale(cfg, batch_size))


def to_device(targets: list[dict[str, Tensor]], device: torch.device) -> list[dict[str, Tensor]]:
    """What the criterion reads (``labels``, ``boxes``) on ``device``; ids and sizes stay behind."""
    return [{k: t[k].to(device, non_blocking=True) for k in ("labels", "boxes")} for t in targets]


def train_one_epoch(model: nn.Module, criterion: SetCriterion, loader: DataLoader, optimizer: torch.optim.Optimizer,
                    scheduler: Any, device: torch.device, epoch: int, cfg: DetConfig) -> dict[str, float]:
    """One pass; returns the mean weighted ``loss`` and its unweighted parts (last decoder layer),
    averaged over processes, with ``lr`` (of the transformer), ``skipped`` (images that could not
    be used, ``data.on_error=skip``, summed over processes) and ``time``."""
    model.train()
    criterion.train()
    start, seen, skipped = time.time(), set(), 0
    keys = ("loss", "loss_ce", "loss_bbox", "loss_giou", "cardinality_error")
    meter = LossMeter(keys, device, epoch)  # sums on the device: no wait for the device every step
    bar = progress(loader, f"epoch {epoch + 1}/{cfg.run.epochs}")
    for step, (images, mask, targets, skips) in enumerate(bar):
        warn_skipped(skips, seen, _logger)
        skipped += len(skips)
        # A batch left empty is passed over by every process together, or the others would wait
        # forever in the gradient all-reduce; the vote (on the hosts) only when images can be skipped.
        if cfg.data.on_error == "skip" and dist.any_process(not targets):
            pass_step(scheduler)
            continue
        images, mask = images.to(device, non_blocking=True), mask.to(device, non_blocking=True)
        targets = to_device(targets, device)
        with autocast(device, cfg.run.amp):
            out = model(images, mask)
        losses = criterion(out, targets)  # in float32: the matcher and GIoU are precision-sensitive
        loss = criterion.total(losses)
        meter.update(step, loss, [losses[k] for k in keys[1:]])
        optimizer_step(loss, model, optimizer, scheduler, cfg.optim.clip_grad)
        if step % cfg.run.log_interval == 0:  # the only read on the host: the non-finite check, the bar
            bar.set_postfix(loss=f"{meter.means()['loss']:.3f}")
    totals = dist.reduce_sums({**meter.sums(), "skipped": skipped}, device)  # raises on a non-finite loss
    n, skipped = max(totals.pop("n"), 1.0), int(totals.pop("skipped"))
    if skipped and dist.is_main():
        _logger.warning("epoch %d: skipped %d image(s) that could not be used (each named above)", epoch + 1, skipped)
    lr = max(g["lr"] for g in optimizer.param_groups)
    return {**{k: v / n for k, v in totals.items()}, "lr": lr, "skipped": skipped, "time": time.time() - start}


@torch.no_grad()
def predict(model: nn.Module, loader: DataLoader, device: torch.device, amp: bool = True,
            desc: str = "eval") -> tuple[list[dict[str, Tensor]], list[Any], list[Skipped], float]:
    """Predictions (boxes in original-image pixels, on the CPU) and image ids of this process's
    share of ``loader``, the images it skipped (``data.on_error=skip``) and the images per second
    of the forward passes."""
    model.eval()
    preds, ids, skipped, n, seconds = [], [], [], 0, 0.0
    for images, mask, targets, skips in progress(loader, desc):
        skipped += skips
        if not targets:
            continue
        t0 = time.perf_counter()
        with autocast(device, amp):
            out = model(images.to(device, non_blocking=True), mask.to(device, non_blocking=True))
        sizes = torch.stack([t["orig_size"] for t in targets]).to(device)
        res = postprocess(out, sizes)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds += time.perf_counter() - t0
        preds += [{k: v.cpu() for k, v in r.items()} for r in res]
        ids += [t["image_id"] for t in targets]
        n += len(targets)
    return preds, ids, skipped, n / max(seconds, 1e-9)


def evaluate(model: nn.Module, loader: DataLoader, dataset: CocoDetection, device: torch.device,
             amp: bool = True, desc: str = "eval", gather: bool = True,
             detections: str | Path | None = None) -> dict[str, Any]:
    """COCO metrics over the validation set, against the json as it is (``CocoIndex.gt``), over the
    images predicted: one skipped (a missing file, or unreadable under ``data.on_error=skip``) is
    left out of COCOeval's images, named in the log and counted (``skipped``; ``images``: those
    evaluated). ``detections``: write COCO's results file there too (original ids and pixels).

    ``gather``: every process predicts its share of a sharded loader (``make_loader`` shards
    evaluation without repeats) and the main process gathers them and runs COCOeval; other
    processes return ``{}``. An unreadable image (``data.on_error=error``) travels with the
    gather: every process raises the ``DataError`` together, and none waits for a lost one. Without
    ``gather`` this process alone evaluates what ``loader`` gives."""
    try:
        preds, ids, skipped, fps = predict(model, loader, device, amp, desc)
        error = ""
    except DataError as e:
        if not gather:
            raise
        preds, ids, skipped, fps, error = [], [], [], 0.0, str(e)
    shards = dist.gather_objects((preds, ids, skipped, error)) if gather else [(preds, ids, skipped, error)]
    errors = [shard[3] for shard in shards if shard[3]]
    if errors:
        raise DataError(errors[0])
    image_ids = [i for _, shard_ids, _, _ in shards for i in shard_ids]
    skipped = [s for _, _, shard_skipped, _ in shards for s in shard_skipped]
    main = not gather or dist.is_main()
    if main:
        warn_skipped(skipped, set(), _logger)
    if skipped and not image_ids:
        raise DataError(f"{desc}: none of the {len(skipped)} images could be used (each is named above)")
    if not main:
        return {}
    results = [r for shard_preds, shard_ids, _, _ in shards
               for r in to_coco_results(shard_preds, shard_ids, dataset.cat_ids)]
    left_out = len(dataset.index.gt.getImgIds()) - len(image_ids)
    if left_out:
        _logger.info("%s: %d of the json's %d images evaluated, %d left out (skipped)", desc, len(image_ids),
                     len(image_ids) + left_out, left_out)
    if detections is not None:
        write_results(results, detections)
    metrics = coco_evaluate(dataset.index.gt, results, image_ids)
    return {**metrics, "images": len(image_ids), "skipped": len(skipped), "img_per_s": fps}


def eval_loader(dataset: CocoDetection, cfg: DetConfig, divisor: int, min_size: int | None = None) -> DataLoader:
    """Validation in one process (the whole set) at shorter side ``min_size`` (default: the
    training config's), with the longer side capped in the same ratio."""
    if min_size is not None:
        max_size = round(min_size * cfg.data.max_size / cfg.data.min_size)
        dataset = dataset.with_transform(eval_transform(min_size, max_size))
    return DataLoader(dataset, batch_size=cfg.eval.batch_size, shuffle=False, num_workers=cfg.data.workers,
                      collate_fn=PadCollate(divisor))


@torch.no_grad()
def figure_samples(model: nn.Module, dataset: CocoDetection, count: int, device: torch.device, divisor: int,
                   amp: bool = True) -> list[tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]]:
    """``(image uint8, truth, prediction)`` for the first ``count`` images that can be read, boxes
    in their pixels."""
    idx, items = [], []
    for i in range(len(dataset)):
        if len(idx) == count:
            break
        item = dataset[i]
        if not isinstance(item, Skipped):
            idx.append(i)
            items.append(item)
    if not idx:
        return []
    images, mask, targets, _ = PadCollate(divisor)(items)
    model.eval()
    with autocast(device, amp):
        out = model(images.to(device), mask.to(device))
    preds = postprocess(out, torch.stack([t["orig_size"] for t in targets]).to(device))
    samples = []
    for i, p in zip(idx, preds):
        image, truth = dataset.raw(i)
        samples.append((image.as_subclass(Tensor), {"boxes": truth["boxes"].as_subclass(Tensor),
                                                    "labels": truth["labels"]}, {k: v.cpu() for k, v in p.items()}))
    return samples


def metrics_table(rows: dict[str, dict[str, Any]], label: str = "shorter side") -> str:
    """A markdown table of COCO metrics (in %) and images/s, one row per key of ``rows``."""
    cols = ["AP", "AP50", "AP75", "APs", "APm", "APl"]
    lines = [f"| {label} | " + " | ".join(cols) + " | img/s |", "|---" * (len(cols) + 2) + "|"]
    for name, m in rows.items():
        cells = [f"{100 * m[c]:.1f}" if m[c] >= 0 else "n/a" for c in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {m.get('img_per_s', float('nan')):.0f} |")
    return "\n".join(lines)


__all__ = ["DetConfig", "DetDataConfig", "DetEvalConfig", "DetModelConfig", "DetOptimConfig", "LossConfig",
           "build_criterion", "build_datasets", "build_model", "build_optimizer", "compile_model", "eval_loader",
           "evaluate", "figure_samples", "metrics_table", "predict", "train_collate", "train_one_epoch"]
