"""TaskStream: batches of episodes for the training loop, streamed from a pool's shards.

Each rank reads its share of the split's shards (an explicit nodesplitter: shards rank,
rank + world_size, ...), each DataLoader worker a share of that (wds.split_by_worker). A worker
cycles endlessly over its shards in seeded random order, draws one episode per task it reads,
shuffles episodes in a buffer and cuts them into batches of T. Every rank yields the same fixed
number of batches per epoch, so uneven shard counts never leave a rank waiting in a collective.

Batch i of an epoch comes from worker i mod num_workers and is a pure function of (seed, rank,
epoch, num_workers, i): resuming from state_dict() replays the epoch up to the saved batch inside
the workers (drawing, not collating) and continues with the same batches as an unbroken run.
"""

from __future__ import annotations

import itertools
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from metagan_dist.data.manifest import PoolError, ShardInfo
from metagan_dist.data.pool import Pool
from metagan_dist.data.shards import decode_task, import_webdataset, split_by_rank
from metagan_dist.episode import draw_episode

logger = logging.getLogger(__name__)
SHORT_TASK_POLICIES = ("skip", "error")
# Settings that define the stream: a resume must use the same ones to get the same batches.
STATE_FIELDS = ("seed", "world_size", "num_workers", "split", "shots", "queries", "tasks_per_batch", "shuffle_buffer")


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
        shuffle_buffer: int = 64,
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
        if num_workers < 0 or shuffle_buffer < 1:
            raise ValueError(f"num_workers={num_workers} must be >= 0 and shuffle_buffer={shuffle_buffer} >= 1")
        self.pool = pool if isinstance(pool, Pool) else Pool(pool)
        self.split, self.shots, self.queries, self.tasks_per_batch = split, shots, queries, tasks_per_batch
        self.batches_per_epoch = episodes_per_epoch // tasks_per_batch
        self.seed, self.rank, self.world_size, self.num_workers = seed, rank, world_size, num_workers
        self.shuffle_buffer, self.skip_corrupt, self.on_short_task = shuffle_buffer, skip_corrupt, on_short_task
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.prefetch_factor, self.worker_timeout_s = prefetch_factor, worker_timeout_s
        self.shards, self.dropped = self._rank_shards(verify_checksums)
        self.epoch, self.batch = 0, 0
        self.skipped = self._fresh_counts()

    def __len__(self) -> int:
        return self.batches_per_epoch

    def _rank_shards(self, verify_checksums: bool) -> tuple[list[ShardInfo], list[str]]:
        """This rank's intact shards, and the problems of those dropped (skip_corrupt) or a PoolError."""
        shards = self.pool.shards(self.split)
        slots = self.world_size * max(1, self.num_workers)
        if len(shards) < slots:
            raise PoolError(
                f"split {self.split!r} of pool {self.pool.path} has {len(shards)} shards; {self.world_size} ranks x "
                f"{max(1, self.num_workers)} workers need at least {slots}, one per reader: rewrite the pool with "
                f"smaller shards (metagan-make-shards --maxcount) or use fewer workers"
            )
        own = list(split_by_rank(self.rank, self.world_size)(shards))
        # Sizes of all shards are checked on every rank (cheap), so every rank fails alike; checksums only here.
        problems = {shard.file: self.pool.shard_problem(shard, checksum=False) for shard in shards}
        for shard in own:
            problems[shard.file] = problems[shard.file] or self.pool.shard_problem(shard, checksum=verify_checksums)
        broken = [problem for problem in problems.values() if problem]
        if broken and not self.skip_corrupt:
            raise PoolError(broken[0] + (f" (and {len(broken) - 1} more)" if len(broken) > 1 else ""))
        kept = [shard for shard in own if not problems[shard.file]]
        dropped = [problems[shard.file] for shard in own if problems[shard.file]]
        for problem in dropped:
            logger.warning("skipping corrupt shard: %s", problem)
        if len(kept) < max(1, self.num_workers):
            raise PoolError(
                f"rank {self.rank} has {len(kept)} intact shards of split {self.split!r} in pool {self.pool.path} "
                f"({len(dropped)} corrupt) but needs one per worker ({max(1, self.num_workers)})"
            )
        return kept, dropped

    def _fresh_counts(self) -> dict[str, int]:
        return {"short_tasks": 0, "corrupt": len(self.dropped)}

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its first batch (like DistributedSampler.set_epoch)."""
        self.epoch, self.batch, self.skipped = epoch, 0, self._fresh_counts()

    def state_dict(self) -> dict:
        """What a checkpoint must save to resume this stream exactly (the same on every rank but the counts)."""
        state = {name: getattr(self, name) for name in STATE_FIELDS}
        return {**state, "epoch": self.epoch, "batch": self.batch, "skipped": dict(self.skipped)}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved state; the stream-defining settings must match the ones saved."""
        different = [
            f"{name}: saved {state.get(name)!r}, now {getattr(self, name)!r}"
            for name in STATE_FIELDS
            if state.get(name) != getattr(self, name)
        ]
        if different:
            raise ValueError("cannot resume the task stream exactly; settings differ: " + "; ".join(different))
        self.epoch, self.batch, self.skipped = state["epoch"], state["batch"], dict(state["skipped"])

    def __iter__(self) -> Iterator[TaskBatch]:
        if self.batch >= self.batches_per_epoch:
            self.set_epoch(self.epoch + 1)
        source = _EpisodeSource(self, self.epoch, self.batch)
        workers = dict(prefetch_factor=self.prefetch_factor, timeout=self.worker_timeout_s) if self.num_workers else {}
        loader = DataLoader(
            source, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory, **workers
        )
        for item in _in_index_order(loader, self.batch):
            self.skipped["short_tasks"] += item["new_short_tasks"]
            self.skipped["corrupt"] += len(item["new_problems"])
            for problem in item["new_problems"]:
                logger.warning("skipping corrupt data: %s", problem)
            self.batch = item["index"] + 1
            yield TaskBatch(item["support"], item["query"], item["keys"], self.epoch, item["index"])
        if any(self.skipped.values()):
            logger.info("epoch %d of split %r skipped %s", self.epoch, self.split, self.skipped)
        self.set_epoch(self.epoch + 1)


