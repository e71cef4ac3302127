"""What a user sees of a run: rank 0's progress bar, metrics.jsonl, TensorBoard scalars and sample grids.

Every rank logs warnings through `logging`, prefixed with its rank; only rank 0 writes files.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

logger = logging.getLogger("metagan_dist")


def setup_logging(rank: int) -> None:
    """Log lines carry the rank; rank 0 logs INFO, the others only warnings and errors."""
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )


class Monitor:
    """Rank 0's outputs of a run; on other ranks every method does nothing."""

    def __init__(self, out_dir: Path, total_steps: int, start_step: int, enabled: bool):
        self.out_dir, self.enabled = out_dir, enabled
        self.bar = self.metrics = self.tensorboard = None
        if not enabled:
            return
        from tqdm import tqdm

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
