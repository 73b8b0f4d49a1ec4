"""Under DDP, a batch whose files were all unreadable on one process makes every process skip the
step together (otherwise the others would wait forever in the gradient all-reduce)."""
import os
import socket

import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp

from vitpe.data.folder import Batch
from vitpe.engine.classification import _empty_anywhere


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, store_dir: str, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    full = Batch(torch.zeros(2, 3, 4, 4), torch.zeros(2, dtype=torch.long), [])
    empty = Batch(torch.zeros(0, 3, 4, 4), torch.zeros(0, dtype=torch.long), [])
    votes = []
    # twice, each time in a new process group
    for run in range(2):
        torch_dist.init_process_group("gloo", init_method=f"file://{store_dir}/store{run}", rank=rank, world_size=2)
        try:
            votes += [_empty_anywhere(empty if rank == run else full), _empty_anywhere(full)]
        finally:
            torch_dist.destroy_process_group()
    results[rank] = tuple(votes)


def test_an_empty_batch_on_one_process_skips_the_step_on_all(tmp_path):
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(_free_port(), str(tmp_path), results), nprocs=2, join=True)
    assert dict(results) == {0: (True, False, True, False), 1: (True, False, True, False)}


def test_one_process_skips_only_its_own_empty_batches():
    empty = Batch(torch.zeros(0, 3, 4, 4), torch.zeros(0, dtype=torch.long), [])
    full = Batch(torch.zeros(1, 3, 4, 4), torch.zeros(1, dtype=torch.long), [])
    assert _empty_anywhere(empty) and not _empty_anywhere(full)
