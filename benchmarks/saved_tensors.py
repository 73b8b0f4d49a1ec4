"""Where a segmentation training step keeps its memory: vitpe's MiT + All-MLP head against Hugging
Face's SegFormer, built as ``hf_compare.py`` builds them, one forward and backward on CPU.

    python benchmarks/saved_tensors.py                          # MiT-B2, 512x512, batch 1, fp32
    python benchmarks/saved_tensors.py --variant b0 --size 128 --output runs/saved
    python benchmarks/saved_tensors.py --peaks --batch 8 --order hf,vitpe --output runs/saved   # GPU

Two tables (markdown, also written to ``--output``), and the total of torch's FLOP counter:

- bytes of the tensors autograd saves for backward, per module (block indices folded, names mapped
  onto one vocabulary for both models), each storage counted once, parameters left out; the module
  is the innermost one running when the tensor was made, ``(step)`` is the loss outside any module;
- aten operators per forward and per backward: all of them, and those that copy memory (clone,
  copy, cat, stack, pad, dtype conversions), with the bytes they write.

``--peaks`` instead times both training steps on the GPU, each side's peak memory over its warm-up
and over the steps after it, in the order ``--order`` gives (see ``peaks``).
"""
from __future__ import annotations

import argparse
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from hf_compare import MIT  # noqa: E402

from vitpe.engine import segmentation  # noqa: E402

COPIES = {"clone", "copy_", "_to_copy", "cat", "stack", "constant_pad_nd"}  # operators that only move memory
# Hugging Face's names -> vitpe's, so that the rows of both models meet
HF_NAMES = [(r"^segformer\.stages\.(\d)\.patch_embeddings", r"s\1.patch_embed"),
            (r"^segformer\.stages\.(\d)\.layer_norm", r"s\1.norm"),
            (r"^segformer\.stages\.(\d)\.blocks\.\d+", r"s\1.blk"), (r"^segformer\.stages\.(\d)", r"s\1"),
            (r"\.layer_norm$", ".norm"), (r"layernorm_before", "norm1"), (r"layernorm_after", "norm2"),
            (r"attention\.sequence_reduction\.sequence_reduction", "attn.sr"),
            (r"attention\.sequence_reduction\.layer_norm", "attn.norm"),
            (r"attention\.sequence_reduction", "attn"), (r"attention\.q_proj", "attn.q"),
            (r"attention\.(k|v)_proj", "attn.kv"),
            (r"attention\.o_proj", "attn.proj"), (r"attention", "attn"), (r"dwconv\.dwconv", "mixer"),
            (r"mlp\.dwconv", "mlp.mixer"), (r"activation_fn", "act"), (r"hidden_dropout", "drop"),
            (r"^decode_head\.linear_projections\.(\d)(\.proj)?", r"head.linear_c.\1"), (r"linear_fuse", "fuse"),
            (r"batch_norm", "norm"), (r"activation", "act"), (r"^decode_head", "head"),
            (r"^segformer$", "(backbone)"), (r"^$", "(step)")]
VITPE_NAMES = [(r"^backbone\.stages\.(\d)\.blocks\.\d+", r"s\1.blk"), (r"^backbone\.stages\.(\d)", r"s\1"),
               (r"\.mixer\.proj$", ".mixer"), (r"^decode_head", "head"), (r"^backbone$", "(backbone)"),
               (r"^$", "(step)"), (r"^head\.linear_c\.(\d)\.proj$", r"head.linear_c.\1")]


def canonical(name: str, table: list[tuple[str, str]]) -> str:
    for pattern, repl in table:
        name = re.sub(pattern, repl, name)
    return name


