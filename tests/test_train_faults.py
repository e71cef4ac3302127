"""Faults on ONE rank of a 2-rank torchrun job: every rank ends alike (same line, same status), nothing hangs.

Faults come from tests/faults/sitecustomize.py (or from damaging the pool's files).
"""

import json
import re
import shutil
import signal
import time

import pytest
import torch

from train_utils import (
    fault_env, finish, latest_step, make_tiny_pool, meta_parameters, send, tiny_run_args, torchrun,
    wait_for_checkpoint, worker_pid,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    return make_tiny_pool(tmp_path_factory.mktemp("pool") / "tiny")


def rank_errors(output: str) -> list[str]:
    """The `error: ...` lines the ranks printed (one may follow rank 0's progress bar on the same line:
    torchrun merges the ranks' output, and a progress bar ends without a newline)."""
    return re.findall(r"(?<![A-Za-z])error: [^\n\r]*", output)


def no_rank_traceback(output: str) -> bool:
    """No traceback through launch/train.py (torchrun's agent prints its own for failed workers)."""
    return 'launch/train.py", line' not in output


def worker_exit_codes(output: str) -> dict[int, int]:
    """{rank: exit code} of the failed workers, from torchrun's failure report."""
    ranks = [int(r) for r in re.findall(r"rank\s*:\s*(\d+) \(local_rank", output)]
    codes = [int(c) for c in re.findall(r"exitcode\s*:\s*(-?\d+)", output)]
    return dict(zip(ranks, codes))


def flip_a_byte(path) -> None:
    data = bytearray(path.read_bytes())
    data[1500] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("fault", ["checksum", "permission"])
def test_a_set_up_error_on_one_rank_ends_every_rank_with_the_same_line(pool, tmp_path, fault):
    env = None
    if fault == "checksum":  # shard 1 of the train split: only rank 1 of 2 verifies its sha256
        damaged = shutil.copytree(pool, tmp_path / "pool")
        flip_a_byte(damaged / "train-000001.tar")
        expected = f"error: rank 1 failed to set up: shard {damaged / 'train-000001.tar'} fails its checksum"
        args = tiny_run_args(damaged, tmp_path / "run", 4)
    else:  # an OSError, not a ValueError
        env = fault_env(set_up_error={"rank": 1, "type": "PermissionError", "message": "shard x.tar: permission denied"})
        expected = "error: rank 1 failed to set up: shard x.tar: permission denied"
        args = tiny_run_args(pool, tmp_path / "run", 4)
    code, output = finish(torchrun(args, env=env), timeout=300)
    assert code != 0
    errors = rank_errors(output)
    assert len(errors) == 2 and errors[0] == errors[1] and errors[0].startswith(expected), output[-3000:]
    assert worker_exit_codes(output) == {0: 2, 1: 2}, output[-3000:]
    assert no_rank_traceback(output)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_shard_that_breaks_mid_run_ends_every_rank_with_the_same_line(pool, tmp_path):
    damaged = shutil.copytree(pool, tmp_path / "pool")
    out = tmp_path / "run"
    process = torchrun(tiny_run_args(damaged, out, 100_000, **{"run.checkpoint_every": 2}))
    wait_for_checkpoint(out, 2, process)
    for shard in damaged.glob("train-*.tar"):
        shard.write_bytes(shard.read_bytes()[:600])
    code, output = finish(process, timeout=300)
    errors = rank_errors(output)
    assert len(errors) == 2 and errors[0] == errors[1], output[-3000:]
    assert re.match(r"error: rank \d failed a meta-step: shard .*train-\d+.tar is unreadable or truncated", errors[0])
    assert set(worker_exit_codes(output).values()) == {2}, output[-3000:]
    assert latest_step(out) >= 2 and meta_parameters(out)  # LATEST still names a complete checkpoint


def test_a_non_finite_step_on_one_rank_is_skipped_by_every_rank(pool, tmp_path):
    out = tmp_path / "run"
    env = fault_env(nan_grads={"rank": 1, "from_step": 2, "to_step": 2})
    code, output = finish(torchrun(tiny_run_args(pool, out, 4), env=env), timeout=300)
    assert code == 0, output[-3000:]
    assert "step 2 skipped on every rank" in output
    assert "meta-parameters identical on 2 rank(s)" in output
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["skipped_steps"] for line in lines] == [0, 1, 1, 1]


def test_non_finite_steps_on_one_rank_stop_every_rank_with_the_same_line(pool, tmp_path):
    out = tmp_path / "run"
    env = fault_env(nan_grads={"rank": 1, "from_step": 3, "to_step": None})
    args = tiny_run_args(pool, out, 50, **{"run.checkpoint_every": 1, "run.max_skipped_steps": 1})
    code, output = finish(torchrun(args, env=env), timeout=300)
    errors = rank_errors(output)
    assert len(errors) == 2 and errors[0] == errors[1], output[-3000:]
    assert errors[0].startswith("error: 2 consecutive meta-steps had non-finite meta-gradients or losses")
    assert worker_exit_codes(output) == {0: 1, 1: 1}, output[-3000:]
    assert latest_step(out) == 3 and all(torch.isfinite(v).all() for v in meta_parameters(out).values())


def test_a_stop_signal_to_one_rank_during_set_up_ends_every_rank_cleanly(pool, tmp_path):
    out, marker = tmp_path / "run", tmp_path / "rank-1-in-set-up"
    env = fault_env(slow_set_up={"rank": 1, "seconds": 6, "marker": str(marker)})
    process = torchrun(tiny_run_args(pool, out, 100), env=env)
    deadline = time.monotonic() + 180
    while not marker.exists():
        assert process.poll() is None and time.monotonic() < deadline, process.stdout.read()[-3000:]
        time.sleep(0.1)
    send(worker_pid(process.pid, rank=1), signal.SIGTERM)
    code, output = finish(process, timeout=300)
    assert code == 0, output[-3000:]
    assert "stopped by a signal during set-up (SIGTERM on rank 1), before any meta-step" in output
    assert no_rank_traceback(output) and latest_step(out) == 0
