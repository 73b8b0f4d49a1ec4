"""Training speed of vitpe's DETR and MiT segmentation against Hugging Face's, side by side.

    python benchmarks/hf_compare.py --output runs/hf_compare            # published sizes, on the GPU
    python benchmarks/hf_compare.py --rows detr_r50,mit_b2 --precisions bf16 --steps 10

Every row times one training step (forward, loss, backward, AdamW) on the same random batch and
reports images/s and peak GPU memory, for vitpe and for the Hugging Face model of the same shape
(random init, nothing downloaded), in fp32 and under bf16 autocast:

- ``detr_r50``: DETR with a ResNet-50 (frozen batch norm, auxiliary losses on every decoder layer,
  Hungarian matching), 91 classes, ``--det-boxes`` random boxes per image, 800x1066, batch 4,
  against ``DetrForObjectDetection`` (timm ResNet-50, ``auxiliary_loss=True``) given the same labels;
- ``detr_vit_s``: the same DETR on vitpe's ViT-S/16 (``features_only``); no Hugging Face twin;
- ``mit_b2``: MiT-B2 with SegFormer's All-MLP head (width 768), 150 classes, 512x512, batch 8,
  against ``SegformerForSemanticSegmentation`` (B2 config) given the same label maps.

vitpe is built as its training scripts build it (``vitpe.engine.detection`` / ``segmentation``)
and gets its input padded to the model's size divisor, as its collate function pads it. The
files ``hf_compare.json`` and ``hf_compare.md`` (ratio vitpe / HF) are rewritten after every
row. Without ``transformers`` the HF side of each row is skipped with a logged message.
"""
from __future__ import annotations

import argparse
import gc
import logging
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import add_common, inductor_settings, profile, timed, write_rows  # noqa: E402

from vitpe.engine import detection, segmentation  # noqa: E402

_logger = logging.getLogger("hf_compare")
Step = Callable[[], None]
Batch = dict[str, Any]
ROWS = ("detr_r50", "detr_vit_s", "mit_b2")
TINY_BACKBONE = {"resnet50": "resnet18", "vitpe_vit_small_patch16_224": "vitpe_vit_tiny_patch16_224"}  # --tiny
MIT = {"b2": dict(depths=[3, 4, 6, 3], hidden_sizes=[64, 128, 320, 512], decoder_hidden_size=768),
       "b0": dict(depths=[2, 2, 2, 2], hidden_sizes=[32, 64, 160, 256], decoder_hidden_size=256)}


# -- inputs ----------------------------------------------------------------------------------
def det_batch(args: argparse.Namespace, device: torch.device) -> Batch:
    """Images ``(B, 3, H, W)`` and per image ``--det-boxes`` boxes (normalised cxcywh) of 91 classes."""
    g = torch.Generator().manual_seed(0)
    B, (H, W), M = args.det_batch, args.det_size, args.det_boxes
    centres, sizes = torch.rand(B, M, 2, generator=g) * 0.6 + 0.2, torch.rand(B, M, 2, generator=g) * 0.3 + 0.05
    boxes = torch.cat([centres, sizes], -1)
    labels = torch.randint(0, args.det_classes, (B, M), generator=g)
    return {"images": torch.randn(B, 3, H, W, generator=g).to(device),
            "targets": [{"labels": lab.to(device), "boxes": box.to(device)} for lab, box in zip(labels, boxes)]}


def seg_batch(args: argparse.Namespace, device: torch.device) -> Batch:
    """Images ``(B, 3, S, S)`` and label maps ``(B, S, S)`` with a tenth of the pixels ignored (255)."""
    g = torch.Generator().manual_seed(0)
    B, S = args.seg_batch, args.seg_size
    labels = torch.randint(0, args.seg_classes, (B, S, S), generator=g)
    labels[torch.rand(B, S, S, generator=g) < 0.1] = 255
    return {"images": torch.randn(B, 3, S, S, generator=g).to(device), "labels": labels.to(device)}


