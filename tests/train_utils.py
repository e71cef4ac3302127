"""Helpers for end-to-end training tests: a tiny pool and launch/train.py in subprocesses (tests only)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import torch

from metagan_dist.checkpoint import CheckpointStore
from metagan_dist.data import write_pool
from metagan_dist.data.arrays import array_source

REPO = Path(__file__).resolve().parents[1]
TRAIN = str(REPO / "launch" / "train.py")
FAULTS = Path(__file__).resolve().parent / "faults"  # sitecustomize.py: fault injection into launch/train.py


def fault_env(**faults: object) -> dict[str, str]:
    """Environment additions that make launch/train.py (in any process) inject `faults`; see tests/faults."""
    path = os.pathsep.join(p for p in (str(FAULTS), os.environ.get("PYTHONPATH")) if p)
    return {"PYTHONPATH": path, "METAGAN_TEST_FAULTS": json.dumps(faults)}


def make_tiny_pool(folder: Path, test_fraction: float = 0.2, shard_tasks: int = 2) -> Path:
    """40 tasks x 12 images of 1x8x8 (each task a noisy blob at its own place), 2 tasks per shard."""
    rng = np.random.default_rng(0)
    images, labels = [], []
    for task in range(40):
        centre = rng.integers(2, 6, size=2)
        yy, xx = np.mgrid[:8, :8]
        blob = np.exp(-((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2) / 3.0)
        for _ in range(12):
            images.append((255 * np.clip(blob + 0.1 * rng.random((8, 8)), 0, 1)).astype(np.uint8))
            labels.append(task)
    source = array_source(np.stack(images), np.array(labels), size=8, test_fraction=test_fraction)
    write_pool(source, folder, command="tests: make_tiny_pool", maxcount=shard_tasks)
    return folder


SQUARES_SHAPE = (1, 32, 32)  # the smallest images the evaluation's feature net takes
SHOTS, Z_DIM = 3, 8  # of tiny runs


def make_square_pool(out: Path, tasks: int = 8, images: int = 12, size: int = SQUARES_SHAPE[1]) -> Path:
    """`tasks` tasks (a quarter meta-test) of grey images: task c is a bright square in cell c, jittered."""
    rng = np.random.default_rng(0)
    cell = size // 4
    pictures = rng.integers(0, 60, (tasks * images, size, size)).astype(np.uint8)
    labels = np.repeat(np.arange(tasks), images)
    for picture, label in zip(pictures, labels):
        top, left = (label // 4) * cell + rng.integers(0, 3), (label % 4) * cell + rng.integers(0, 3)
        picture[top : top + cell - 2, left : left + cell - 2] = 230
    write_pool(array_source(pictures, labels, size=size, test_fraction=0.25), out, command="tests: make_square_pool")
    return out


def tiny_run_args(pool: Path, out_dir: Path, steps: int, **overrides: object) -> list[str]:
    """key=value overrides for a fast run on a tiny pool (MAML with inner SGD unless overridden)."""
    values = {
        "data.pool": pool, "model.arch": "mlp", "model.width": 16, "model.z_dim": Z_DIM, "data.shots": SHOTS,
        "data.queries": 3, "data.tasks_per_rank": 2, "data.workers": 0, "data.batches_per_epoch": 4,
        "data.sample_tasks": 2, "run.threads": 1, "run.steps": steps, "run.out_dir": out_dir, "run.log_every": 1,
        "run.sample_every": 1000, "run.checkpoint_every": 1000, "run.select_tasks": 0, "run.device": "cpu",
        "meta.algorithm": "maml", "meta.inner_rule": "sgd", "meta.inner_steps": 2, "meta.inner_lr": 0.05,
    }
    values.update(overrides)
    return [f"{key}={value}" for key, value in values.items()]


def train(args: list[str], timeout: float = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """One process: python launch/train.py ARGS (with `env` added to the environment)."""
    return subprocess.run([sys.executable, TRAIN, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env={**os.environ, **(env or {})})


def train_tiny_run(pool: Path, out: Path, *overrides: str, steps: int = 2) -> Path:
    """Meta-train for `steps` steps on `pool` into `out` (extra key=value overrides win); returns `out`."""
    extra = dict(o.split("=", 1) for o in overrides)
    done = train(tiny_run_args(pool, out, steps, **{"data.sample_tasks": 1, **extra}))
    assert done.returncode == 0, f"launch/train.py failed:\n{done.stderr[-3000:]}"
    return out


def torchrun(args: list[str], nproc: int = 2, extra: tuple[str, ...] = (),
             env: dict[str, str] | None = None) -> subprocess.Popen:
    """torchrun --standalone --nproc_per_node=N launch/train.py ARGS, started in the background."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               *extra, TRAIN, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    # Its own process group, so that finish() can stop the agent and every worker together.
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=env,
                            start_new_session=True)


def finish(process: subprocess.Popen, timeout: float = 600) -> tuple[int, str]:
    """Wait for a torchrun job; on timeout kill it with every worker and fail with its output."""
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(process.pid)
        output, _ = process.communicate(timeout=60)
        raise AssertionError(f"timed out after {timeout} s; output:\n{output[-4000:]}")
    finally:
        try:  # anything left in the agent's process group
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return process.returncode, output


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants.

    torchrun starts each worker in a session of its own, so killing the agent's process group misses
    them, and they would keep the agent's stdout pipe open (and a core busy) after it died.
    """
    try:
        root = psutil.Process(pid)
        family = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for member in family:
        try:
            member.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(family, timeout=30)


def latest_step(out_dir: Path) -> int:
    """The step of the run's newest complete checkpoint; 0 before its first."""
    folder = CheckpointStore(out_dir, keep=0).latest()
    return CheckpointStore.step_of(folder) if folder else 0


def wait_for_checkpoint(out_dir: Path, step: int, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while latest_step(out_dir) < step:
        if process.poll() is not None:
            raise AssertionError(f"training ended (code {process.returncode}) before checkpoint {step}:\n"
                                 f"{process.stdout.read()[-4000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no checkpoint at step {step} after {timeout} s")
        time.sleep(0.2)


def worker_pid(agent_pid: int, rank: int) -> int:
    """PID of the torchrun worker with RANK=rank among the agent's children."""
    children = Path(f"/proc/{agent_pid}/task/{agent_pid}/children").read_text().split()
    for pid in children:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in environ:
            return int(pid)
    raise AssertionError(f"no worker with RANK={rank} among {children}")


def send(pid: int, sig: signal.Signals) -> None:
    os.kill(pid, sig)


def meta_parameters(out_dir: Path) -> dict[str, torch.Tensor]:
    """The latest checkpoint's meta-parameters, whichever engine wrote them."""
    from metagan_dist.checkpoint import resolve_checkpoint
    from metagan_dist.engine import load_meta_parameters

    return load_meta_parameters(resolve_checkpoint(out_dir)).state_dict()
