"""Run a function on N gloo ranks in fresh processes and collect what each returns (tests only)."""

from __future__ import annotations

import os
import pickle
import tempfile
import time
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, world_size: int, fn, args, folder: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size))
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        Path(folder, f"result-{rank}.pkl").write_bytes(pickle.dumps(result))
        dist.barrier()  # nobody tears down its connections while a peer still uses them
    finally:
        dist.destroy_process_group()
    # Done and written: leave without the interpreter's teardown, where gloo's threads now and then
    # abort the process ("terminate called without an active exception"), as launch/train.py does.
    os._exit(0)


def run_on_ranks(fn, world_size: int = 2, *args, timeout_s: float = 300):
    """fn(rank, world_size, *args) on every rank; returns the list of results in rank order."""
    with tempfile.TemporaryDirectory() as folder:
        ctx = mp.start_processes(_worker, args=(world_size, fn, args, folder), nprocs=world_size, join=False,
                                 start_method="spawn")
        deadline = time.monotonic() + timeout_s
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                for process in ctx.processes:
                    process.kill()
                raise TimeoutError(f"{fn.__name__} on {world_size} ranks did not finish in {timeout_s} s")
        return [pickle.loads(Path(folder, f"result-{r}.pkl").read_bytes()) for r in range(world_size)]