def pad_to(images: Tensor, divisor: int) -> tuple[Tensor, Tensor]:
    """Zero-pad ``(B, 3, H, W)`` bottom/right to a multiple of ``divisor``; mask ``(B, H', W')`` True on padding."""
    H, W = images.shape[-2:]
    ph, pw = (-H) % divisor, (-W) % divisor
    mask = torch.zeros(images.shape[0], H + ph, W + pw, dtype=torch.bool, device=images.device)
    mask[:, H:], mask[:, :, W:] = True, True
    return F.pad(images, (0, pw, 0, ph)), mask



# -- training steps --------------------------------------------------------------------------
def _adamw_step(loss: Tensor, optimizer: torch.optim.Optimizer) -> None:
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def vitpe_detr(args: argparse.Namespace, batch: Batch, amp: Any, compiled: bool,
               backbone: str) -> tuple[Step, torch.nn.Module]:
    cfg = detection.DetConfig()
    cfg.model.backbone = backbone
    if args.tiny:
        cfg.model.backbone = TINY_BACKBONE.get(backbone, backbone)
        cfg.model.enc_layers = cfg.model.dec_layers = 1
    device = batch["images"].device
    model = detection.build_model(cfg.model, args.det_classes).to(device)
    criterion = detection.build_criterion(cfg.loss, args.det_classes).to(device)
    optimizer = detection.build_optimizer(model, cfg.optim)
    images, mask = pad_to(batch["images"], model.size_divisibility)
    model.train()
    # compiled as train_det.py compiles it (the transformer; the criterion's matching stays eager), or
    # the whole forward; static shapes either way: the benchmark's input never changes size
    net = detection.compile_model(model, dynamic=False, whole=args.det_compile == "model",
                                  mode=args.compile_mode) if compiled else model

    def step() -> None:
        with amp:
            out = net(images, mask)
        _adamw_step(criterion.total(criterion(out, batch["targets"])), optimizer)
    return step, model


