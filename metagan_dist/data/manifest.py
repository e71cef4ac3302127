"""The pool manifest, index.json: what a pool holds, where, and how it was built.

A pool is a folder of WebDataset shards (one sample = one task) plus index.json. Every shard
belongs to one split (meta-train "train", meta-test "test", ...) and is listed with its size,
sha256, task count and task keys, so readers can check a pool before training starts.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

MANIFEST_NAME = "index.json"
FORMAT = "metagan_dist.task_pool"
VERSION = 1
TASK_KEY = re.compile(r"[A-Za-z0-9_-]+")  # no dots: WebDataset splits key and field at the first dot


class PoolError(ValueError):
    """A pool (manifest, shard or task) that cannot be used as it is; the message names the file."""


@dataclass
class ShardInfo:
    """One shard file of a pool: its split, size, checksum and the tasks it holds, in order."""

    file: str
    split: str
    tasks: int
    images: int
    bytes: int
    sha256: str
    keys: list[str]


@dataclass
class Manifest:
    """The content of index.json."""

    image_shape: tuple[int, int, int]
    shards: list[ShardInfo]
    source: dict
    command: str
    format: str = FORMAT
    version: int = VERSION
    dtype: str = "uint8"

    @property
    def channels(self) -> int:
        return self.image_shape[0]

    @property
    def splits(self) -> dict[str, dict[str, int]]:
        """Tasks, images and shards per split."""
        return summarise_splits(self.shards)

    def to_json(self) -> str:
        """index.json text: the summary fields first, then one entry per shard (stable bytes)."""
        data = {
            "format": self.format,
            "version": self.version,
            "image_shape": list(self.image_shape),
            "channels": self.channels,
            "dtype": self.dtype,
            "source": self.source,
            "command": self.command,
            "splits": self.splits,
            "shards": [asdict(shard) for shard in self.shards],
        }
        return json.dumps(data, indent=1, ensure_ascii=False) + "\n"

    def write(self, folder: Path) -> Path:
        """Write index.json into `folder` and return its path."""
        path = Path(folder) / MANIFEST_NAME
        path.write_text(self.to_json(), encoding="utf-8")
        return path

    @classmethod
    def read(cls, folder: str | Path) -> Manifest:
        """Load and validate `folder`/index.json; raises PoolError naming the file and the problem."""
        path = Path(folder) / MANIFEST_NAME
        if not path.is_file():
            raise PoolError(f"no pool manifest at {path}: build a pool with `metagan-make-shards`")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exn:
            raise PoolError(f"pool manifest {path} is unreadable: {exn}") from exn
        return cls._from_dict(data, path)

    @classmethod
    def _from_dict(cls, data: object, path: Path) -> Manifest:
        if not isinstance(data, dict):
            raise PoolError(f"pool manifest {path} must hold a JSON object, not {type(data).__name__}")
        if data.get("format") != FORMAT or data.get("version") != VERSION:
            raise PoolError(
                f"pool manifest {path} has format {data.get('format')!r} version {data.get('version')!r}; "
                f"this reader understands {FORMAT!r} version {VERSION}"
            )
        missing = [name for name in ("image_shape", "shards", "source", "command") if name not in data]
        if missing:
            raise PoolError(f"pool manifest {path} lacks the field(s) {', '.join(missing)}")
        shape = data["image_shape"]
        if not (isinstance(shape, list) and len(shape) == 3 and all(isinstance(s, int) and s > 0 for s in shape)):
            raise PoolError(f"pool manifest {path}: image_shape must be [C, H, W] positive integers, got {shape!r}")
        if data.get("dtype", "uint8") != "uint8":
            raise PoolError(f"pool manifest {path}: dtype {data['dtype']!r} is not supported (only uint8)")
        shards = [_shard_from_dict(entry, path) for entry in data["shards"]]
        manifest = cls(image_shape=tuple(shape), shards=shards, source=data["source"], command=data["command"])
        _check_keys(manifest, path)
        return manifest


def summarise_splits(shards: list[ShardInfo]) -> dict[str, dict[str, int]]:
    """Tasks, images and shards per split."""
    splits: dict[str, dict[str, int]] = {}
    for shard in shards:
        entry = splits.setdefault(shard.split, {"tasks": 0, "images": 0, "shards": 0})
        entry["tasks"] += shard.tasks
        entry["images"] += shard.images
        entry["shards"] += 1
    return dict(sorted(splits.items()))


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while block := stream.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _shard_from_dict(entry: object, path: Path) -> ShardInfo:
    fields = ("file", "split", "tasks", "images", "bytes", "sha256", "keys")
    if not isinstance(entry, dict) or any(name not in entry for name in fields):
        raise PoolError(f"pool manifest {path}: a shard entry must have the fields {', '.join(fields)}; got {entry!r}")
    shard = ShardInfo(**{name: entry[name] for name in fields})
    if Path(shard.file).name != shard.file:
        raise PoolError(f"pool manifest {path}: shard file {shard.file!r} must be a plain file name in the pool folder")
    if shard.tasks != len(shard.keys):
        raise PoolError(
            f"pool manifest {path}: shard {shard.file} says {shard.tasks} tasks but lists {len(shard.keys)} keys"
        )
    return shard


def _check_keys(manifest: Manifest, path: Path) -> None:
    seen: dict[str, str] = {}
    for shard in manifest.shards:
        for key in shard.keys:
            if not TASK_KEY.fullmatch(key):
                raise PoolError(f"pool manifest {path}: task key {key!r} in {shard.file} must match {TASK_KEY.pattern}")
            if key in seen:
                raise PoolError(f"pool manifest {path}: task key {key!r} appears in {seen[key]} and {shard.file}")
            seen[key] = shard.file
