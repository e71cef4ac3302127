"""Checkpoints that survive crashes: one folder per step, published by an atomic rename.

    out_dir/checkpoints/step-00000200/   trainer.pt (+ the engine's files)
    out_dir/checkpoints/LATEST           "step-00000200"
    out_dir/checkpoints/BEST             {"checkpoint": "step-00000100", "step": 100, "score": 0.66}

A checkpoint is written into `step-N.tmp/`, every file flushed and fsynced, then the folder is
renamed and LATEST replaced atomically; a crash at any point leaves LATEST naming a complete
checkpoint. Only the last `keep` checkpoints are kept, and the one BEST names (run.select_tasks).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT_VERSION = 3
# Formats whose meta-parameters, config and image shape adapt.py and evaluate.py can still read.
# Resuming needs CHECKPOINT_VERSION itself: version 2 changed the task stream's state (tasks are
# assigned, not shards), the optimizer (AdamW, not Adam with L2) and added the LR scheduler's state;
# version 3 stores nn.Linear weights transposed in the flat vectors (FlatLayout), so the flat
# meta-parameters of versions 1 and 2 are converted when read (see TRANSPOSED_LINEAR_SINCE).
READABLE_VERSIONS = (1, 2, 3)
TRANSPOSED_LINEAR_SINCE = 3


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_file_atomic(obj: Any, path: Path) -> None:
    """torch.save to a temporary file of its own beside `path`, fsync, then rename over it: readers, and
    writers racing for the same cache, never see half a file; a failed save leaves `path` as it was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def fingerprint(arrays: Sequence[np.ndarray], settings: dict[str, Any]) -> str:
    """SHA-256 over arrays (dtype, shape, bytes) and JSON settings: the identity of a cache trained on them,
    so a cache is reused only for exactly the data and settings it was trained with."""
    digest = hashlib.sha256()
    for array in arrays:
        array = np.asarray(array)
        digest.update(json.dumps([array.dtype.str, array.shape]).encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    digest.update(json.dumps(settings, sort_keys=True).encode())
    return digest.hexdigest()


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_tree(folder: Path) -> None:
    for file in folder.rglob("*"):
        if file.is_file():
            with open(file, "rb+") as f:
                os.fsync(f.fileno())
    _fsync_dir(folder)


class CheckpointStore:
    """The checkpoints of one run folder."""

    def __init__(self, out_dir: str | Path, keep: int):
        self.dir = Path(out_dir) / "checkpoints"
        self.keep = keep

    @staticmethod
    def tag(step: int) -> str:
        return f"step-{step:08d}"

    @staticmethod
    def step_of(folder: Path) -> int:
        """The step a checkpoint folder was written at, read from its name (the inverse of `tag`)."""
        return int(folder.name.removeprefix("step-"))

    def staging(self, step: int) -> Path:
        """The folder a checkpoint of `step` is written into before it is published."""
        return self.dir / f"{self.tag(step)}.tmp"

    def begin(self, step: int) -> Path:
        """Create an empty staging folder for `step` (rank 0, before any rank writes into it)."""
        staging = self.staging(step)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        return staging

    def publish(self, step: int) -> Path:
        """Make the staged checkpoint of `step` the latest (rank 0, after every rank finished writing)."""
        staging, final = self.staging(step), self.dir / self.tag(step)
        _fsync_tree(staging)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        _fsync_dir(self.dir)
        write_text_atomic(self.dir / "LATEST", self.tag(step))
        self._prune()
        return final

    def latest(self) -> Path | None:
        """The newest complete checkpoint folder, or None if the run has none yet."""
        pointer = self.dir / "LATEST"
        if not pointer.exists():
            return None
        folder = self.dir / pointer.read_text().strip()
        if not (folder / "trainer.pt").is_file():
            raise FileNotFoundError(f"{pointer} names {folder}, which holds no trainer.pt: the run folder is damaged")
        return folder

    def mark_best(self, step: int, score: float) -> None:
        """Name the published checkpoint of `step` the best so far, with its selection score (rank 0)."""
        if not (self.dir / self.tag(step) / "trainer.pt").is_file():
            raise FileNotFoundError(f"no published checkpoint of step {step} in {self.dir} to mark as the best")
        write_text_atomic(self.dir / "BEST", json.dumps({"checkpoint": self.tag(step), "step": step, "score": score}))

    def best(self) -> tuple[Path, float] | None:
        """The checkpoint folder BEST names and its score, or None if the run has scored none."""
        pointer = self.dir / "BEST"
        if not pointer.exists():
            return None
        try:
            record = json.loads(pointer.read_text())
            folder, score = self.dir / record["checkpoint"], float(record["score"])
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{pointer} is damaged ({err}): delete it, and the next scored checkpoint "
                             f"writes it anew") from None
        if not (folder / "trainer.pt").is_file():
            raise FileNotFoundError(f"{pointer} names {folder}, which holds no trainer.pt: the run folder is damaged")
        return folder, score

    def _prune(self) -> None:
        best = self.best()
        done = sorted(p for p in self.dir.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))
        for old in done[: -self.keep]:
            if best is None or old != best[0]:
                shutil.rmtree(old, ignore_errors=True)


def load_trainer_state(folder: Path, resume: bool = False) -> dict[str, Any]:
    """The trainer state of a checkpoint folder, with a clear error for a format this code cannot use.

    resume=True (training) accepts only CHECKPOINT_VERSION; otherwise (adapt, evaluate) any of
    READABLE_VERSIONS.
    """
    path = folder / "trainer.pt"
    state = torch.load(path, map_location="cpu", weights_only=False)
    version = state.get("version")
    if resume and version in READABLE_VERSIONS and version != CHECKPOINT_VERSION:
        raise ValueError(f"{path} has checkpoint format version {version}, written by an older metagan_dist; "
                         f"training resumes only version {CHECKPOINT_VERSION}: train into a new run.out_dir "
                         f"(adapt.py and evaluate.py still read this checkpoint)")
    if version not in READABLE_VERSIONS:
        raise ValueError(f"{path} has checkpoint format version {version}; this code reads version {CHECKPOINT_VERSION}")
    return state


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder from either a run folder (its best checkpoint if it scored any, else its latest)
    or a checkpoint folder."""
    path = Path(path)
    if (path / "trainer.pt").is_file():
        return path
    if (path / "checkpoints").is_dir():
        store = CheckpointStore(path, keep=1)
        best = store.best()
        chosen = best[0] if best is not None else store.latest()
        if chosen is not None:
            return chosen
    raise FileNotFoundError(f"{path} is neither a checkpoint folder (with trainer.pt) nor a run folder with checkpoints")
