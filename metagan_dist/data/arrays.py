"""Tasks from numpy arrays: uint8 images plus one task label per image."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from metagan_dist.data.images import to_pool_images
from metagan_dist.data.writer import Task, TaskSource, pick_test_keys, task_key


def channels_last(images: np.ndarray, where: str) -> np.ndarray:
    """uint8 images [N, H, W], [N, H, W, C] or [N, C, H, W] (C in 1, 3, 4) as [N, H, W] or [N, H, W, C]."""
    if images.dtype != np.uint8:
        raise ValueError(f"{where}: images must be uint8 (0..255), got {images.dtype}")
    if images.ndim == 3:
        return images
    if images.ndim == 4 and images.shape[-1] in (1, 3, 4):
        return images
    if images.ndim == 4 and images.shape[1] in (1, 3, 4):
        return images.transpose(0, 2, 3, 1)
    raise ValueError(
        f"{where}: images must be [N, H, W], [N, H, W, C] or [N, C, H, W] with C in 1, 3, 4; got {list(images.shape)}"
    )


def native_channels(images: np.ndarray) -> int:
    """1 for grayscale images [N, H, W] or [N, H, W, 1], else 3 (RGB, alpha dropped)."""
    return 1 if images.ndim == 3 or images.shape[-1] == 1 else 3


def array_source(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    channels: int | None = None,
    size: int = 32,
    test_fraction: float = 0.15,
    split_seed: int = 0,
    key_prefix: str = "class",
    names: list[str] | None = None,
    info: dict | None = None,
    where: str = "arrays",
) -> TaskSource:
    """One task per distinct label, keyed `<key_prefix>_<label>`, its images in order of appearance.

    `names[label]` (integer labels) gives readable task names; channels default to the images' own;
    `info` is added to the manifest's source description; `where` names the input in errors.
    """
    images = channels_last(images, where)
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) != len(images):
        raise ValueError(f"{where}: labels must be one per image ({len(images)}), got shape {list(labels.shape)}")
    channels = native_channels(images) if channels is None else channels
    groups = {label: np.flatnonzero(labels == label) for label in np.unique(labels)}
    keys = {label: task_key(f"{key_prefix}_{label}") for label in groups}
    if len(set(keys.values())) < len(keys):
        raise ValueError(f"{where}: distinct labels map to the same task key; use labels of [A-Za-z0-9_-] only")
    test = pick_test_keys(keys.values(), test_fraction, split_seed)

    def tasks() -> Iterator[Task]:
        for label, indices in groups.items():
            key = keys[label]
            name = names[int(label)] if names is not None else str(label)
            yield Task(key, to_pool_images(images[indices], channels, size), "test" if key in test else "train", name)

    description = {"kind": "arrays", "test_fraction": test_fraction, "split_seed": split_seed, **(info or {})}
    return TaskSource(tasks(), len(groups), (channels, size, size), description)


def load_array_files(images_path: str | Path, labels_path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels from two .npy files (no pickles)."""
    arrays = []
    for path in (Path(images_path), Path(labels_path)):
        if not path.is_file():
            raise FileNotFoundError(f"array file {path} does not exist")
        try:
            array = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as exn:
            raise ValueError(f"cannot read {path} as a .npy array: {exn}") from exn
        if not isinstance(array, np.ndarray):
            raise ValueError(f"{path} holds several arrays (.npz); save images and labels as two .npy files")
        arrays.append(array)
    return arrays[0], arrays[1]