def hf_adamw(params: list[torch.nn.Parameter], lr: float, weight_decay: float) -> torch.optim.AdamW:
    """Hugging Face's side gets the AdamW vitpe's training scripts use (``vitpe.engine.optim.adamw``:
    fused on the GPU), so that the optimizer step costs the same on both sides."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay,
                             fused=True if all(p.is_cuda for p in params) else None)


def hf_detr(args: argparse.Namespace, batch: Batch, amp: Any, _compiled: bool) -> tuple[Step, torch.nn.Module]:
    from transformers import DetrConfig, DetrForObjectDetection

    tiny = dict(backbone=TINY_BACKBONE["resnet50"], encoder_layers=1, decoder_layers=1) if args.tiny else {}
    # dropout 0.1 on the attention weights and after the FFN's activation too, as DETR's reference
    # model and vitpe's (Hugging Face's defaults leave those two at 0, which is less work per step)
    config = DetrConfig(use_pretrained_backbone=False, num_labels=args.det_classes, auxiliary_loss=True,
                        dropout=0.1, attention_dropout=0.1, activation_dropout=0.1, **tiny)
    model = DetrForObjectDetection(config).to(batch["images"].device).train()
    optimizer = hf_adamw([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=1e-4)
    images = batch["images"]
    pixel_mask = torch.ones(images.shape[0], *images.shape[-2:], dtype=torch.long, device=images.device)
    labels = [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in batch["targets"]]

    def step() -> None:
        with amp:
            out = model(pixel_values=images, pixel_mask=pixel_mask, labels=labels)
        _adamw_step(out.loss, optimizer)
    return step, model


def vitpe_mit(args: argparse.Namespace, batch: Batch, amp: Any, compiled: bool) -> tuple[Step, torch.nn.Module]:
    cfg = segmentation.SegConfig()
    variant = "b0" if args.tiny else "b2"
    cfg.model.name, cfg.model.head_dim = f"vitpe_mit_{variant}", MIT[variant]["decoder_hidden_size"]
    cfg.model.kwargs = {"drop_path_rate": 0.1}  # as SegFormer (and HF's default config)
    device = batch["images"].device
    model = segmentation.build_model(cfg.model, args.seg_classes, args.seg_size).to(device).train()
    optimizer = segmentation.build_optimizer(model, cfg.optim)
    ignore = cfg.data.ignore_index
    # as train_seg.py compiles it (static shapes)
    net = segmentation.compile_model(model, mode=args.compile_mode) if compiled else model

    def step() -> None:
        with amp:
            logits = net(batch["images"])
        _adamw_step(segmentation.pixel_loss(logits, batch["labels"], ignore), optimizer)
    return step, model


def hf_mit(args: argparse.Namespace, batch: Batch, amp: Any, _compiled: bool) -> tuple[Step, torch.nn.Module]:
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    config = SegformerConfig(**MIT["b0" if args.tiny else "b2"], num_labels=args.seg_classes,
                             semantic_loss_ignore_index=255)
    model = SegformerForSemanticSegmentation(config).to(batch["images"].device).train()
    optimizer = hf_adamw(list(model.parameters()), lr=6e-5, weight_decay=0.01)

    def step() -> None:
        with amp:
            out = model(pixel_values=batch["images"], labels=batch["labels"])
        _adamw_step(out.loss, optimizer)
    return step, model


# -- measurement -----------------------------------------------------------------------------
Builder = Callable[[argparse.Namespace, Batch, Any, bool], tuple[Step, torch.nn.Module]]
SPECS: dict[str, tuple[str, Callable[..., Batch], Builder, Builder | None]] = {
    # row: (what HF builds, batch maker, vitpe builder, HF builder)
    "detr_r50": ("DetrForObjectDetection (timm ResNet-50)", det_batch,
                 lambda *a: vitpe_detr(*a, backbone="resnet50"), hf_detr),
    "detr_vit_s": ("-", det_batch, lambda *a: vitpe_detr(*a, backbone="vitpe_vit_small_patch16_224"), None),
    "mit_b2": ("SegformerForSemanticSegmentation (B2)", seg_batch, vitpe_mit, hf_mit),
}


def measure(build: Builder, args: argparse.Namespace, batch: Batch, bf16: bool, compiled: bool = False,
            label: str = "") -> dict[str, float]:
    """Images/s of the training step and peak memory (GiB, model and optimizer state included) of
    the timed steps; the warm-up's peak is kept apart, since it includes cuDNN's benchmark mode
    trying convolution algorithms with large workspaces (once per shape in the process, so
    whichever side runs first pays for shapes both share). With ``--profile`` the busiest kernels
    of a few more steps go to the profile file."""
    device = torch.device(args.device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)
    step, model = build(args, batch, amp, compiled)
    for _ in range(args.warmup):
        step()
    warm_mem = float("nan")
    if device.type == "cuda":
        torch.cuda.synchronize()
        warm_mem = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
    seconds = timed(step, args.steps, 0, device)
    mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    if args.profile:
        profile(step, args, device, label, "hf_compare")
    del step, model
    gc.collect()
    return {"img_s": len(batch["images"]) / seconds, "step_ms": 1000 * seconds, "peak_gib": mem,
            "warmup_peak_gib": warm_mem}


def hf_available() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every (row, precision): vitpe, then HF; the files are rewritten after each, so a run cut
    short (or a row that fails) keeps what was measured."""
    device = torch.device(args.device)
    has_hf = hf_available()
    if not has_hf:
        _logger.warning("transformers is not installed: Hugging Face rows are skipped")
    rows: list[dict[str, Any]] = []
    (args.output / "hf_compare_profile.txt").unlink(missing_ok=True)  # appended to by every measurement
    for name in args.rows:
        reference, make_batch, ours, theirs = SPECS[name]
        batch = make_batch(args, device)
        for precision in args.precisions:
            row: dict[str, Any] = dict(row=name, precision=precision, batch=len(batch["images"]),
                                       size="x".join(map(str, batch["images"].shape[-2:])),
                                       reference=f"{reference} [tiny]" if args.tiny and theirs else reference)
            sides = [("vitpe", ours, False), ("hf", theirs if has_hf else None, False)]
            if args.compile:
                sides.append(("vitpe_compiled", ours, True))
            for side, build, compiled in sides:
                if build is None:
                    continue
                try:
                    row[side] = measure(build, args, batch, precision == "bf16", compiled, f"{name} {precision} {side}")
                except torch.OutOfMemoryError as e:  # the other rows still run
                    _logger.error("%s %s %s: out of memory: %s", name, precision, side, str(e).splitlines()[0])
            for side, key in (("vitpe", "ratio"), ("vitpe_compiled", "compiled_ratio")):
                if side in row and "hf" in row:
                    row[key] = row[side]["img_s"] / row["hf"]["img_s"]
            rows.append(row)
            print(markdown([row], header=len(rows) == 1), flush=True)
            write(args, rows)
    return rows


