"""Pool: a task pool on disk, its manifest, checks of its shards, and in-memory loading of tasks.

For small uses (evaluation, fixed sample tasks); training streams tasks with TaskStream instead.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from metagan_dist.data.manifest import MANIFEST_NAME, Manifest, PoolError, ShardInfo, sha256_file
from metagan_dist.data.shards import decode_task, shard_samples


class Pool:
    """A pool folder (index.json + shards), validated on opening: PoolError names what is wrong."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.manifest = Manifest.read(self.path)
        if not any(shard.tasks for shard in self.manifest.shards):
            raise PoolError(f"pool {self.path} is empty: {self.path / MANIFEST_NAME} lists no tasks")

    def __repr__(self) -> str:
        return f"Pool({str(self.path)!r}, image_shape={self.image_shape}, splits={self.manifest.splits})"

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of every image in the pool."""
        return self.manifest.image_shape

    def shards(self, split: str) -> list[ShardInfo]:
        """The shards of one split, in manifest order; PoolError if the split has no tasks."""
        shards = [shard for shard in self.manifest.shards if shard.split == split and shard.tasks]
        if not shards:
            available = ", ".join(f"{name} ({info['tasks']} tasks)" for name, info in self.manifest.splits.items())
            raise PoolError(f"pool {self.path} has no tasks in split {split!r}; it has: {available}")
        return shards

    def keys(self, split: str) -> list[str]:
        """Task keys of one split, in manifest order."""
        return [key for shard in self.shards(split) for key in shard.keys]

    def shard_path(self, shard: ShardInfo) -> Path:
        return self.path / shard.file

    def shard_problem(self, shard: ShardInfo, checksum: bool = True) -> str | None:
        """Why a shard cannot be used (missing, wrong size, checksum mismatch), or None if it is intact."""
        path = self.shard_path(shard)
        if not path.is_file():
            return f"shard {path} listed in {MANIFEST_NAME} is missing"
        size = path.stat().st_size
        if size != shard.bytes:
            return f"shard {path} is {size} bytes but {MANIFEST_NAME} says {shard.bytes} (truncated or rewritten)"
        if checksum and (digest := sha256_file(path)) != shard.sha256:
            return f"shard {path} fails its checksum: sha256 {digest}, {MANIFEST_NAME} says {shard.sha256}"
        return None

    def verify(self, shards: Iterable[ShardInfo] | None = None, checksum: bool = True) -> None:
        """Check shards (default: all) against the manifest; PoolError on the first problem."""
        for shard in self.manifest.shards if shards is None else shards:
            if problem := self.shard_problem(shard, checksum):
                raise PoolError(problem)

    def load_tasks(self, split: str, keys: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        """Tasks of a split as {key: uint8 [N, C, H, W]} (all, or `keys` in that order), checksums verified."""
        shards = self.shards(split)
        wanted = None if keys is None else list(keys)
        if wanted is not None:
            known = {key for shard in shards for key in shard.keys}
            unknown = [key for key in wanted if key not in known]
            if unknown:
                raise PoolError(f"pool {self.path}: no task {', '.join(map(repr, unknown))} in split {split!r}")
            shards = [shard for shard in shards if not set(wanted).isdisjoint(shard.keys)]
        self.verify(shards)
        tasks = {}
        for shard in shards:
            path = self.shard_path(shard)
            read = dict(decode_task(sample, self.image_shape)[:2] for sample in shard_samples(path))
            if list(read) != shard.keys:
                raise PoolError(
                    f"shard {path} holds tasks {list(read)[:3]}... but {MANIFEST_NAME} lists {shard.keys[:3]}..."
                )
            tasks.update(read)
        return tasks if wanted is None else {key: tasks[key] for key in wanted}
