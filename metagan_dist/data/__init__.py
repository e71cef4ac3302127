"""Task pools: WebDataset shards of tasks, their manifest, writers, the embedded glyphs pool, streaming.

Nothing here imports webdataset or matplotlib until a pool is read, written or rendered.
"""

from metagan_dist.data.glyphs import build_glyphs_pool, ensure_glyphs_pool
from metagan_dist.data.manifest import Manifest, PoolError, ShardInfo
from metagan_dist.data.pool import Pool
from metagan_dist.data.stream import TaskBatch, TaskSampler, TaskStream, images_to_tensor
from metagan_dist.data.writer import Task, TaskSource, WriteSummary, write_pool

__all__ = [
    "Manifest",
    "Pool",
    "PoolError",
    "ShardInfo",
    "Task",
    "TaskBatch",
    "TaskSampler",
    "TaskSource",
    "TaskStream",
    "WriteSummary",
    "build_glyphs_pool",
    "ensure_glyphs_pool",
    "images_to_tensor",
    "write_pool",
]