def write(args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    versions = {}
    if hf_available():
        import transformers
        versions["transformers"] = transformers.__version__
    write_rows(args, "hf_compare", rows, markdown(rows), **versions)


def markdown(rows: list[dict[str, Any]], header: bool = True) -> str:
    def num(value: float | None, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    lines = ["| model | precision | batch | input | vitpe img/s | HF img/s | ratio | vitpe compiled img/s | "
             "compiled ratio | vitpe GiB | HF GiB | HF model |", "|" + "---|" * 12] if header else []
    for r in rows:
        ours, hf, comp = (r.get(side, {}) for side in ("vitpe", "hf", "vitpe_compiled"))
        lines.append(f"| {r['row']} | {r['precision']} | {r['batch']} | {r['size']} | "
                     f"{num(ours.get('img_s'), '.1f')} | {num(hf.get('img_s'), '.1f')} | "
                     f"{num(r.get('ratio'), '.2f')} | {num(comp.get('img_s'), '.1f')} | "
                     f"{num(r.get('compiled_ratio'), '.2f')} | {num(ours.get('peak_gib'), '.2f')} | "
                     f"{num(hf.get('peak_gib'), '.2f')} | {r['reference']} |")
    return "\n".join(lines)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    csv = lambda s: [v for v in s.split(",") if v]  # noqa: E731
    p.add_argument("--rows", type=csv, default=list(ROWS), help=f"any of {', '.join(ROWS)}")
    p.add_argument("--precisions", type=csv, default=["fp32", "bf16"], help="fp32, bf16 (autocast)")
    p.add_argument("--det-size", type=lambda s: tuple(int(v) for v in s.split("x")), default=(800, 1066),
                   metavar="HxW")
    p.add_argument("--det-batch", type=int, default=4)
    p.add_argument("--det-boxes", type=int, default=10, help="random boxes per image")
    p.add_argument("--det-classes", type=int, default=91)
    p.add_argument("--seg-size", type=int, default=512)
    p.add_argument("--seg-batch", type=int, default=8)
    p.add_argument("--seg-classes", type=int, default=150)
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--compile", action="store_true", help="also time vitpe's model under torch.compile "
                   "(Hugging Face's stays eager; the ratio is to its eager figure)")
    p.add_argument("--det-compile", choices=["transformer", "model"], default="transformer",
                   help="what --compile compiles of DETR: the transformer, as train_det.py does (default), or "
                   "the whole model (backbone too, static shapes only)")
    add_common(p)
    p.add_argument("--tiny", action="store_true", help="small models for a quick CPU check: ResNet-18 / ViT-Ti, "
                   "one encoder and one decoder layer, MiT-B0; the rows keep their names")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--output", type=Path, default=Path("runs/hf_compare"))
    args = p.parse_args(argv)
    bad = [r for r in args.rows if r not in SPECS] + [q for q in args.precisions if q not in ("fp32", "bf16")]
    if bad:
        p.error(f"unknown row or precision {bad[0]!r}; rows: {', '.join(ROWS)}; precisions: fp32, bf16")
    return args


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    # random weights are the point here: no warning that frozen batch norm has nothing loaded
    logging.getLogger("vitpe.models.detr_backbone").setLevel(logging.ERROR)
    args = parse(argv)
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True  # both sides alike; convolutions use TF32 by default
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels for both
    with inductor_settings(args):
        run(args)


if __name__ == "__main__":
    main()
