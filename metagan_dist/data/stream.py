"""TaskStream: batches of episodes for the training loop, every task of the split equally likely.

Sampling model (README, "Running on N nodes"): tasks are assigned, not shards. Meta-step i of
epoch e draws world_size x T distinct tasks uniformly from the whole split with a generator seeded
by (seed, e, i), the same on every rank; rank r takes draws r·T .. r·T + T − 1 and reads each task
directly from its shard (a TaskIndex: one positioned read per task). So every task is equally
likely on every rank, a meta-batch is a simple random sample of the pool whatever the shard
layout, and the stream works with any number of ranks x workers on any pool with one shard or
more. A batch is a pure function of (seed, world_size, rank, epoch, i): DataLoader workers share
the batches of an epoch round-robin, the worker count does not change them, and a resume from
state_dict() continues exactly (nothing is replayed).

Set-up checks the split before training: every shard's size on every rank, each shard's sha256 on
one rank (shard j on rank j mod world_size), and every task's images header (shape, count).
"""

from __future__ import annotations

import hashlib
import logging
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from metagan_dist.data.manifest import PoolError, ShardInfo
from metagan_dist.data.pool import Pool
from metagan_dist.data.task_index import ShardFiles, TaskIndex
from metagan_dist.episode import draw_episode

logger = logging.getLogger(__name__)
SHORT_TASK_POLICIES = ("skip", "error")
# Settings that define the batches: a resume must use the same ones to get the same batches.
STATE_FIELDS = ("seed", "rank", "world_size", "split", "shots", "queries", "tasks_per_batch")


@dataclass(frozen=True)
class TaskSampler:
    """The draws of one rank: which tasks (positions in the TaskIndex) and which of their images."""

    usable: np.ndarray  # positions of the tasks that may be drawn
    seed: int
    rank: int
    world_size: int
    tasks_per_batch: int

    def draw(self, epoch: int, index: int) -> tuple[np.ndarray, np.random.Generator]:
        """Batch `index` of `epoch`: this rank's T tasks, and the generator that picks their images.

        The task draw is the same on every rank: world_size x T distinct tasks (with replacement only
        if the split has fewer), of which rank r keeps its slice, so a meta-step repeats no task.
        """
        everyone = self.world_size * self.tasks_per_batch
        picks = np.random.default_rng([self.seed, epoch, index]).choice(
            len(self.usable), size=everyone, replace=everyone > len(self.usable)
        )
        mine = picks[self.rank * self.tasks_per_batch : (self.rank + 1) * self.tasks_per_batch]
        return self.usable[mine], np.random.default_rng([self.seed, epoch, index, self.rank, 1])


@dataclass
class TaskBatch:
    """T episodes: support [T, k, C, H, W] and query [T, q, C, H, W] float32 in [-1, 1], task keys."""

    support: Tensor
    query: Tensor
    keys: list[str]
    epoch: int
    index: int  # batch index within the epoch


def images_to_tensor(images: np.ndarray) -> Tensor:
    """uint8 images (any shape) as a float32 tensor in [-1, 1], the range generators produce.

    numpy rather than torch ops: small tensors in a busy main process stall in torch's thread pool.
    """
    return torch.from_numpy(images.astype(np.float32) / np.float32(127.5) - np.float32(1.0))


