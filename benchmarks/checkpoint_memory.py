"""What gradient checkpointing saves: the bytes autograd keeps for the backward after one forward,
with and without ``set_grad_checkpointing`` (timm's and vitpe's models alike).

    python benchmarks/checkpoint_memory.py                                   # ViT-S/B and MiT-B2, CPU
    python benchmarks/checkpoint_memory.py --models vitpe_vit_base_patch16_224:rope_mixed,vit_base_patch16_224 \\
        --batch 8 --size 224 --output runs/ckpt_memory

Each model is ``name`` or ``name:strategy``. The count is exact and needs no GPU: every tensor
autograd saves is seen through ``torch.autograd.graph.saved_tensors_hooks``, each storage counted
once, parameters left out. It is what stays alive between the forward and the backward; the peak of
a checkpointed step adds one block's activations, recomputed during the backward (measure the peak
on a GPU with ``throughput.py --grad-checkpointing``). On CPU the Triton kernels do not run, so
Mix-FFN's count is its torch path's.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import timm
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import vitpe  # noqa: E402,F401  (registers the models)

MODELS = ["vitpe_vit_small_patch16_224:learned", "vitpe_vit_small_patch16_224:rope_mixed",
          "vitpe_vit_small_patch16_224:mixffn", "vitpe_vit_base_patch16_224:learned", "vit_base_patch16_224"]


def saved_activation_bytes(model: nn.Module, x: torch.Tensor, amp: bool = False) -> int:
    """Bytes of the tensors autograd holds for the backward after ``model(x)``, each storage once,
    parameters left out."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        out = model(x)
    del out
    return sum(kept.values())


def measure(spec: str, batch: int, size: int, device: str, amp: bool) -> dict:
    name, _, pos = spec.partition(":")
    kw = {"pos": pos} if pos else {}
    model = timm.create_model(name, img_size=size, num_classes=1000, **kw).to(device).train()
    if not hasattr(model, "set_grad_checkpointing"):
        raise SystemExit(f"{name}: has no set_grad_checkpointing")
    x = torch.randn(batch, 3, size, size, device=device)
    row = {"model": name, "pos": pos or "-"}
    for ckpt in (False, True):
        model.set_grad_checkpointing(ckpt)
        row["checkpointed_mib" if ckpt else "kept_mib"] = saved_activation_bytes(model, x, amp) / 2**20
    row["ratio"] = row["checkpointed_mib"] / row["kept_mib"]
    return row


def markdown(rows: list[dict], batch: int, size: int) -> str:
    lines = ["| model | strategy | input | kept MiB | checkpointed MiB | ratio |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['pos']} | {batch}x{size}x{size} | {r['kept_mib']:.1f} | "
              f"{r['checkpointed_mib']:.1f} | {r['ratio']:.3f} |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", type=lambda s: s.split(","), default=MODELS, help="name or name:strategy, ...")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--device", default="cpu")
    p.add_argument("--bf16", action="store_true", help="under bfloat16 autocast")
    p.add_argument("--output", type=Path, default=None, help="folder for checkpoint_memory.json and .md")
    args = p.parse_args(argv)
    rows = []
    print(markdown(rows, args.batch, args.size), flush=True)  # the header, then a row per model as measured
    for spec in args.models:
        rows.append(measure(spec, args.batch, args.size, args.device, args.bf16))
        print(markdown(rows[-1:], args.batch, args.size).splitlines()[-1], flush=True)
    if args.output:
        args.output.mkdir(parents=True, exist_ok=True)
        (args.output / "checkpoint_memory.json").write_text(json.dumps(
            {"args": {k: str(v) for k, v in vars(args).items()}, "torch": torch.__version__, "rows": rows}, indent=1))
        (args.output / "checkpoint_memory.md").write_text(markdown(rows, args.batch, args.size) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
