"""Process-group set-up and the few collectives the training loop needs.

Every rank calls every collective here, always in the same order. Sums only: the meta-gradient is
all-reduced with SUM and then divided by the global task count (ReduceOp.AVG is unreliable on gloo
and would weight ranks with fewer tasks wrongly).
"""

from __future__ import annotations

import hashlib
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


class AgreedError(Exception):
    """An error every rank raises together, with the same one-line message and exit status.

    exit_code: 2 for bad input (config, pool, checkpoint, files: ValueError, OSError, ImportError),
    1 for anything else.
    """

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def exit_code_of(error: BaseException) -> int:
    """2 for bad input (ValueError, OSError, ImportError and their kin), 1 for anything else."""
    return 2 if isinstance(error, (ValueError, OSError, ImportError)) else 1


def agree(what: str, error: BaseException | None, payload: object = None) -> list[object]:
    """Every rank's outcome of a local step (set-up: opening shards, loading a checkpoint, ...).

    One all-gather that every rank reaches whatever happened to it: if any rank failed, every rank
    raises the same AgreedError naming the first failed rank; otherwise every rank's `payload` is
    returned, in rank order. Without it, a rank failing alone leaves the others waiting in their
    next collective until the launcher tears the job down.
    """
    report = None if error is None else (str(error) or type(error).__name__, exit_code_of(error))
    gathered = all_gather_objects((report, payload))
    failed = [(rank, report) for rank, (report, _) in enumerate(gathered) if report is not None]
    if failed:
        rank, (message, code) = failed[0]
        where = f"rank {rank} failed {what}: " if len(gathered) > 1 else ""
        raise AgreedError(where + message, code) from error
    return [payload for _, payload in gathered]


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_(tensor: Tensor, src: int = 0) -> Tensor:
    """Overwrite `tensor` on every rank with rank `src`'s copy."""
    if dist.is_initialized():
        dist.broadcast(tensor, src)
    return tensor


def fingerprint(flat: Tensor) -> tuple[str, int, int]:
    """(sha256 of the buffer's bytes, NaN count, Inf count): any change of any bit changes the hash."""
    values = flat.detach().contiguous().cpu()
    nans = int(torch.isnan(values).sum())
    infs = int(torch.isinf(values).sum())
    return hashlib.sha256(values.view(torch.uint8).numpy().data).hexdigest(), nans, infs


def verify_replicas(flat: Tensor, step: int) -> str:
    """Fail loudly if the meta-parameters are not finite, or not bit-identical on every rank.

    Returns the sha256 they share. Non-finite values are reported as such first: NaN parameters
    with identical bytes are not "diverged replicas", and NaNs that differ are not either.
    """
    prints = all_gather_objects(fingerprint(flat))
    broken = [f"rank {rank}: {nans} NaN, {infs} Inf" for rank, (_, nans, infs) in enumerate(prints) if nans or infs]
    if broken:
        raise AgreedError(f"meta-parameters are not finite at step {step} ({'; '.join(broken)} of {flat.numel()} "
                          f"values): lower optim.lr or meta.inner_lr, or resume from an earlier checkpoint", 1)
    digests = [digest for digest, _, _ in prints]
    if len(set(digests)) > 1:
        listing = ", ".join(f"rank {rank}: {digest[:16]}" for rank, digest in enumerate(digests))
        raise AgreedError(f"meta-parameters diverged across ranks at step {step}: sha256 {listing}", 1)
    return digests[0]


class StopSignal:
    """Turns SIGTERM / SIGUSR1 (preemption, SLURM's warning) into a flag the loop checks per step.

    The loop all-reduces the flag, so a signal to any one rank stops every rank at the same step;
    set-up shares it in its agreement, so a signal during set-up ends every rank cleanly too.
    `received`: a signal that arrived before this object took over (launch/train.py catches
    those while its modules load).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, received: int | None = None) -> None:
        self.received = received
        for sig in self.SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        self.received = signum

    @property
    def requested(self) -> bool:
        return self.received is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else "none"
