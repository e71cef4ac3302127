"""Pool format: writer -> reader round trip, the manifest, and every bad input's error message."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from metagan_dist.data import Pool, PoolError, Task, write_pool
from metagan_dist.data.manifest import MANIFEST_NAME, sha256_file
from metagan_dist.data.writer import CONTACT_SHEET, TaskSource, pick_test_keys, task_key


def random_tasks(
    count: int, images: int | list[int], shape=(1, 8, 8), test_every: int = 5, seed: int = 0
) -> list[Task]:
    """`count` tasks of random uint8 images; every `test_every`-th task is meta-test."""
    rng = np.random.default_rng(seed)
    sizes = images if isinstance(images, list) else [images] * count
    return [
        Task(
            f"task{i:03d}",
            rng.integers(0, 256, (sizes[i], *shape), dtype=np.uint8),
            "test" if i % test_every == 0 else "train",
            f"task number {i}",
        )
        for i in range(count)
    ]


def write_random_pool(out: Path, tasks: list[Task], shape=(1, 8, 8), maxcount: int = 5) -> Path:
    """A pool of `tasks` in `out` (shards of at most `maxcount` tasks)."""
    write_pool(TaskSource(tasks, len(tasks), shape, {"kind": "random"}), out, command="test", maxcount=maxcount)
    return out


@pytest.fixture(scope="module")
def tasks() -> list[Task]:
    return random_tasks(30, 12)


@pytest.fixture(scope="module")
def pool_path(tmp_path_factory, tasks) -> Path:
    return write_random_pool(tmp_path_factory.mktemp("pool") / "pool", tasks)


@pytest.fixture
def pool_copy(tmp_path, pool_path) -> Path:
    """A private copy of the pool that a test may damage."""
    return Path(shutil.copytree(pool_path, tmp_path / "pool"))


def rewrite_manifest(path: Path, **changes) -> None:
    data = json.loads((path / MANIFEST_NAME).read_text())
    data.update(changes)
    (path / MANIFEST_NAME).write_text(json.dumps(data))


def test_round_trip_is_byte_exact(pool_path, tasks):
    pool = Pool(pool_path)
    for split in ("train", "test"):
        loaded = pool.load_tasks(split)
        expected = [task for task in tasks if task.split == split]
        assert list(loaded) == [task.key for task in expected]
        for task in expected:
            array = loaded[task.key]
            assert array.dtype == np.uint8 and array.shape == task.images.shape
            assert array.tobytes() == task.images.tobytes()


def test_manifest_describes_the_pool(pool_path, tasks):
    pool = Pool(pool_path)
    manifest = json.loads((pool_path / MANIFEST_NAME).read_text())
    assert manifest["image_shape"] == [1, 8, 8] and manifest["channels"] == 1 and manifest["command"] == "test"
    assert manifest["splits"] == {
        "test": {"tasks": 6, "images": 72, "shards": 2},
        "train": {"tasks": 24, "images": 288, "shards": 5},
    }
    for shard in manifest["shards"]:
        assert shard["sha256"] == sha256_file(pool_path / shard["file"])
        assert shard["bytes"] == (pool_path / shard["file"]).stat().st_size
        assert shard["file"].startswith(shard["split"] + "-") and shard["tasks"] <= 5
    assert pool.keys("test") == [task.key for task in tasks if task.split == "test"]
    assert (pool_path / CONTACT_SHEET).stat().st_size > 0


def test_load_tasks_by_key_keeps_the_requested_order(pool_path, tasks):
    loaded = Pool(pool_path).load_tasks("train", ["task029", "task001"])
    assert list(loaded) == ["task029", "task001"]
    assert loaded["task001"].tobytes() == tasks[1].images.tobytes()


def test_unknown_keys_are_named(pool_path):
    with pytest.raises(PoolError, match=r"no task 'task000' in split 'train'"):
        Pool(pool_path).load_tasks("train", ["task000"])  # task000 is meta-test


def test_missing_manifest(tmp_path):
    with pytest.raises(PoolError, match=f"no pool manifest at {re.escape(str(tmp_path / MANIFEST_NAME))}"):
        Pool(tmp_path)


def test_unreadable_manifest(pool_copy):
    (pool_copy / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(PoolError, match=f"pool manifest {re.escape(str(pool_copy / MANIFEST_NAME))} is unreadable"):
        Pool(pool_copy)


def test_manifest_of_another_format(pool_copy):
    rewrite_manifest(pool_copy, version=99)
    with pytest.raises(PoolError, match=r"version 99; this reader understands"):
        Pool(pool_copy)


def test_empty_pool(pool_copy):
    rewrite_manifest(pool_copy, shards=[])
    with pytest.raises(PoolError, match=f"pool {re.escape(str(pool_copy))} is empty: .*{MANIFEST_NAME} lists no tasks"):
        Pool(pool_copy)


def test_split_without_tasks(pool_path):
    with pytest.raises(PoolError, match=r"has no tasks in split 'val'; it has: test \(6 tasks\), train \(24 tasks\)"):
        Pool(pool_path).shards("val")


def test_missing_shard(pool_copy):
    (pool_copy / "train-000002.tar").unlink()
    with pytest.raises(PoolError, match=r"shard .*train-000002.tar listed in index.json is missing"):
        Pool(pool_copy).load_tasks("train")


def test_truncated_shard(pool_copy):
    shard = pool_copy / "train-000001.tar"
    shard.write_bytes(shard.read_bytes()[:3000])
    with pytest.raises(PoolError, match=r"shard .*train-000001.tar is 3000 bytes but index.json says \d+ \(truncated"):
        Pool(pool_copy).verify()


def test_checksum_mismatch(pool_copy):
    shard = pool_copy / "test-000000.tar"
    data = bytearray(shard.read_bytes())
    data[2000] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(
        PoolError, match=r"shard .*test-000000.tar fails its checksum: sha256 [0-9a-f]{64}, index.json says"
    ):
        Pool(pool_copy).load_tasks("test")


def test_image_shape_differs_from_manifest(pool_copy):
    rewrite_manifest(pool_copy, image_shape=[1, 8, 9])
    with pytest.raises(
        PoolError,
        match=r"task 'task000' in shard .*test-000000.tar holds images uint8 \[12, 1, 8, 8\]; "
        r"the manifest index.json says uint8 \[N, 1, 8, 9\]",
    ):
        Pool(pool_copy).load_tasks("test")


def test_foreign_shard_content(pool_copy):
    shutil.copy(pool_copy / "train-000000.tar", pool_copy / "train-000001.tar")
    data = json.loads((pool_copy / MANIFEST_NAME).read_text())
    first = next(shard for shard in data["shards"] if shard["file"] == "train-000000.tar")
    second = next(shard for shard in data["shards"] if shard["file"] == "train-000001.tar")
    second.update(bytes=first["bytes"], sha256=first["sha256"])
    (pool_copy / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(PoolError, match=r"shard .*train-000001.tar holds tasks \['task001'"):
        Pool(pool_copy).load_tasks("train")


@pytest.mark.parametrize(
    "task, message",
    [
        (Task("bad.key", np.zeros((2, 1, 8, 8), np.uint8), "train", "x"), r"task key 'bad.key' \(x\) must match"),
        (
            Task("k", np.zeros((2, 1, 8, 8), np.float32), "train", "x"),
            r"images must be uint8 \[N, 1, 8, 8\], got float32",
        ),
        (Task("k", np.zeros((2, 3, 8, 8), np.uint8), "train", "x"), r"got uint8 \[2, 3, 8, 8\]"),
        (Task("k", np.zeros((0, 1, 8, 8), np.uint8), "train", "x"), r"task 'k' \(x\) has no images"),
        (Task("k", np.zeros((2, 1, 8, 8), np.uint8), "Train-1", "x"), r"split 'Train-1' must be lowercase letters"),
    ],
)
def test_writer_rejects_bad_tasks_and_leaves_nothing_behind(tmp_path, task, message):
    with pytest.raises(PoolError, match=message):
        write_random_pool(tmp_path / "out", [*random_tasks(3, 4), task])
    assert list(tmp_path.iterdir()) == []


def test_writer_rejects_duplicate_keys(tmp_path):
    tasks = random_tasks(3, 4)
    with pytest.raises(PoolError, match=r"task key 'task001' \(task number 1\) is used twice"):
        write_random_pool(tmp_path / "out", [*tasks, tasks[1]])


def test_writer_rejects_an_empty_source(tmp_path):
    with pytest.raises(PoolError, match=r"no tasks to write into .*out: the source gave none"):
        write_random_pool(tmp_path / "out", [])


def test_writer_refuses_to_overwrite_unless_asked(tmp_path):
    out = write_random_pool(tmp_path / "out", random_tasks(3, 4))
    with pytest.raises(
        FileExistsError, match=f"{re.escape(str(out))} already exists: choose another output folder or pass --overwrite"
    ):
        write_random_pool(out, random_tasks(3, 4))
    replacement = random_tasks(4, 2, seed=1)
    write_pool(TaskSource(replacement, 4, (1, 8, 8), {"kind": "random"}), out, command="again", overwrite=True)
    assert Pool(out).manifest.command == "again"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]


def test_task_keys_and_seeded_test_split():
    assert task_key("Alphabet_of_the_Magi/character01.v2") == "Alphabet_of_the_Magi_character01_v2"
    keys = [f"k{i}" for i in range(40)]
    test = pick_test_keys(keys, 0.15, seed=3)
    assert len(test) == 6 and test == pick_test_keys(reversed(keys), 0.15, seed=3)
    assert test != pick_test_keys(keys, 0.15, seed=4)
    with pytest.raises(ValueError, match=r"meta-test fraction must be in \[0, 1\), got 1.5"):
        pick_test_keys(keys, 1.5, seed=0)
