"""Style shifts of held-out tasks: the same characters drawn blurred, or bolder than the pool draws them.

`evaluate --shift` applies one to every image of the held-out tasks (shots, exam and reference sets
alike), so a meta-learned init is judged off the style it was meta-trained on: no meta-train image
is blurred, and bold adds a pixel on each side of the pool's own random stroke width. The feature
nets stay the ones trained on the unshifted meta-train tasks.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms.functional import gaussian_blur

BLUR_SIGMA = 1.0  # pixels
SHIFTS = ("none", "blur", "bold")


def shift_images(images: np.ndarray, shift: str) -> np.ndarray:
    """uint8 [N, C, H, W] images under `shift`: none; blur (Gaussian, σ = 1 px); bold (3×3 max filter: bright
    strokes on a dark background, as in the glyph pool, grow by a pixel on each side)."""
    if shift not in SHIFTS:
        raise ValueError(f"unknown shift {shift!r}: choose one of {', '.join(SHIFTS)}")
    if shift == "none":
        return images
    x = torch.from_numpy(images).float()
    x = gaussian_blur(x, kernel_size=7, sigma=BLUR_SIGMA) if shift == "blur" else F.max_pool2d(x, 3, 1, padding=1)
    return x.round().clamp(0, 255).to(torch.uint8).numpy()


def shift_tasks(tasks: dict[str, np.ndarray], shift: str) -> dict[str, np.ndarray]:
    """Every task's images under `shift` (see `shift_images`), keys and order kept."""
    return {key: shift_images(images, shift) for key, images in tasks.items()}