def _in_index_order(loader: DataLoader, start: int) -> Iterator[dict]:
    """Batches by their index: after a resume, workers' first batches can arrive out of turn."""
    pending, expected = {}, start
    for item in loader:
        pending[item["index"]] = item
        while expected in pending:
            yield pending.pop(expected)
            expected += 1
    if pending:
        raise RuntimeError(f"task stream lost batches before {sorted(pending)}")


class _EpisodeSource(IterableDataset):
    """What each DataLoader worker runs: its batches of one epoch, from `start` on."""

    def __init__(self, stream: TaskStream, epoch: int, start: int):
        super().__init__()
        self.paths = [str(stream.pool.shard_path(shard)) for shard in stream.shards]
        self.image_shape = stream.pool.image_shape
        self.shots, self.queries, self.tasks_per_batch = stream.shots, stream.queries, stream.tasks_per_batch
        self.seed, self.rank, self.epoch = stream.seed, stream.rank, epoch
        self.start, self.stop = start, stream.batches_per_epoch
        self.shuffle_buffer = stream.shuffle_buffer
        self.skip_corrupt, self.on_short_task = stream.skip_corrupt, stream.on_short_task

    def __iter__(self) -> Iterator[dict]:
        wds = import_webdataset()
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        paths = list(wds.split_by_worker(self.paths))
        shard_seed, buffer_seed, episode_seed = np.random.SeedSequence(
            [self.seed, self.rank, self.epoch, worker]
        ).spawn(3)
        reader = _ShardReader(paths, self, np.random.default_rng(shard_seed), np.random.default_rng(episode_seed))
        episodes = iter(
            wds.DataPipeline(
                reader.shard_passes,
                wds.tarfile_to_samples(handler=reader.on_tar_error),
                reader.episodes,
                wds.shuffle(
                    self.shuffle_buffer, self.shuffle_buffer, rng=random.Random(int(buffer_seed.generate_state(1)[0]))
                ),
            )
        )
        reported = (0, 0)
        for index in range(worker, self.stop, workers):
            batch = list(itertools.islice(episodes, self.tasks_per_batch))
            counts = (len(reader.short_keys), len(reader.problems))
            if index >= self.start:
                yield self._collate(batch, index, counts[0] - reported[0], reader.problems[reported[1] :])
            reported = counts

    @staticmethod
    def _collate(batch: list[tuple[str, np.ndarray, np.ndarray]], index: int, short: int, problems: list[str]) -> dict:
        keys, support, query = zip(*batch)
        return {
            "support": images_to_tensor(np.stack(support)),
            "query": images_to_tensor(np.stack(query)),
            "keys": list(keys),
            "index": index,
            "new_short_tasks": short,
            "new_problems": list(problems),
        }


class _ShardReader:
    """One worker's endless shard passes and episode drawing, with the counts of what it skipped."""

    def __init__(
        self, paths: list[str], source: _EpisodeSource, shard_rng: np.random.Generator, episode_rng: np.random.Generator
    ):
        self.paths, self.source = paths, source
        self.shard_rng, self.episode_rng = shard_rng, episode_rng
        self.current = None
        self.episodes_in_pass = 0
        self.short_keys: set[str] = set()
        self.problems: list[str] = []

    def shard_passes(self) -> Iterator[dict]:
        """dict(url=...) for every shard, pass after pass, each pass in a new random order."""
        for number in itertools.count():
            if number and not self.episodes_in_pass:
                raise PoolError(
                    f"no usable task in shards {self.paths}: {len(self.short_keys)} tasks have fewer than "
                    f"k+q={self.source.shots + self.source.queries} images, problems: {self.problems[:3]}"
                )
            self.episodes_in_pass = 0
            for position in self.shard_rng.permutation(len(self.paths)):
                self.current = self.paths[position]
                yield {"url": self.current}

    def on_tar_error(self, exn: Exception) -> bool:
        problem = f"shard {self.current} is unreadable or truncated: {exn.args[0] if exn.args else exn!r}"
        if not self.source.skip_corrupt:
            raise PoolError(problem) from exn
        if problem not in self.problems:
            self.problems.append(problem)
        return True

    def episodes(self, samples: Iterator[dict]) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
        """(key, support uint8 [k, C, H, W], query uint8 [q, C, H, W]): one episode per task read."""
        for sample in samples:
            try:
                key, images, _ = decode_task(sample, self.source.image_shape)
            except PoolError as exn:
                if not self.source.skip_corrupt:
                    raise
                if str(exn) not in self.problems:
                    self.problems.append(str(exn))
                continue
            try:
                support, query = draw_episode(images, self.source.shots, self.source.queries, self.episode_rng)
            except ValueError as exn:
                if self.source.on_short_task == "error":
                    raise PoolError(f"task {key!r} in shard {sample.get('__url__')}: {exn}") from exn
                self.short_keys.add(key)
                continue
            self.episodes_in_pass += 1
            yield key, support, query
