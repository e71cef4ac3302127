"""A tiny task pool and tiny meta-trained checkpoints, for end-to-end tests of the adapt and evaluate commands."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from metagan_dist.data import write_pool
from metagan_dist.data.arrays import array_source

REPO = Path(__file__).resolve().parents[1]
IMAGE_SHAPE = (1, 32, 32)  # the smallest size the metrics' feature net takes
Z_DIM = 8
SHOTS = 3


def write_tiny_pool(out: Path, tasks: int = 8, images: int = 12, size: int = 32) -> Path:
    """`tasks` tasks (2 of 8 meta-test) of `images` grey images each: task c is a bright square in cell c, jittered."""
    rng = np.random.default_rng(0)
    cell = size // 4
    pictures = rng.integers(0, 60, (tasks * images, size, size)).astype(np.uint8)
    labels = np.repeat(np.arange(tasks), images)
    for picture, label in zip(pictures, labels):
        top, left = (label // 4) * cell + rng.integers(0, 3), (label % 4) * cell + rng.integers(0, 3)
        picture[top : top + cell - 2, left : left + cell - 2] = 230
    write_pool(array_source(pictures, labels, size=size, test_fraction=0.25), out, command="test")
    return out


def train_tiny_run(pool: Path, out: Path, *overrides: str) -> Path:
    """Meta-train an MLP pair of width 16 for 2 steps on `pool` with launch/train.py; returns the run folder."""
    command = [
        sys.executable, str(REPO / "launch" / "train.py"), f"data.pool={pool}", "model.arch=mlp", "model.width=16",
        f"model.z_dim={Z_DIM}", f"data.shots={SHOTS}", "data.queries=3", "data.tasks_per_rank=2", "data.workers=0",
        "data.sample_tasks=1", "run.threads=1", "run.steps=2", "run.device=cpu", f"run.out_dir={out}",
        "meta.inner_steps=2", "meta.inner_lr=0.05", *overrides,
    ]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"launch/train.py failed:\n{done.stderr[-3000:]}"
    return out
