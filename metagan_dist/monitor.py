"""What a user sees of a run: rank 0's progress bar, metrics.jsonl, TensorBoard scalars and sample grids.

Every rank logs warnings through `logging`, prefixed with its rank; only rank 0 writes files.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from metagan_dist.checkpoint import write_text_atomic

logger = logging.getLogger("metagan_dist")


def setup_logging(rank: int) -> None:
    """Log lines carry the rank; rank 0 logs INFO, the others only warnings and errors."""
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )


def keep_metrics_up_to(path: Path, step: int) -> None:
    """Drop the lines of steps after `step` from metrics.jsonl (atomically).

    A run that resumes from the checkpoint of `step` logged the steps after it before it stopped or
    crashed; it logs them again now, so each step would appear twice. A torn last line goes too.
    """
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if (logged := _step_of(line)) is not None and logged <= step]
    if len(kept) != len(lines):
        write_text_atomic(path, "".join(kept))


def _step_of(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


class GradientLog:
    """The outer steps between two metrics lines: the meta-gradient norm before clipping (the latest
    and the largest, so that a spike between two log lines still shows), how often clipping acted,
    and the latest learning rate."""

    def __init__(self, clipped_steps: int = 0):
        self.clipped_steps = clipped_steps  # over the whole run (kept in checkpoints)
        self.norms: list[float] = []
        self.clipped = 0
        self.lr: float | None = None

    def record(self, norm: float | None, clipped: bool, lr: float | None) -> None:
        """One meta-step's outcome (norm and lr are None for a skipped step)."""
        if norm is not None:
            self.norms.append(norm)
        self.clipped += clipped
        self.clipped_steps += clipped
        self.lr = self.lr if lr is None else lr

    def values(self) -> dict[str, float]:
        """meta_grad_norm, meta_grad_norm_max, clipped_fraction (of this window's applied steps),
        clipped_steps (whole run) and lr; starts a new window."""
        values: dict[str, float] = {"clipped_steps": self.clipped_steps}
        if self.lr is not None:
            values["lr"] = self.lr
        if self.norms:
            values.update(meta_grad_norm=self.norms[-1], meta_grad_norm_max=max(self.norms),
                          clipped_fraction=self.clipped / len(self.norms))
        self.norms, self.clipped = [], 0
        return values


class Monitor:
    """Rank 0's outputs of a run; on other ranks every method does nothing."""

    def __init__(self, out_dir: Path, total_steps: int, start_step: int, enabled: bool):
        self.out_dir, self.enabled = out_dir, enabled
        self.bar = self.metrics = self.tensorboard = None
        if not enabled:
            return
        from tqdm import tqdm

        keep_metrics_up_to(out_dir / "metrics.jsonl", start_step)
        self.metrics = open(out_dir / "metrics.jsonl", "a")
        self.bar = tqdm(total=total_steps, initial=start_step, desc="meta-train", unit="step", dynamic_ncols=True)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(out_dir / "tensorboard"), purge_step=start_step + 1)
        except ImportError:
            logger.warning("tensorboard is not installed: no TensorBoard event files for this run")

    def advance(self, step: int, tasks_per_s: float, loss_g: float, loss_d: float) -> None:
        """Move the progress bar to `step`, showing throughput and the latest query losses."""
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(tasks_s=f"{tasks_per_s:.1f}", L_G=f"{loss_g:.3f}", L_D=f"{loss_d:.3f}", refresh=False)

    def log(self, step: int, values: dict[str, float]) -> None:
        """Append one line to metrics.jsonl and write the values as TensorBoard scalars."""
        if not self.enabled:
            return
        clean = {k: (v if math.isfinite(v) else str(v)) for k, v in values.items()}
        self.metrics.write(json.dumps({"step": step, **clean}) + "\n")
        self.metrics.flush()
        if self.tensorboard is not None:
            for key, value in values.items():
                self.tensorboard.add_scalar(key, value, step)

    def write(self, message: str) -> None:
        """Print a line without breaking the progress bar."""
        if self.bar is not None:
            self.bar.write(message)
        elif self.enabled:
            print(message, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        self.bar.close()
        self.metrics.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
