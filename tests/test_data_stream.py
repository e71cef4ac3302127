"""TaskStream: batch contents, determinism, exact resume, rank/worker shares, and bad input."""

from __future__ import annotations

import json
import logging
import shutil
import signal
import socket
from contextlib import contextmanager
from datetime import timedelta
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
    with pytest.raises(
        ValueError, match=r"settings differ: num_workers: saved 0, now 2; tasks_per_batch: saved 4, now 2"
    ):
        make_stream(pool_path, num_workers=2, tasks_per_batch=2).load_state_dict(state)


def test_rank_shares_are_disjoint_and_cover_the_split(pool_path):
    seen = []
    for rank in range(2):
        stream = make_stream(pool_path, rank=rank, world_size=2, episodes_per_epoch=200, shuffle_buffer=4)
        seen.append({key for batch in collect(stream) for key in batch.keys})
        assert len(stream) == 50  # the same number of batches on every rank despite 3 vs 2 shards
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(Pool(pool_path).keys("train"))


def test_short_tasks_are_skipped_and_counted(tmp_path, caplog):
    path = write_random_pool(tmp_path / "pool", random_tasks(20, [4 if i % 4 == 1 else 12 for i in range(20)]))
    short = {f"task{i:03d}" for i in range(20) if i % 4 == 1 and i % 5}
    stream = make_stream(path, episodes_per_epoch=80)
    with caplog.at_level(logging.INFO, logger="metagan_dist.data.stream"):
        keys = {key for batch in collect(stream) for key in batch.keys}
    assert not keys & short
    assert "'short_tasks': 4" in caplog.text
    with pytest.raises(
        PoolError,
        match=r"task 'task0\d\d' in shard .*train-00000\d.tar: k=3 support \+ q=2 query "
        r"images is larger than the 4 images the task provides",
    ):
        collect(make_stream(path, on_short_task="error"))


def take(stream: TaskStream, count: int) -> list:
    iterator = iter(stream)
    with deadline(120):
        return [next(iterator) for _ in range(count)]


def test_skip_counts_survive_a_resume(tmp_path):
    path = write_random_pool(tmp_path / "pool", random_tasks(20, [4 if i % 4 == 1 else 12 for i in range(20)]))
    unbroken, interrupted, resumed = (make_stream(path, episodes_per_epoch=80) for _ in range(3))
    take(unbroken, 20)
    take(interrupted, 7)
    resumed.load_state_dict(interrupted.state_dict())
    take(resumed, 13)
    assert resumed.skipped == unbroken.skipped == {"short_tasks": 4, "corrupt": 0}


def test_only_short_tasks_is_an_error_not_a_hang(tmp_path):
    path = write_random_pool(tmp_path / "pool", random_tasks(10, 4))
    with pytest.raises(PoolError, match=r"no usable task in shards .*: 8 tasks have fewer than k\+q=5 images"):
        collect(make_stream(path))


def test_split_without_tasks_fails_before_training(pool_path):
    with pytest.raises(PoolError, match=r"has no tasks in split 'val'"):
        make_stream(pool_path, split="val")


def test_too_few_shards_for_ranks_and_workers(pool_path):
    with pytest.raises(PoolError, match=r"split 'test' of pool .* has 2 shards; 2 ranks x 2 workers need at least 4"):
        make_stream(pool_path, split="test", world_size=2, num_workers=2)


def test_missing_shard_fails_before_training_on_every_rank(pool_copy):
    (pool_copy / "train-000003.tar").unlink()
    for rank in range(2):  # shard 3 belongs to rank 1, yet both ranks refuse
        with pytest.raises(PoolError, match=r"shard .*train-000003.tar listed in index.json is missing"):
            make_stream(pool_copy, rank=rank, world_size=2)


def test_checksum_mismatch_fails_before_training(pool_copy):
    shard = pool_copy / "train-000002.tar"
    data = bytearray(shard.read_bytes())
    data[1500] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(PoolError, match=r"shard .*train-000002.tar fails its checksum"):
        make_stream(pool_copy)


