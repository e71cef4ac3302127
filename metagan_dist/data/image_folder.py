"""Tasks from an image folder: one sub-folder per task holding its png/jpg/bmp images."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from metagan_dist.data.images import to_pool_images
from metagan_dist.data.writer import Task, TaskSource, pick_test_keys, task_key

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


def image_folder_source(
    root: str | Path, *, channels: int = 1, size: int = 32, test_fraction: float = 0.15, split_seed: int = 0
) -> TaskSource:
    """Tasks from root/<task>/<image>: every image resized to size x size with `channels` channels.

    Sub-folders without images are left out (and reported); task keys are the folder names with
    characters outside [A-Za-z0-9_-] replaced; a seeded `test_fraction` of tasks forms meta-test.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    folders: dict[str, tuple[Path, list[Path]]] = {}
    empty = []
    for folder in sorted(path for path in root.iterdir() if path.is_dir()):
        files = sorted(path for path in folder.iterdir() if path.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            empty.append(folder.name)
            continue
        key = task_key(folder.name)
        if key in folders:
            raise ValueError(f"task folders {folders[key][0]} and {folder} both map to the task key {key!r}")
        folders[key] = (folder, files)
    if not folders:
        raise ValueError(f"no task sub-folders with {'/'.join(IMAGE_SUFFIXES)} images under {root}")
    if empty:
        print(f"left out {len(empty)} sub-folder(s) of {root} without images: {', '.join(empty[:5])}")
    test = pick_test_keys(folders, test_fraction, split_seed)

    def tasks() -> Iterator[Task]:
        for key, (folder, files) in folders.items():
            images = to_pool_images((_open(path) for path in files), channels, size)
            yield Task(key, images, "test" if key in test else "train", folder.name, {"folder": folder.name})

    info = {
        "kind": "image-folder",
        "root": str(root.resolve()),
        "test_fraction": test_fraction,
        "split_seed": split_seed,
    }
    return TaskSource(tasks(), len(folders), (channels, size, size), info)


def _open(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            image.load()
            return image
    except (UnidentifiedImageError, OSError) as exn:
        raise ValueError(f"cannot read image {path}: {exn}") from exn
