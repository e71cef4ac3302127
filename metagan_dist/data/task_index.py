"""Random access to the tasks of a pool split: where each task's images lie inside its shard.

A pool's shards are plain (uncompressed) tar files, so every member's bytes sit contiguously at a
fixed offset. The index walks the tar headers of each shard once, checks the task keys against
the manifest, reads each `images.npy` header (shape and dtype, so tasks too small for an episode
or of the wrong shape are known before training) and keeps, per task, the byte offset and image
count. Reading a task is then one positioned read (`os.pread`) of N·C·H·W bytes, whatever shard
it is in: this is what lets every reader draw any task of the split.
"""

from __future__ import annotations

import os
import tarfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from metagan_dist.data.manifest import MANIFEST_NAME, PoolError, ShardInfo
from metagan_dist.data.shards import IMAGES_FIELD

OPEN_FILES = 64  # shard files a reader keeps open at once (least recently used are closed)


@dataclass
class TaskIndex:
    """Every task of some shards: key, shard file, byte offset of its image data, image count."""

    image_shape: tuple[int, int, int]
    paths: list[str]  # shard files
    keys: list[str]  # task keys, shard by shard in manifest order
    shard: np.ndarray  # int32 [tasks]: position in `paths`
    offset: np.ndarray  # int64 [tasks]: byte offset of the uint8 image data in the shard
    count: np.ndarray  # int64 [tasks]: images N

    @classmethod
    def build(cls, folder: Path, shards: list[ShardInfo], image_shape: tuple[int, int, int],
              damaged: dict[str, str] | None = None) -> TaskIndex:
        """Index `shards` of the pool in `folder`; PoolError naming the shard (and task) on any mismatch,
        or, given a `damaged` dict, such shards are left out and recorded there as {file: problem}."""
        paths, keys, shard_of, offsets, counts = [], [], [], [], []
        for shard in shards:
            path = folder / shard.file
            try:
                entries = _index_shard(path, shard.keys, image_shape)
            except PoolError as err:
                if damaged is None:
                    raise
                damaged[shard.file] = str(err)
                continue
            for key, offset, count in entries:
                keys.append(key)
                shard_of.append(len(paths))
                offsets.append(offset)
                counts.append(count)
            paths.append(str(path))
        return cls(tuple(image_shape), paths, keys, np.asarray(shard_of, np.int32), np.asarray(offsets, np.int64),
                   np.asarray(counts, np.int64))

    def __len__(self) -> int:
        return len(self.keys)

    def read(self, task: int, files: ShardFiles) -> np.ndarray:
        """The images of task number `task`, uint8 [N, C, H, W], by one positioned read."""
        path = self.paths[self.shard[task]]
        size = int(self.count[task]) * int(np.prod(self.image_shape))
        try:
            data = os.pread(files.fd(path), size, int(self.offset[task]))
        except OSError as err:
            raise PoolError(f"shard {path} is unreadable or truncated: {err}") from err
        if len(data) != size:
            raise PoolError(f"shard {path} is unreadable or truncated: task {self.keys[task]!r} needs {size} bytes at "
                            f"offset {self.offset[task]}, the file gave {len(data)} (changed since it was indexed?)")
        return np.frombuffer(data, np.uint8).reshape(-1, *self.image_shape)


class ShardFiles:
    """Open shard files of one reader process, the least recently used closed beyond OPEN_FILES."""

    def __init__(self, limit: int = OPEN_FILES):
        self.limit = limit
        self.open: OrderedDict[str, int] = OrderedDict()

    def fd(self, path: str) -> int:
        if path in self.open:
            self.open.move_to_end(path)
            return self.open[path]
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as err:
            raise PoolError(f"shard {path} cannot be opened: {err}") from err
        self.open[path] = fd
        if len(self.open) > self.limit:
            os.close(self.open.popitem(last=False)[1])
        return fd

    def close(self) -> None:
        while self.open:
            os.close(self.open.popitem()[1])


def _index_shard(path: Path, expected: list[str], image_shape: tuple[int, int, int]) -> list[tuple[str, int, int]]:
    """(key, data offset, image count) of every task in one shard, in file order."""
    members: dict[str, tarfile.TarInfo] = {}
    try:
        with tarfile.open(path, "r:") as archive:
            for member in archive:
                key, _, field = _split_name(member.name)
                if field == IMAGES_FIELD:
                    members[key] = member
            found = list(members)
            if found != expected:
                missing = [k for k in expected if k not in members]
                raise PoolError(f"shard {path} holds tasks {found[:3]}... but {MANIFEST_NAME} lists {expected[:3]}..."
                                + (f" ({len(missing)} listed tasks have no {IMAGES_FIELD}, e.g. {missing[0]!r})"
                                   if missing else ""))
            return [(key, *_npy_data(archive.fileobj, member, key, path, image_shape)) for key, member in members.items()]
    except (tarfile.TarError, OSError, EOFError) as err:
        raise PoolError(f"shard {path} is unreadable or truncated: {err}") from err


def _split_name(name: str) -> tuple[str, str, str]:
    """WebDataset's naming: the key is everything before the first dot of the file name."""
    folder, _, base = name.rpartition("/")
    stem, dot, field = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), dot, field


def _npy_data(file, member: tarfile.TarInfo, key: str, path: Path, image_shape: tuple[int, int, int]) -> tuple[int, int]:
    """(offset of the array data, image count) of one task's images.npy, its header checked."""
    file.seek(member.offset_data)
    try:
        version = np.lib.format.read_magic(file)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(file)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(file)
    except ValueError as err:
        raise PoolError(f"task {key!r} in shard {path} cannot be decoded: {err}") from err
    if dtype != np.uint8 or fortran or len(shape) != 4 or tuple(shape[1:]) != tuple(image_shape):
        raise PoolError(
            f"task {key!r} in shard {path} holds images {dtype} {list(shape)}; the manifest {MANIFEST_NAME} says "
            f"uint8 [N, {', '.join(map(str, image_shape))}]"
        )
    offset = file.tell()
    if member.offset_data + member.size - offset != int(np.prod(shape)):
        raise PoolError(f"task {key!r} in shard {path}: {IMAGES_FIELD} is {member.size} bytes, which does not fit "
                        f"its header's shape {list(shape)}")
    return offset, int(shape[0])
