"""The k shots of a new task, from a folder of image files or a pool task, checked against the model's image shape."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from metagan_dist.data import Pool
from metagan_dist.data.images import to_pool_images


@dataclass
class Shots:
    """k uint8 images [k, C, H, W] in the model's shape, where they came from, and what was done to them."""

    images: np.ndarray
    sources: list[str]
    notes: list[str] = field(default_factory=list)


def shots_from_folder(folder: str | Path, shots: int, image_shape: tuple[int, int, int], resize: bool) -> Shots:
    """The first `shots` readable images of `folder` in name order (files PIL cannot read are skipped and noted).

    Images of another size or channel count than image_shape (C, H, W) are an error naming the file,
    unless `resize`: then they are converted and resized (Lanczos) and a note says so.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    usable, skipped = [], []
    for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        if len(usable) == shots:
            break
        try:
            with Image.open(path) as image:
                image.load()
                usable.append((path, image))
        except (UnidentifiedImageError, OSError):
            skipped.append(path.name)
    notes = [f"skipped {len(skipped)} unreadable file(s) in {folder}: {', '.join(skipped[:5])}"] if skipped else []
    if len(usable) < shots:
        raise ValueError(
            f"image folder {folder} holds {len(usable)} usable image(s), fewer than the {shots} shots asked for"
            + (f" ({notes[0]})" if notes else "")
        )
    channels, height, width = image_shape
    mismatched = [(path, _shape_of(image)) for path, image in usable if _shape_of(image) != image_shape]
    if mismatched and not resize:
        path, shape = mismatched[0]
        raise ValueError(
            f"image {path} is {_describe(shape)} but the checkpoint's model makes {_describe(image_shape)} images"
            f" ({len(mismatched)} of the {shots} shots differ); pass --resize to convert and resize them"
        )
    if mismatched:
        notes.append(
            f"resized/converted {len(mismatched)} of {shots} image(s) to {_describe(image_shape)} "
            f"(first: {mismatched[0][0].name}, {_describe(mismatched[0][1])})"
        )
    images = to_pool_images((image for _, image in usable), channels, height)
    return Shots(images, [str(path) for path, _ in usable], notes)


def shots_from_pool(
    pool: Pool, split: str, key: str, shots: int, image_shape: tuple[int, int, int], resize: bool
) -> Shots:
    """The first `shots` images of task `key` in a pool's split, in the model's image shape.

    A pool of another image shape is an error unless `resize` (then converted and resized, noted).
    """
    pool_shape = tuple(pool.image_shape)
    if pool_shape != tuple(image_shape) and not resize:
        raise ValueError(
            f"pool {pool.path} holds {_describe(pool_shape)} images but the checkpoint's model makes "
            f"{_describe(image_shape)} images; pass --resize to convert and resize them"
        )
    images = pool.load_tasks(split, [key])[key]
    if len(images) < shots:
        raise ValueError(f"task {key!r} of pool {pool.path} has {len(images)} images, fewer than the {shots} shots asked for")
    images, notes = images[:shots], []
    if pool_shape != tuple(image_shape):
        images = to_pool_images(list(images.transpose(0, 2, 3, 1)), image_shape[0], image_shape[1])
        notes.append(f"resized/converted {shots} image(s) from {_describe(pool_shape)} to {_describe(image_shape)}")
    return Shots(images, [f"{pool.path}:{split}/{key}#{i}" for i in range(shots)], notes)


def _shape_of(image: Image.Image) -> tuple[int, int, int]:
    return len(image.getbands()), image.height, image.width


def _describe(shape: tuple[int, int, int]) -> str:
    channels, height, width = shape
    return f"{height}x{width} with {channels} channel(s)"
