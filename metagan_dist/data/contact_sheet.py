"""A PNG contact sheet of a few tasks, one task per row, for a person to look at a pool."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def save_contact_sheet(tasks: dict[str, np.ndarray], path: Path, images_per_task: int = 12) -> Path:
    """Write one row per task (its first `images_per_task` images, uint8 [N, C, H, W]) as a PNG."""
    import torch
    from PIL import Image
    from torchvision.utils import make_grid

    rows = []
    for images in tasks.values():
        row = np.zeros((images_per_task, *images.shape[1:]), dtype=np.uint8)
        shown = images[:images_per_task]
        row[: len(shown)] = shown
        rows.append(row)
    grid = make_grid(torch.from_numpy(np.concatenate(rows)), nrow=images_per_task, padding=2, pad_value=96)
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path)
    return path
