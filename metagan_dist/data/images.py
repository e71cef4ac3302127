"""Bringing source images to a pool's format: uint8 [N, C, H, W] with C = 1 (grayscale) or 3 (RGB)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from PIL import Image

CHANNEL_MODES = {1: "L", 3: "RGB"}


def to_pool_images(images: Iterable[Image.Image | np.ndarray], channels: int, size: int) -> np.ndarray:
    """Convert PIL images or uint8 arrays ([H, W] or [H, W, C]) to uint8 [N, channels, size, size].

    Colour is converted with PIL (RGB -> L uses ITU-R 601 luma); images are resized with Lanczos
    when not already size x size (the aspect ratio is not kept). Unchanged images stay byte-exact.
    """
    if channels not in CHANNEL_MODES:
        raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), not {channels}")
    converted = []
    for image in images:
        if isinstance(image, np.ndarray):
            image = Image.fromarray(image.squeeze(-1) if image.ndim == 3 and image.shape[-1] == 1 else image)
        image = image.convert(CHANNEL_MODES[channels])
        if image.size != (size, size):
            image = image.resize((size, size), Image.Resampling.LANCZOS)
        array = np.asarray(image, dtype=np.uint8)
        converted.append(array[None] if array.ndim == 2 else array.transpose(2, 0, 1))
    if not converted:
        return np.zeros((0, channels, size, size), dtype=np.uint8)
    return np.stack(converted)
