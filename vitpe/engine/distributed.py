"""Data-parallel helpers: set up from ``torchrun``'s environment, no-ops in a single process.

``torchrun --nproc_per_node=N train_cls.py ...`` sets RANK, WORLD_SIZE and LOCAL_RANK; each process
then drives one GPU (NCCL) or a share of the CPU (gloo). Every helper works unchanged in a plain
``python train_cls.py`` run, where the world is one process.
"""
from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn


def is_distributed() -> bool:
    """True once a process group is set up (under torchrun)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    """Only the main process logs, writes files and saves checkpoints."""
    return rank() == 0


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` -> cuda if available, else cpu; a bare ``cuda`` under torchrun -> this process's GPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            from ..errors import UserError
            raise UserError(f"--device {device}: CUDA is not available on this machine (use --device cpu)")
        if dev.index is None:
            dev = torch.device("cuda", local_rank())
        torch.cuda.set_device(dev)
    return dev


def init_distributed(device: str = "auto") -> torch.device:
    """Join the process group if started by torchrun (NCCL on GPU, gloo on CPU); return the device
    this process should use. Without torchrun's variables nothing is set up."""
    dev = resolve_device(device)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not is_distributed():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=dev if dev.type == "cuda" else None)
    return dev


def cleanup() -> None:
    if is_distributed():
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum of ``t`` over processes (a new tensor; ``t`` is left unchanged)."""
    t = t.detach().clone()
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_mean(t: Tensor) -> Tensor:
    """Mean of ``t`` over processes."""
    return all_reduce_sum(t) / world_size()


def reduce_sums(values: dict[str, float], device: torch.device | str = "cpu") -> dict[str, float]:
    """Sum several scalars over processes in one collective (e.g. correct counts and totals)."""
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    return dict(zip(keys, all_reduce_sum(t).tolist()))


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """The main process's ``obj`` on every process (e.g. a path chosen at start-up)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj: Any) -> list[Any]:
    """Every process's ``obj``, in rank order, on every process (e.g. per-shard predictions)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def wrap_model(model: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel when distributed, else the model itself."""
    if not is_distributed():
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare model under DDP and ``torch.compile`` wrappers (for state dicts and evaluation)."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


__all__ = ["all_reduce_mean", "all_reduce_sum", "barrier", "broadcast_object", "cleanup", "gather_objects",
           "init_distributed", "is_distributed", "is_main", "local_rank", "rank", "reduce_sums", "resolve_device", "unwrap_model",
           "world_size", "wrap_model"]
