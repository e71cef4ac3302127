"""TaskStream: batch contents, determinism, exact resume, draws across ranks and workers, and bad input."""

from __future__ import annotations

import json
import logging
import shutil
import signal
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from test_data_pool import random_tasks, rewrite_manifest, write_random_pool

from metagan_dist.data import Pool, PoolError, TaskStream


@contextmanager
def deadline(seconds: float):
    """Fail with TimeoutError instead of hanging (main-thread code, i.e. num_workers=0 or the loader)."""

    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def tasks():
    return random_tasks(30, 12)  # 24 train tasks in 5 shards (5, 5, 5, 5, 4), 6 test tasks


@pytest.fixture(scope="module")
def pool_path(tmp_path_factory, tasks) -> Path:
    return write_random_pool(tmp_path_factory.mktemp("stream") / "pool", tasks)


@pytest.fixture
def pool_copy(tmp_path, pool_path) -> Path:
    return Path(shutil.copytree(pool_path, tmp_path / "pool"))


def make_stream(path, **overrides) -> TaskStream:
    settings = dict(shots=3, queries=2, tasks_per_batch=4, episodes_per_epoch=40, seed=7)
    return TaskStream(path, **{**settings, **overrides})


def collect(stream: TaskStream) -> list:
    with deadline(120):
        return list(stream)


def same_batches(first: list, second: list) -> bool:
    return len(first) == len(second) and all(
        a.keys == b.keys and a.index == b.index and torch.equal(a.support, b.support) and torch.equal(a.query, b.query)
        for a, b in zip(first, second)
    )


def test_batches_hold_episodes_of_the_named_tasks(pool_path, tasks):
    batches = collect(make_stream(pool_path, num_workers=0))
    assert len(batches) == 10 and [batch.index for batch in batches] == list(range(10))
    by_key = {task.key: task.images for task in tasks}
    for batch in batches:
        assert batch.support.shape == (4, 3, 1, 8, 8) and batch.query.shape == (4, 2, 1, 8, 8)
        assert batch.support.dtype == torch.float32 and batch.epoch == 0
        assert batch.support.min() >= -1 and batch.support.max() <= 1
        for row, key in enumerate(batch.keys):
            images = torch.from_numpy(by_key[key]).float() / 127.5 - 1
            episode = torch.cat([batch.support[row], batch.query[row]])
            matches = [int((images == image).all(dim=(1, 2, 3)).nonzero()[0]) for image in episode]
            assert len(set(matches)) == 5  # k + q distinct images of that task: drawn without replacement
    assert {key for batch in batches for key in batch.keys} <= set(Pool(pool_path).keys("train"))


@pytest.mark.parametrize("workers", [0, 2])
def test_deterministic_given_seed_rank_epoch(pool_path, workers):
    first = collect(make_stream(pool_path, num_workers=workers))
    assert same_batches(first, collect(make_stream(pool_path, num_workers=workers)))
    other_seed = collect(make_stream(pool_path, num_workers=workers, seed=8))
    assert [b.keys for b in first] != [b.keys for b in other_seed]
    stream = make_stream(pool_path, num_workers=workers)
    stream.set_epoch(1)
    assert [b.keys for b in first] != [b.keys for b in collect(stream)]


@pytest.mark.parametrize("workers, stop_after", [(0, 3), (2, 3), (2, 6)])
def test_resume_continues_exactly(pool_path, workers, stop_after):
    unbroken = make_stream(pool_path, num_workers=workers)
    epoch0, epoch1 = collect(unbroken), collect(unbroken)
    assert [b.epoch for b in epoch1] == [1] * 10

    interrupted = make_stream(pool_path, num_workers=workers)
    with deadline(120):
        for batch in interrupted:
            if batch.index == stop_after - 1:
                break
    state = json.loads(json.dumps(interrupted.state_dict()))  # what a checkpoint would hold
    assert state["epoch"] == 0 and state["batch"] == stop_after

    resumed = make_stream(pool_path, num_workers=workers)
    resumed.load_state_dict(state)
    assert same_batches(collect(resumed), epoch0[stop_after:])
    assert same_batches(collect(resumed), epoch1)


def test_resume_refuses_other_settings(pool_path):
    state = make_stream(pool_path, num_workers=0).state_dict()
    with pytest.raises(ValueError, match=r"settings differ: tasks_per_batch: saved 4, now 2"):
        make_stream(pool_path, num_workers=2, tasks_per_batch=2).load_state_dict(state)


def test_the_worker_count_does_not_change_the_batches(pool_path):
    first = collect(make_stream(pool_path, num_workers=0))
    assert same_batches(first, collect(make_stream(pool_path, num_workers=3)))
    resumed = make_stream(pool_path, num_workers=0)
    resumed.load_state_dict({**make_stream(pool_path, num_workers=2).state_dict(), "batch": 4})
    assert same_batches(collect(resumed), first[4:])  # a resume may change data.workers


def test_the_ranks_of_a_meta_step_draw_distinct_tasks_from_the_whole_split(pool_path):
    ranks = [collect(make_stream(pool_path, rank=rank, world_size=3, episodes_per_epoch=200)) for rank in range(3)]
    keys = set(Pool(pool_path).keys("train"))
    for step in zip(*ranks):
        drawn = [key for batch in step for key in batch.keys]
        assert len(drawn) == len(set(drawn)) == 12  # 3 ranks x T=4 distinct tasks of 24
    for batches in ranks:
        assert {key for batch in batches for key in batch.keys} == keys  # every rank draws from every shard


