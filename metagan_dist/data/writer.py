"""Writing a task pool: tasks -> WebDataset shards rotated by count and size, index.json, contact sheet.

The pool is written into a temporary sibling folder and renamed into place at the end, so a
crashed or concurrent writer never leaves a half-written pool at the final path.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from metagan_dist.data.contact_sheet import save_contact_sheet
from metagan_dist.data.manifest import TASK_KEY, Manifest, PoolError, ShardInfo, sha256_file
from metagan_dist.data.shards import IMAGES_FIELD, INFO_FIELD, import_webdataset

SPLIT_NAME = re.compile(r"[a-z]+")
CONTACT_SHEET = "contact_sheet.png"
DEFAULT_MAXCOUNT = 64  # tasks per shard: small shards let many ranks x workers each get a share
DEFAULT_MAXSIZE = 64_000_000  # bytes per shard


@dataclass
class Task:
    """One task to write: key (no dots), images uint8 [N, C, H, W], split, readable name, extra info."""

    key: str
    images: np.ndarray
    split: str
    name: str
    info: dict = field(default_factory=dict)


@dataclass
class TaskSource:
    """What a writer consumes: tasks (often a lazy generator), their count, image shape, a description."""

    tasks: Iterable[Task]
    total: int
    image_shape: tuple[int, int, int]
    info: dict  # recorded as the manifest's "source"; "kind" names the source


@dataclass
class WriteSummary:
    """What a writer produced."""

    path: Path
    splits: dict[str, dict[str, int]]
    image_shape: tuple[int, int, int]
    shards: int
    bytes: int
    seconds: float

    def __str__(self) -> str:
        tasks = sum(split["tasks"] for split in self.splits.values())
        images = sum(split["images"] for split in self.splits.values())
        per_split = ", ".join(f"{name} {split['tasks']}" for name, split in self.splits.items())
        return (
            f"wrote pool {self.path}: {tasks} tasks ({per_split}), {images} images "
            f"{list(self.image_shape)}, {self.shards} shards, {self.bytes / 1e6:.1f} MB in {self.seconds:.1f} s"
        )


def task_key(name: str) -> str:
    """A valid task key from a free-form name: every character outside [A-Za-z0-9_-] becomes '_'."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", name) or "_"


def pick_test_keys(keys: Iterable[str], fraction: float, seed: int) -> set[str]:
    """A seeded meta-test split: round(fraction * n) of the keys (sorted first, so input order is irrelevant)."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"the meta-test fraction must be in [0, 1), got {fraction}")
    ordered = sorted(keys)
    count = round(fraction * len(ordered))
    picked = np.random.default_rng(seed).permutation(len(ordered))[:count]
    return {ordered[i] for i in picked}


def write_pool(
    source: TaskSource,
    out: str | Path,
    *,
    command: str,
    maxcount: int = DEFAULT_MAXCOUNT,
    maxsize: int = DEFAULT_MAXSIZE,
    overwrite: bool = False,
) -> WriteSummary:
    """Write a source's tasks as the pool folder `out` (shards per split, index.json, contact sheet).

    Shows a progress bar, prints a summary and returns it; `command` is recorded in index.json.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists: choose another output folder or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        shards = _write_shards(source, staging, maxcount, maxsize, desc=f"writing {out.name}")
        if not shards:
            raise PoolError(f"no tasks to write into {out}: the source gave none")
        manifest = Manifest(image_shape=tuple(source.image_shape), shards=shards, source=source.info, command=command)
        manifest.write(staging)
        _write_contact_sheet(staging)
        _move_into_place(staging, out, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    summary = WriteSummary(
        path=out,
        splits=manifest.splits,
        image_shape=manifest.image_shape,
        shards=len(shards),
        bytes=sum(shard.bytes for shard in shards),
        seconds=time.perf_counter() - started,
    )
    print(summary, flush=True)
    return summary


def _write_shards(source: TaskSource, folder: Path, maxcount: int, maxsize: int, desc: str) -> list[ShardInfo]:
    """Write every task into `folder`/<split>-NNNNNN.tar (one ShardWriter per split); describe the shards."""
    from tqdm import tqdm

    wds = import_webdataset()
    image_shape = tuple(source.image_shape)
    writers: dict[str, object] = {}
    contents: dict[str, tuple[str, list[str], list[int]]] = {}  # shard file -> (split, keys, image counts)
    seen: set[str] = set()
    try:
        for task in tqdm(source.tasks, total=source.total, desc=desc, unit="task"):
            _check_task(task, image_shape, seen)
            if task.split not in writers:
                pattern = str(folder / f"{task.split}-%06d.tar")
                writers[task.split] = wds.ShardWriter(pattern, maxcount=maxcount, maxsize=maxsize, verbose=0, mtime=0)
            writer = writers[task.split]
            info = {"name": task.name, "source": source.info["kind"], "split": task.split, "images": len(task.images)}
            writer.write({"__key__": task.key, IMAGES_FIELD: task.images, INFO_FIELD: {**info, **task.info}})
            _, keys, counts = contents.setdefault(Path(writer.fname).name, (task.split, [], []))
            keys.append(task.key)
            counts.append(len(task.images))
    finally:
        for writer in writers.values():
            writer.close()
    return [
        ShardInfo(
            file=name,
            split=split,
            tasks=len(keys),
            images=sum(counts),
            bytes=(folder / name).stat().st_size,
            sha256=sha256_file(folder / name),
            keys=keys,
        )
        for name, (split, keys, counts) in sorted(contents.items())
    ]


def _check_task(task: Task, image_shape: tuple[int, int, int], seen: set[str]) -> None:
    if not TASK_KEY.fullmatch(task.key):
        raise PoolError(f"task key {task.key!r} ({task.name}) must match {TASK_KEY.pattern} (no dots)")
    if task.key in seen:
        raise PoolError(f"task key {task.key!r} ({task.name}) is used twice")
    if not SPLIT_NAME.fullmatch(task.split):
        raise PoolError(f"task {task.key!r}: split {task.split!r} must be lowercase letters, e.g. train or test")
    images = task.images
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.shape[1:] != tuple(image_shape):
        shape = getattr(images, "shape", None)
        raise PoolError(
            f"task {task.key!r} ({task.name}): images must be uint8 [N, {', '.join(map(str, image_shape))}], "
            f"got {getattr(images, 'dtype', type(images).__name__)} {list(shape) if shape is not None else ''}"
        )
    if len(images) == 0:
        raise PoolError(f"task {task.key!r} ({task.name}) has no images")
    seen.add(task.key)


def _write_contact_sheet(folder: Path, rows: int = 12) -> None:
    """Read a few tasks back (checksums and round trip included) and save them as a contact sheet."""
    from metagan_dist.data.pool import Pool

    pool = Pool(folder)
    keys = [(split, key) for split in pool.manifest.splits for key in pool.keys(split)]
    picked = [keys[i] for i in np.linspace(0, len(keys) - 1, min(rows, len(keys))).round().astype(int)]
    tasks = {}
    for split in dict.fromkeys(split for split, _ in picked):
        tasks.update(pool.load_tasks(split, [key for s, key in picked if s == split]))
    save_contact_sheet(tasks, folder / CONTACT_SHEET)


def _move_into_place(staging: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished staging folder to `out` (replacing an old pool only when overwrite is set)."""
    staging.chmod(0o755)
    if overwrite and out.exists():
        retired = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
        os.replace(out, retired / out.name)
        shutil.rmtree(retired)
    try:
        os.rename(staging, out)
    except OSError as exn:
        raise FileExistsError(f"{out} appeared while the pool was being written (another writer?)") from exn
