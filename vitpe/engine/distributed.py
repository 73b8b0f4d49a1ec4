"""Data-parallel helpers: set up from ``torchrun``'s environment, no-ops in a single process.

``torchrun --nproc_per_node=N train_cls.py ...`` sets RANK, WORLD_SIZE and LOCAL_RANK; each process
then drives one GPU (NCCL) or a share of the CPU (gloo). Every helper works unchanged in a plain
``python train_cls.py`` run, where the world is one process.
"""
from __future__ import annotations

import json
import os
import time
from datetime import timedelta
from typing import Any

import torch
import torch._dynamo
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


#: Seconds a collective waits for the other processes before failing. A stuck process otherwise
#: holds the rest for torch's default (10 min for NCCL, 30 for gloo); override with VITPE_DIST_TIMEOUT.
DEFAULT_TIMEOUT_S = 300.0


def collective_timeout() -> timedelta:
    """``VITPE_DIST_TIMEOUT`` (seconds), else :data:`DEFAULT_TIMEOUT_S`."""
    text = os.environ.get("VITPE_DIST_TIMEOUT", "").strip()
    try:
        seconds = float(text) if text else DEFAULT_TIMEOUT_S
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        from ..errors import UserError
        raise UserError(f"VITPE_DIST_TIMEOUT={text!r}: expected a positive number of seconds")
    return timedelta(seconds=seconds)


def init_distributed(device: str = "auto", timeout: timedelta | None = None) -> torch.device:
    """Join the process group if started by torchrun (NCCL on GPU, gloo on CPU); return the device
    this process should use. Without torchrun's variables nothing is set up. A collective that
    waits longer than ``timeout`` (default :func:`collective_timeout`) fails instead of hanging."""
    dev = resolve_device(device)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not is_distributed():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=dev if dev.type == "cuda" else None,
                                timeout=timeout or collective_timeout())
    return dev


def process_label() -> str:
    """``"rank 1/2: "`` in a process started by torchrun with several processes (known before the
    group exists, so config errors are labelled too), else ``""``."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    return f"rank {os.environ.get('RANK', '?')}/{world}: " if world > 1 else ""


def report_failure(message: str) -> None:
    """Give torchrun this process's one-line failure reason: its failure summary then shows
    ``message`` for this rank instead of a pointer to its documentation. No-op outside torchrun."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    data = {"message": {"message": message, "extraInfo": {"py_callstack": message,
                                                          "timestamp": str(int(time.time()))}}}
    with open(path, "w") as f:
        json.dump(data, f)


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


_host_votes: tuple[Any, Any] | None = None  # (the default group it was made for, a gloo group)


def any_process(flag: bool) -> bool:
    """Whether ``flag`` holds on any process, decided on the hosts: a CPU all-reduce over a gloo
    group. (Reading back a GPU all-reduce would make the host wait, every step, for all the work
    it has queued on the device, and the next step could not be queued while the last one runs.)"""
    global _host_votes
    if not is_distributed():
        return bool(flag)
    world = dist.group.WORLD
    if _host_votes is None or _host_votes[0] is not world:  # made once per process group
        _host_votes = (world, dist.new_group(backend="gloo", timeout=collective_timeout()))
    t = torch.tensor([float(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=_host_votes[1])
    return t.item() > 0


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


def wrap_model(model: nn.Module, device: torch.device, sync_bn: bool = True) -> nn.Module:
    """DistributedDataParallel when distributed, else the model itself. On GPUs, batch norm layers
    become ``SyncBatchNorm`` (in place: same parameters and buffers), so their statistics are those
    of the global batch and N processes train as one would (CPU/gloo has no SyncBatchNorm)."""
    if not is_distributed():
        return model
    if sync_bn and device.type == "cuda":
        nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def compile_under_ddp(graphs: str) -> None:
    """How ``torch.compile`` splits a model that runs under DDP (set before the first compiled call).

    ``"buckets"`` is torch's default (dynamo's DDPOptimizer): one graph per DDP gradient bucket, so
    that each bucket's all-reduce starts while the backward of the graphs before it still runs.
    ``"one_graph"`` compiles the model whole; DDP then all-reduces every bucket after the backward.
    On one host the all-reduces are short and the split costs more than the overlap gains:
    compiled ViT-S/16 on two H200s (``benchmarks/ddp_scaling.py``) scaled 1.79x with one graph,
    1.52x split. Across hosts, or for models much larger than ViT-B, the overlap may matter more."""
    if graphs not in ("one_graph", "buckets"):
        raise ValueError(f"run.compile_ddp must be 'one_graph' or 'buckets'; got {graphs!r}")
    torch._dynamo.config.optimize_ddp = graphs == "buckets"


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare model under DDP and ``torch.compile`` wrappers (for state dicts and evaluation)."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


__all__ = ["DEFAULT_TIMEOUT_S", "all_reduce_mean", "all_reduce_sum", "any_process", "barrier", "broadcast_object", "cleanup",
           "collective_timeout", "compile_under_ddp", "gather_objects", "init_distributed", "is_distributed", "is_main", "local_rank",
           "process_label", "rank", "reduce_sums", "report_failure", "resolve_device", "unwrap_model", "world_size",
           "wrap_model"]
