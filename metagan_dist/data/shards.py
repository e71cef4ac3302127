"""Reading task samples out of WebDataset shards, shared by the in-memory reader and the stream.

webdataset is imported only when shards are read or written, so `import metagan_dist` (and the
rest of this package) works on machines without it.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np

from metagan_dist.data.manifest import PoolError

IMAGES_FIELD = "images.npy"
INFO_FIELD = "task.json"


def import_webdataset() -> ModuleType:
    """The webdataset module, or an ImportError that says how to get it."""
    try:
        import webdataset
    except ImportError as exn:
        raise ImportError(
            "reading or writing task pools needs the webdataset package: `pip install webdataset` "
            "(machines without network access need its wheel copied in)"
        ) from exn
    return webdataset


def shard_samples(path: Path) -> Iterator[dict]:
    """The raw samples of one shard, in file order; PoolError naming the shard if it cannot be read."""
    wds = import_webdataset()

    def fail(exn: Exception) -> bool:
        raise PoolError(f"shard {path} is unreadable or truncated: {exn.args[0] if exn.args else exn!r}") from exn

    if not path.is_file():
        raise PoolError(f"shard {path} is missing")
    yield from wds.DataPipeline(wds.SimpleShardList([str(path)]), wds.tarfile_to_samples(handler=fail))


def decode_task(sample: dict, image_shape: tuple[int, int, int]) -> tuple[str, np.ndarray, dict]:
    """(key, images uint8 [N, C, H, W], task info) of one sample, checked against the manifest's shape."""
    key, where = sample.get("__key__"), sample.get("__url__")
    missing = [name for name in (IMAGES_FIELD, INFO_FIELD) if name not in sample]
    if missing:
        raise PoolError(f"task {key!r} in shard {where} lacks {', '.join(missing)} (truncated or foreign shard)")
    try:
        images = np.load(io.BytesIO(sample[IMAGES_FIELD]), allow_pickle=False)
        info = json.loads(sample[INFO_FIELD])
    except (ValueError, OSError, UnicodeDecodeError) as exn:
        raise PoolError(f"task {key!r} in shard {where} cannot be decoded: {exn}") from exn
    if images.dtype != np.uint8 or images.ndim != 4 or tuple(images.shape[1:]) != tuple(image_shape):
        raise PoolError(
            f"task {key!r} in shard {where} holds images {images.dtype} {list(images.shape)}; the manifest "
            f"index.json says uint8 [N, {', '.join(map(str, image_shape))}]"
        )
    return key, images, info