@pytest.mark.parametrize("workers", [0, 4])
def test_any_number_of_ranks_and_workers_reads_a_pool_of_one_shard(tmp_path, workers):
    path = write_random_pool(tmp_path / "pool", random_tasks(12, 8), maxcount=100)
    assert len(Pool(path).shards("train")) == 1
    for rank in (0, 7):
        stream = make_stream(path, rank=rank, world_size=8, num_workers=workers, episodes_per_epoch=12)
        batches = collect(stream)
        assert len(batches) == 3 and all(len(batch.keys) == 4 for batch in batches)
    # 8 ranks x T=4 is more than the 9 train tasks: a step then draws with replacement


def test_short_tasks_are_left_out_before_the_first_batch(tmp_path, caplog):
    path = write_random_pool(tmp_path / "pool", random_tasks(20, [4 if i % 4 == 1 else 12 for i in range(20)]))
    short = {f"task{i:03d}" for i in range(20) if i % 4 == 1 and i % 5}
    with caplog.at_level(logging.INFO, logger="metagan_dist.data.stream"):
        stream = make_stream(path, episodes_per_epoch=80)
    assert "4 of 16 tasks have fewer than k+q=5 images and are left out" in caplog.text
    assert stream.skipped == {"short_tasks": 4, "corrupt": 0}
    keys = {key for batch in collect(stream) for key in batch.keys}
    assert keys == set(Pool(path).keys("train")) - short
    with pytest.raises(
        PoolError,
        match=r"task 'task0\d\d' in shard .*train-00000\d.tar: k=3 support \+ q=2 query "
        r"images is larger than the 4 images the task provides",
    ):
        make_stream(path, on_short_task="error")


def test_only_short_tasks_is_an_error_not_a_hang(tmp_path):
    path = write_random_pool(tmp_path / "pool", random_tasks(10, 4))
    with pytest.raises(PoolError, match=r"no usable task in split 'train' .*: 8 tasks have fewer than k\+q=5 images"):
        make_stream(path)


def test_split_without_tasks_fails_before_training(pool_path):
    with pytest.raises(PoolError, match=r"has no tasks in split 'val'"):
        make_stream(pool_path, split="val")


def test_missing_shard_fails_before_training_on_every_rank(pool_copy):
    (pool_copy / "train-000003.tar").unlink()
    for rank in range(2):  # both ranks check every shard's size
        with pytest.raises(PoolError, match=r"shard .*train-000003.tar listed in index.json is missing"):
            make_stream(pool_copy, rank=rank, world_size=2)


def test_each_shard_checksum_is_verified_by_one_rank(pool_copy):
    shard = pool_copy / "train-000002.tar"  # the third shard: rank 0 of 2 verifies it
    data = bytearray(shard.read_bytes())
    data[1500] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(PoolError, match=r"shard .*train-000002.tar fails its checksum"):
        make_stream(pool_copy, rank=0, world_size=2)
    make_stream(pool_copy, rank=1, world_size=2)  # rank 1 only learns of it when the ranks agree (drop_shards)


def test_damaged_shards_can_be_left_out_on_every_rank(pool_copy, caplog):
    shard = pool_copy / "train-000001.tar"
    shard.write_bytes(shard.read_bytes()[:2048])
    checksummed = pool_copy / "train-000002.tar"
    data = bytearray(checksummed.read_bytes())
    data[1500] ^= 0x01
    checksummed.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="metagan_dist.data.stream"):
        streams = [make_stream(pool_copy, skip_corrupt=True, rank=rank, world_size=2) for rank in range(2)]
    assert "leaving out a damaged shard" in caplog.text and "train-000001.tar is 2048 bytes" in caplog.text
    assert [sorted(stream.dropped) for stream in streams] == [["train-000001.tar", "train-000002.tar"],
                                                            ["train-000001.tar"]]
    for stream in streams:  # what train.py does once the ranks have shared their findings
        stream.drop_shards({**streams[0].dropped, **streams[1].dropped})
    assert streams[0].usable_digest() == streams[1].usable_digest()
    keys = {key for stream in streams for batch in collect(stream) for key in batch.keys}
    lost = {key for s in Pool(pool_copy).manifest.shards if s.file in streams[0].dropped for key in s.keys}
    assert keys and not keys & lost
    assert streams[1].skipped == {"short_tasks": 0, "corrupt": 2}


def test_shard_truncated_during_training(pool_copy):
    stream = make_stream(pool_copy)
    for shard in ("train-000000.tar", "train-000001.tar", "train-000002.tar"):
        path = pool_copy / shard
        path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(PoolError, match=r"shard .*train-00000[012].tar is unreadable or truncated"):
        collect(stream)


@pytest.mark.parametrize("skip_corrupt", [False, True])
def test_image_shape_differs_from_manifest(pool_copy, skip_corrupt):
    rewrite_manifest(pool_copy, image_shape=[1, 8, 9])
    message = r"holds images uint8 \[12, 1, 8, 8\]; the manifest index.json says uint8 \[N, 1, 8, 9\]"
    if skip_corrupt:  # every shard is damaged: an error, not an endless search for a usable task
        message = r"no usable task in split 'train' .*: 0 tasks have fewer than k\+q=5 images, 5 shards are damaged.*"
    with pytest.raises(PoolError, match=message):
        make_stream(pool_copy, skip_corrupt=skip_corrupt)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(episodes_per_epoch=42), r"episodes_per_epoch=42 must be a positive multiple of tasks_per_batch=4"),
        (dict(on_short_task="pad"), r"on_short_task must be one of \('skip', 'error'\), not 'pad'"),
        (dict(shots=0), r"shots=0, queries=2 and tasks_per_batch=4 must be >= 1"),
        (dict(rank=2, world_size=2), r"rank 2 is outside 0..1 \(world_size=2\)"),
        (dict(seed=-1), r"seed=-1 must be >= 0"),
    ],
)
def test_bad_settings(pool_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        make_stream(pool_path, **overrides)
