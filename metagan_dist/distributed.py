"""Process-group set-up and the few collectives the training loop needs.

Every rank calls every collective here, always in the same order. Sums only: the meta-gradient is
all-reduced with SUM and then divided by the global task count (ReduceOp.AVG is unreliable on gloo
and would weight ranks with fewer tasks wrongly).
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class DistContext:
    """Where this process sits: global rank, ranks on this node, and its device."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> DistContext:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, ...) if any.

    NCCL with each rank on cuda:LOCAL_RANK when CUDA is used, gloo on the CPU. A plain
    `python launch/train.py` is a world of one and creates no process group.
    """
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise RuntimeError("run.device=cuda but CUDA is not available on this machine")
        torch.cuda.set_device(local_rank)
        where = torch.device("cuda", local_rank)
    else:
        where = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        store, _, _ = next(dist.rendezvous("env://", rank, world_size))
        # Keys of each torchrun restart apart: a restarted rank must never read the address a
        # killed rank of the previous attempt published (seen as "connection refused" on restart).
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo", store=dist.PrefixStore(f"metagan/attempt-{attempt}", store),
            rank=rank, world_size=world_size, device_id=where if use_cuda else None,
        )
    return DistContext(rank, world_size, local_rank, local_world_size, where)


def shutdown() -> None:
    """Leave the process group cleanly (a no-op for a world of one).

    The barrier first: a rank tearing down its connections while a peer still talks to it can
    make gloo abort the peer.
    """
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum_(flat: Tensor, bucket_numel: int | None = None) -> Tensor:
    """Sum a flat buffer over all ranks in place, in buckets launched together so they pipeline.

    There is no backward pass left to overlap with: the meta-gradient of every parameter comes out
    of one autograd call at the end of the step, so the buckets overlap only with each other.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flat
    buckets = [flat] if not bucket_numel else list(flat.split(bucket_numel))
    works = [dist.all_reduce(b, op=dist.ReduceOp.SUM, async_op=True) for b in buckets]
    for work in works:
        work.wait()
    return flat


def all_gather_objects(obj: object) -> list[object]:
    """Every rank's `obj`, in rank order, on every rank."""
    if not dist.is_initialized():
        return [obj]
    out: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def raise_if_any_rank_failed(error: Exception | None, what: str) -> None:
    """Agree on a step every rank must pass (e.g. opening its shards): if one failed, all raise.

    A rank that fails alone would otherwise leave the others waiting in their next collective.
    """
    errors = all_gather_objects(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    failed = [(rank, message) for rank, message in enumerate(errors) if message is not None]
    if failed:
        rank, message = failed[0]
        raise RuntimeError(f"rank {rank} failed {what}: {message}")


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_(tensor: Tensor, src: int = 0) -> Tensor:
    """Overwrite `tensor` on every rank with rank `src`'s copy."""
    if dist.is_initialized():
        dist.broadcast(tensor, src)
    return tensor


def checksum(flat: Tensor) -> Tensor:
    """A cheap fingerprint of a flat buffer: its sum and a position-weighted sum, in float64.

    The weighted sum catches two values swapping places, which the plain sum cannot.
    """
    values = flat.detach().double()
    weights = torch.arange(1, values.numel() + 1, device=values.device, dtype=torch.float64).remainder_(97).add_(1)
    return torch.stack([values.sum(), (values * weights).sum()])


def verify_replicas(flat: Tensor, step: int) -> None:
    """Fail loudly if the ranks' copies of the meta-parameters are not bit-identical."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    mine = checksum(flat)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    if any(not torch.equal(g, gathered[0]) for g in gathered):
        listing = ", ".join(f"rank {r}: {g.tolist()}" for r, g in enumerate(gathered))
        raise RuntimeError(f"meta-parameters diverged across ranks at step {step}: checksums {listing}")


class StopSignal:
    """Turns SIGTERM / SIGUSR1 (preemption, SLURM's warning) into a flag the loop checks per step.

    The loop all-reduces the flag, so a signal to any one rank stops every rank at the same step.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.received: int | None = None
        for sig in self.SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        self.received = signum

    @property
    def requested(self) -> bool:
        return self.received is not None