def test_corrupt_shards_can_be_skipped_with_a_logged_count(pool_copy, caplog):
    shard = pool_copy / "train-000001.tar"
    shard.write_bytes(shard.read_bytes()[:2048])
    with caplog.at_level(logging.WARNING, logger="metagan_dist.data.stream"):
        stream = make_stream(pool_copy, skip_corrupt=True)
    assert "skipping corrupt shard" in caplog.text and "train-000001.tar is 2048 bytes" in caplog.text
    keys = {key for batch in collect(stream) for key in batch.keys}
    lost = set(next(s.keys for s in Pool(pool_copy).manifest.shards if s.file == "train-000001.tar"))
    assert keys and not keys & lost
    assert stream.state_dict()["skipped"]["corrupt"] == 1


def test_shard_truncated_during_training(pool_copy):
    stream = make_stream(pool_copy)
    shard = pool_copy / "train-000000.tar"
    shard.write_bytes(shard.read_bytes()[:5000])
    with pytest.raises(PoolError, match=r"shard .*train-000000.tar is unreadable or truncated"):
        collect(stream)


@pytest.mark.parametrize("skip_corrupt", [False, True])
def test_image_shape_differs_from_manifest(pool_copy, skip_corrupt):
    rewrite_manifest(pool_copy, image_shape=[1, 8, 9])
    message = r"holds images uint8 \[12, 1, 8, 8\]; the manifest index.json says uint8 \[N, 1, 8, 9\]"
    if skip_corrupt:  # every task is corrupt: an error, not an endless search for a usable one
        message = r"no usable task in shards .*" + message
    with pytest.raises(PoolError, match=message):
        collect(make_stream(pool_copy, skip_corrupt=skip_corrupt))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(episodes_per_epoch=42), r"episodes_per_epoch=42 must be a positive multiple of tasks_per_batch=4"),
        (dict(on_short_task="pad"), r"on_short_task must be one of \('skip', 'error'\), not 'pad'"),
        (dict(shots=0), r"shots=0, queries=2 and tasks_per_batch=4 must be >= 1"),
        (dict(rank=2, world_size=2), r"rank 2 is outside 0..1 \(world_size=2\)"),
    ],
)
def test_bad_settings(pool_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        make_stream(pool_path, **overrides)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _distributed_rank(rank: int, port: int, pool: str, out: str) -> None:
    """One of two gloo ranks: stream an epoch in lockstep (an all_reduce per batch), record keys per worker."""
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2, timeout=timedelta(seconds=60)
    )
    stream = make_stream(pool, rank=rank, world_size=2, num_workers=2, episodes_per_epoch=160, shuffle_buffer=4)
    per_worker: dict[int, set[str]] = {0: set(), 1: set()}
    steps = 0.0
    for batch in stream:
        per_worker[batch.index % 2].update(batch.keys)
        ranks_at_this_step = torch.ones(1)
        torch.distributed.all_reduce(ranks_at_this_step)
        steps += ranks_at_this_step.item()
    gathered = [None, None]
    torch.distributed.all_gather_object(gathered, {w: sorted(keys) for w, keys in per_worker.items()})
    if rank == 0:
        Path(out).write_text(json.dumps({"shares": gathered, "steps": steps}))
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_with_two_workers_each_read_disjoint_shares(pool_path, tmp_path):
    out = tmp_path / "shares.json"
    context = torch.multiprocessing.start_processes(
        _distributed_rank, args=(_free_port(), str(pool_path), str(out)), nprocs=2, join=False, start_method="spawn"
    )
    deadline_s, waited = 180, 0
    while not context.join(timeout=5):
        waited += 5
        if waited >= deadline_s:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the two ranks did not finish within {deadline_s} s")
    result = json.loads(out.read_text())
    shares = [set(keys) for rank in result["shares"] for keys in rank.values()]
    assert all(shares) and sum(map(len, shares)) == len(set().union(*shares))  # four disjoint, non-empty shares
    assert set().union(*shares) == set(Pool(pool_path).keys("train"))
    assert result["steps"] == 2 * 40  # 40 batches on each rank, summed over both: no rank ran short