class TaskStream:
    """Endless, resumable stream of TaskBatch for one rank; iterating it yields the rest of one epoch."""

    def __init__(
        self,
        pool: str | Path | Pool,
        split: str = "train",
        *,
        shots: int,
        queries: int,
        tasks_per_batch: int,
        episodes_per_epoch: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        skip_corrupt: bool = False,
        on_short_task: str = "skip",
        verify_checksums: bool = True,
        pin_memory: bool | None = None,
        prefetch_factor: int = 2,
        worker_timeout_s: float = 600.0,
    ):
        if min(shots, queries, tasks_per_batch) < 1:
            raise ValueError(f"shots={shots}, queries={queries} and tasks_per_batch={tasks_per_batch} must be >= 1")
        if episodes_per_epoch < tasks_per_batch or episodes_per_epoch % tasks_per_batch:
            raise ValueError(
                f"episodes_per_epoch={episodes_per_epoch} must be a positive multiple of "
                f"tasks_per_batch={tasks_per_batch}"
            )
        if on_short_task not in SHORT_TASK_POLICIES:
            raise ValueError(f"on_short_task must be one of {SHORT_TASK_POLICIES}, not {on_short_task!r}")
        if num_workers < 0:
            raise ValueError(f"num_workers={num_workers} must be >= 0")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1} (world_size={world_size})")
        if seed < 0:
            raise ValueError(f"seed={seed} must be >= 0")
        self.pool = pool if isinstance(pool, Pool) else Pool(pool)
        self.short_tasks = 0  # tasks with fewer than k+q images, left out (set by _usable_tasks)
        self.split, self.shots, self.queries, self.tasks_per_batch = split, shots, queries, tasks_per_batch
        self.batches_per_epoch = episodes_per_epoch // tasks_per_batch
        self.seed, self.rank, self.world_size, self.num_workers = seed, rank, world_size, num_workers
        self.skip_corrupt, self.on_short_task = skip_corrupt, on_short_task
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.prefetch_factor, self.worker_timeout_s = prefetch_factor, worker_timeout_s
        shards = self.pool.shards(split)
        self.dropped = self._check_shards(shards, verify_checksums)
        self.index = self._build_index([shard for shard in shards if shard.file not in self.dropped])
        self.usable = self._usable_tasks()
        self.epoch, self.batch = 0, 0

    def __len__(self) -> int:
        return self.batches_per_epoch

    # ---- set-up: which tasks can be drawn ----

    def _check_shards(self, shards: list[ShardInfo], verify_checksums: bool) -> dict[str, str]:
        """{shard file: problem} of the damaged shards this rank found (PoolError unless skip_corrupt).

        Sizes of all shards are checked on every rank (cheap, so every rank fails alike); the sha256 of
        shard j only on rank j mod world_size; `drop_shards` then applies every rank's findings everywhere.
        """
        problems = {}
        for position, shard in enumerate(shards):
            mine = position % self.world_size == self.rank
            problem = self.pool.shard_problem(shard, checksum=verify_checksums and mine)
            if problem:
                problems[shard.file] = problem
        if problems and not self.skip_corrupt:
            first = next(iter(problems.values()))
            raise PoolError(first + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
        for problem in problems.values():
            logger.warning("leaving out a damaged shard: %s", problem)
        return problems

    def _build_index(self, shards: list[ShardInfo]) -> TaskIndex:
        """The task index of the intact shards; with skip_corrupt, a shard that cannot be indexed is left out."""
        found: dict[str, str] = {}
        index = TaskIndex.build(self.pool.path, shards, self.pool.image_shape, found if self.skip_corrupt else None)
        for problem in found.values():
            logger.warning("leaving out a damaged shard: %s", problem)
        self.dropped.update(found)
        return index

    def _usable_tasks(self) -> np.ndarray:
        """Positions in the index of the tasks that can be drawn: enough images, shard not dropped."""
        needed = self.shots + self.queries
        in_dropped = np.isin(self.index.shard, [i for i, p in enumerate(self.index.paths)
                                                if Path(p).name in self.dropped])
        short = np.flatnonzero((self.index.count < needed) & ~in_dropped)
        if len(short) and self.on_short_task == "error":
            task = int(short[0])
            raise PoolError(f"task {self.index.keys[task]!r} in shard {self.index.paths[self.index.shard[task]]}: "
                            f"k={self.shots} support + q={self.queries} query images is larger than the "
                            f"{self.index.count[task]} images the task provides")
        usable = np.flatnonzero((self.index.count >= needed) & ~in_dropped)
        if not len(usable):
            raise PoolError(
                f"no usable task in split {self.split!r} of pool {self.pool.path}: {len(short)} tasks have fewer than "
                f"k+q={needed} images, {len(self.dropped)} shards are damaged"
                + (f" (e.g. {next(iter(self.dropped.values()))})" if self.dropped else "")
            )
        if len(short):
            logger.info("split %r: %d of %d tasks have fewer than k+q=%d images and are left out", self.split,
                        len(short), len(self.index), needed)
        if len(usable) < self.world_size * self.tasks_per_batch:
            logger.warning("split %r has %d usable tasks, fewer than the %d x %d a meta-step draws: tasks repeat "
                           "within a step", self.split, len(usable), self.world_size, self.tasks_per_batch)
        self.short_tasks = len(short)
        return usable

    def drop_shards(self, problems: dict[str, str]) -> None:
        """Leave out shards other ranks found damaged, so that every rank draws from the same tasks."""
        new = {file: problem for file, problem in problems.items() if file not in self.dropped}
        for problem in new.values():
            logger.warning("leaving out a damaged shard (found by another rank): %s", problem)
        self.dropped.update(new)
        self.usable = self._usable_tasks()

    @property
    def skipped(self) -> dict[str, int]:
        """What set-up left out: tasks with fewer than k+q images, damaged shards."""
        return {"short_tasks": self.short_tasks, "corrupt": len(self.dropped)}

    def usable_digest(self) -> str:
        """sha256 of the usable task keys: equal on every rank, and across a resume if the pool is unchanged."""
        return hashlib.sha256("\n".join(self.index.keys[i] for i in self.usable).encode()).hexdigest()

    # ---- position and resume ----

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its first batch (like DistributedSampler.set_epoch)."""
        self.epoch, self.batch = epoch, 0

    def state_dict(self) -> dict:
        """What a checkpoint must save to resume this stream exactly."""
        state = {name: getattr(self, name) for name in STATE_FIELDS}
        return {**state, "epoch": self.epoch, "batch": self.batch, "usable": self.usable_digest()}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved state; the batch-defining settings must match the ones saved."""
        different = [
            f"{name}: saved {state.get(name)!r}, now {getattr(self, name)!r}"
            for name in STATE_FIELDS
            if state.get(name) != getattr(self, name)
        ]
        if different:
            raise ValueError("cannot resume the task stream exactly; settings differ: " + "; ".join(different))
        if state.get("usable") != self.usable_digest():
            logger.warning("the usable tasks of split %r differ from the checkpoint's (pool rebuilt, or shards left "
                           "out): batches from here on differ from an uninterrupted run's", self.split)
        self.epoch, self.batch = state["epoch"], state["batch"]

    # ---- batches ----

    @property
    def sampler(self) -> TaskSampler:
        """What picks this rank's tasks and images for any batch."""
        return TaskSampler(self.usable, self.seed, self.rank, self.world_size, self.tasks_per_batch)

    def __iter__(self) -> Iterator[TaskBatch]:
        if self.batch >= self.batches_per_epoch:
            self.set_epoch(self.epoch + 1)
        source = _EpisodeSource(self, self.epoch, self.batch)
        workers = dict(prefetch_factor=self.prefetch_factor, timeout=self.worker_timeout_s,
                       worker_init_fn=_leave_stop_signals_to_the_rank) if self.num_workers else {}
        loader = DataLoader(source, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory,
                            **workers)
        for item in _in_index_order(loader, self.batch):
            self.batch = item["index"] + 1
            yield TaskBatch(item["support"], item["query"], item["keys"], self.epoch, item["index"])
        self.set_epoch(self.epoch + 1)


def _leave_stop_signals_to_the_rank(worker: int) -> None:
    """DataLoader workers ignore SIGTERM/SIGUSR1/SIGINT: a signal to the whole process group (SLURM,
    Ctrl-C) is the rank's to act on; its DataLoader shuts the workers down itself."""
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


def _in_index_order(loader: DataLoader, start: int) -> Iterator[dict]:
    """Batches by their index, whatever order the workers deliver them in."""
    pending, expected = {}, start
    for item in loader:
        pending[item["index"]] = item
        while expected in pending:
            yield pending.pop(expected)
            expected += 1
    if pending:
        raise RuntimeError(f"task stream lost batches before {sorted(pending)}")


class _EpisodeSource(IterableDataset):
    """What each DataLoader worker runs: batches start + worker, start + worker + workers, ... of one epoch."""

    def __init__(self, stream: TaskStream, epoch: int, start: int):
        super().__init__()
        self.index, self.sampler = stream.index, stream.sampler
        self.shots, self.queries = stream.shots, stream.queries
        self.epoch, self.start, self.stop = epoch, start, stream.batches_per_epoch

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        files = ShardFiles()
        try:
            for index in range(self.start + worker, self.stop, workers):
                tasks, rng = self.sampler.draw(self.epoch, index)
                episodes = [draw_episode(self.index.read(int(task), files), self.shots, self.queries, rng)
                            for task in tasks]
                yield {
                    "support": images_to_tensor(np.stack([support for support, _ in episodes])),
                    "query": images_to_tensor(np.stack([query for _, query in episodes])),
                    "keys": [self.index.keys[task] for task in tasks],
                    "index": index,
                }
        finally:
            files.close()