class Tracker(TorchDispatchMode):
    """Counts aten operators and notes, for every storage an operator makes, the module and op that made it."""

    def __init__(self, stack: list[str]) -> None:
        super().__init__()
        self.stack, self.phase = stack, "forward"
        self.made: dict[int, tuple[str, str]] = {}
        self.ops: dict[str, Counter] = defaultdict(Counter)
        self.copy_bytes: dict[str, Counter] = defaultdict(Counter)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        op = func.overloadpacket.__name__
        self.ops[self.phase][op] += 1
        inputs = {a.untyped_storage().data_ptr() for a in tree_flatten((args, kwargs))[0] if isinstance(a, Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, Tensor):
                ptr = t.untyped_storage().data_ptr()
                if ptr not in inputs:  # a new storage, not a view nor an in-place result (addresses are reused)
                    self.made[ptr] = (self.stack[-1], op)
                if op in COPIES:
                    self.copy_bytes[self.phase][op] += t.numel() * t.element_size()
        return out


def module_stack(model: nn.Module) -> tuple[list[str], list[Any]]:
    """A stack of the running modules' names, kept by hooks on every module."""
    stack = [""]

    def leave(module: nn.Module, args: Any, output: Any) -> None:  # returns None: the output stays
        stack.pop()

    handles = []
    for name, mod in model.named_modules():
        if name:
            handles.append(mod.register_forward_pre_hook(lambda m, a, n=name: stack.append(n)))
            handles.append(mod.register_forward_hook(leave, always_call=True))
    return stack, handles


def analyse(model: nn.Module, step: Callable[[], Tensor], names: list[tuple[str, str]]) -> dict[str, Any]:
    """One forward (``step`` returns the loss) and backward: saved bytes per (module, op), op counts."""
    stack, handles = module_stack(model)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    tracker = Tracker(stack)
    saved: dict[int, tuple[str, str, int]] = {}

    def pack(t: Tensor) -> Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and ptr not in saved:
            where, op = tracker.made.get(ptr, (stack[-1], "?"))
            saved[ptr] = (canonical(where, names), op, t.untyped_storage().nbytes())
        return t

    flops = FlopCounterMode(display=False)
    with flops, tracker:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = step()
        tracker.phase = "backward"
        loss.backward()
    for h in handles:
        h.remove()
    per: Counter = Counter()
    for where, op, nbytes in saved.values():
        per[(where, op)] += nbytes
    return {"saved": per, "ops": tracker.ops, "copy_bytes": tracker.copy_bytes, "gflop": flops.get_total_flops() / 1e9}


def build(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """Both models, random init, each with a closure returning its training loss on the same batch."""
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    g = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, args.size, args.size, generator=g)
    labels = torch.randint(0, args.classes, (args.batch, args.size, args.size), generator=g)
    labels[torch.rand(labels.shape, generator=g) < 0.1] = 255
    cfg = segmentation.SegConfig()
    cfg.model.name, cfg.model.head_dim = f"vitpe_mit_{args.variant}", MIT[args.variant]["decoder_hidden_size"]
    cfg.model.kwargs = {"drop_path_rate": 0.1}
    ours = segmentation.build_model(cfg.model, args.classes, args.size).train()
    config = SegformerConfig(**MIT[args.variant], num_labels=args.classes, semantic_loss_ignore_index=255)
    theirs = SegformerForSemanticSegmentation(config).train()
    ignore = cfg.data.ignore_index
    return ({"model": ours, "names": VITPE_NAMES,
             "step": lambda: segmentation.pixel_loss(ours(images), labels, ignore)},
            {"model": theirs, "names": HF_NAMES, "step": lambda: theirs(pixel_values=images, labels=labels).loss})


def mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


def saved_table(a: Counter, b: Counter, min_mib: float) -> str:
    """Rows (module, op) holding at least ``min_mib`` on either side, largest difference first."""
    keys = sorted(set(a) | set(b), key=lambda k: -(a.get(k, 0) - b.get(k, 0)))
    lines = ["| module | op that made it | vitpe MiB | HF MiB |", "|---|---|---|---|"]
    rest = [0, 0]
    for k in keys:
        if max(a.get(k, 0), b.get(k, 0)) >= min_mib * 2**20:
            lines.append(f"| {k[0]} | {k[1]} | {mib(a.get(k, 0))} | {mib(b.get(k, 0))} |")
        else:
            rest[0] += a.get(k, 0)
            rest[1] += b.get(k, 0)
    lines.append(f"| (smaller rows) | | {mib(rest[0])} | {mib(rest[1])} |")
    lines.append(f"| **total** | | **{mib(sum(a.values()))}** | **{mib(sum(b.values()))}** |")
    return "\n".join(lines)


def ops_table(ours: dict[str, Any], theirs: dict[str, Any]) -> str:
    lines = ["| phase | ops | vitpe count | HF count | vitpe MiB written | HF MiB written |", "|---|---|---|---|---|---|",
             f"| forward + backward | GFLOP (torch.utils.flop_counter) | {ours['gflop']:.1f} | {theirs['gflop']:.1f} | | |"]
    for phase in ("forward", "backward"):
        o, t = ours["ops"][phase], theirs["ops"][phase]
        lines.append(f"| {phase} | all aten ops | {sum(o.values())} | {sum(t.values())} | | |")
        for op in sorted(COPIES & (set(o) | set(t))):
            lines.append(f"| {phase} | {op} | {o.get(op, 0)} | {t.get(op, 0)} | "
                         f"{mib(ours['copy_bytes'][phase].get(op, 0))} | {mib(theirs['copy_bytes'][phase].get(op, 0))} |")
    return "\n".join(lines)


def peaks(args: argparse.Namespace) -> str:
    """On the GPU: each side's training step as ``hf_compare.py`` times it (``hf_compare.measure``),
    in ``--order``, with peak memory over the warm-up (cuDNN's benchmark mode tries its algorithms
    there, with their workspaces, once per convolution shape in the process) and over the steps after it."""
    import hf_compare

    device = torch.device(args.device)
    bench = hf_compare.parse(["--seg-size", str(args.size), "--seg-batch", str(args.batch), "--seg-classes",
                              str(args.classes), "--device", args.device, "--warmup", str(args.warmup),
                              "--steps", str(args.steps)] + (["--tiny"] if args.variant == "b0" else []))
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.benchmark = not args.no_benchmark
    batch = hf_compare.seg_batch(bench, device)
    lines = ["| side | precision | warm-up peak GiB | steady peak GiB | img/s |", "|---|---|---|---|---|"]
    for precision in args.precisions:
        for side in args.order:
            build = hf_compare.vitpe_mit if side == "vitpe" else hf_compare.hf_mit
            r = hf_compare.measure(build, bench, batch, precision == "bf16")
            lines.append(f"| {side} | {precision} | {r['warmup_peak_gib']:.2f} | {r['peak_gib']:.2f} | {r['img_s']:.1f} |")
            print(lines[-1], flush=True)
    return "\n".join(lines)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", choices=sorted(MIT), default="b2")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--classes", type=int, default=150)
    p.add_argument("--min-mib", type=float, default=1.0, help="rows below this on both sides are summed")
    p.add_argument("--output", type=Path, default=None, help="folder for saved_tensors.md")
    p.add_argument("--peaks", action="store_true", help="on the GPU: peak memory of both training steps, "
                   "over the warm-up and after it, instead of the tables")
    p.add_argument("--order", type=lambda s: s.split(","), default=["vitpe", "hf"], help="--peaks: sides in order")
    p.add_argument("--precisions", type=lambda s: s.split(","), default=["fp32", "bf16"], help="--peaks")
    p.add_argument("--warmup", type=int, default=5, help="--peaks: untimed steps")
    p.add_argument("--steps", type=int, default=10, help="--peaks: timed steps")
    p.add_argument("--no-benchmark", action="store_true", help="--peaks: cuDNN benchmark mode off")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="--peaks")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> str:
    args = parse(argv)
    if args.peaks:
        text = f"## Peak memory (MiT-{args.variant.upper()}, batch {args.batch})\n\n{peaks(args)}\n"
        if args.output:
            args.output.mkdir(parents=True, exist_ok=True)
            (args.output / f"peaks_{'_'.join(args.order)}.md").write_text(text)
        return text
    torch.manual_seed(0)
    ours, theirs = build(args)
    results = [analyse(side["model"], side["step"], side["names"]) for side in (ours, theirs)]
    text = (f"## Saved for backward (MiT-{args.variant.upper()}, {args.size}x{args.size}, batch {args.batch}, fp32)\n\n"
            f"{saved_table(results[0]['saved'], results[1]['saved'], args.min_mib)}\n\n"
            f"## aten operators\n\n{ops_table(*results)}\n")
    print(text)
    if args.output:
        args.output.mkdir(parents=True, exist_ok=True)
        (args.output / "saved_tensors.md").write_text(text)
    return text


if __name__ == "__main__":
    main()
