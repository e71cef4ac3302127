"""Tasks from torchvision datasets already on disk (download=False): one task per class or character.

Omniglot's background set is meta-train and its evaluation set meta-test; the other datasets
merge their train and test files and hold out a seeded fraction of classes. EMNIST images are
stored transposed in its files; they are turned upright here.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from metagan_dist.data.arrays import array_source
from metagan_dist.data.images import to_pool_images
from metagan_dist.data.writer import Task, TaskSource, task_key

DATASETS = ("omniglot", "mnist", "emnist", "fashion-mnist", "cifar100")
EMNIST_SPLITS = ("byclass", "bymerge", "balanced", "letters", "digits", "mnist")


def expected_files(name: str, root: str | Path, emnist_split: str = "balanced") -> list[Path]:
    """The files (and Omniglot's folders) torchvision reads for a dataset under `root`."""
    from torchvision import datasets

    root = Path(root)
    if name in ("mnist", "fashion-mnist"):
        dataset = datasets.MNIST if name == "mnist" else datasets.FashionMNIST
        raw = root / dataset.__name__ / "raw"
        return [raw / Path(resource).name.removesuffix(".gz") for resource, _ in dataset.resources]
    if name == "emnist":
        raw = root / "EMNIST" / "raw"
        parts = [(part, kind) for part in ("train", "test") for kind in ("images-idx3", "labels-idx1")]
        return [raw / f"emnist-{emnist_split}-{part}-{kind}-ubyte" for part, kind in parts]
    if name == "cifar100":
        cifar = datasets.CIFAR100
        files = [file for file, _ in cifar.train_list + cifar.test_list] + [cifar.meta["filename"]]
        return [root / cifar.base_folder / file for file in files]
    if name == "omniglot":
        folder = root / datasets.Omniglot.folder
        return [folder / f"{part}{suffix}" for part in datasets.Omniglot.zips_md5 for suffix in (".zip", "")]
    raise ValueError(f"unknown torchvision dataset {name!r}; choose one of {', '.join(DATASETS)}")


def check_files(name: str, root: str | Path, emnist_split: str = "balanced") -> None:
    """FileNotFoundError listing every missing file and where torchvision expects it."""
    expected = expected_files(name, root, emnist_split)
    missing = [path for path in expected if not path.exists()]
    if missing:
        listing = "".join(f"\n  {path}" for path in missing)
        raise FileNotFoundError(
            f"torchvision dataset {name!r} is incomplete under {root}: {len(missing)} of the {len(expected)} "
            f"files torchvision reads are missing; it expects them at:{listing}\nNothing is downloaded here: "
            f"fetch the dataset where there is network (torchvision.datasets with download=True) and copy it in."
        )


def torchvision_source(
    name: str,
    root: str | Path,
    *,
    channels: int | None = None,
    size: int = 32,
    test_fraction: float = 0.15,
    split_seed: int = 0,
    emnist_split: str = "balanced",
) -> TaskSource:
    """Tasks of a torchvision dataset read from `root` with download=False (channels default: native)."""
    if emnist_split not in EMNIST_SPLITS:
        raise ValueError(f"emnist_split must be one of {', '.join(EMNIST_SPLITS)}, not {emnist_split!r}")
    check_files(name, root, emnist_split)
    if name == "omniglot":
        return _omniglot_source(root, channels or 1, size)
    images, labels, classes = _load_arrays(name, root, emnist_split)
    prefix = f"emnist-{emnist_split}" if name == "emnist" else name
    info = {"kind": f"torchvision-{name}", "root": str(Path(root).resolve()), "emnist_split": emnist_split}
    if name != "emnist":
        del info["emnist_split"]
    return array_source(
        images,
        labels,
        channels=channels,
        size=size,
        test_fraction=test_fraction,
        split_seed=split_seed,
        key_prefix=prefix,
        names=classes,
        info=info,
        where=f"torchvision {name} under {root}",
    )


def _construct(dataset_class, root: str | Path, **kwargs):
    """The torchvision dataset with download=False; its own integrity failures said plainly."""
    try:
        return dataset_class(str(root), download=False, **kwargs)
    except RuntimeError as exn:
        raise ValueError(
            f"torchvision {dataset_class.__name__} rejected the files under {root} although they exist "
            f"(corrupted or partial download? checksums differ?): {exn}"
        ) from exn


def _load_arrays(name: str, root: str | Path, emnist_split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Images ([N, H, W] or [N, H, W, C] uint8), labels and class names of the train + test files."""
    from torchvision import datasets

    if name == "emnist":
        parts = [_construct(datasets.EMNIST, root, split=emnist_split, train=train) for train in (True, False)]
    else:
        dataset_class = {
            "mnist": datasets.MNIST,
            "fashion-mnist": datasets.FashionMNIST,
            "cifar100": datasets.CIFAR100,
        }[name]
        parts = [_construct(dataset_class, root, train=train) for train in (True, False)]
    images = np.concatenate([np.asarray(part.data) for part in parts])
    if name == "emnist":
        images = images.transpose(0, 2, 1)
    labels = np.concatenate([np.asarray(part.targets) for part in parts])
    return images, labels, list(parts[0].classes)


def _omniglot_source(root: str | Path, channels: int, size: int) -> TaskSource:
    """One task per character: background characters are meta-train, evaluation characters meta-test."""
    from torchvision import datasets

    parts = {split: _construct(datasets.Omniglot, root, background=split == "train") for split in ("train", "test")}
    total = sum(len(part._characters) for part in parts.values())  # torchvision keeps no public list

    def tasks() -> Iterator[Task]:
        for split, dataset in parts.items():
            by_character = defaultdict(list)
            for index in range(len(dataset)):
                image, character = dataset[index]
                by_character[character].append(image)
            for name, images in sorted((dataset._characters[index], images) for index, images in by_character.items()):
                yield Task(task_key(name.replace("/", "-")), to_pool_images(images, channels, size), split, name)

    info = {"kind": "torchvision-omniglot", "root": str(Path(root).resolve()), "test_split": "images_evaluation"}
    return TaskSource(tasks(), total, (channels, size, size), info)
