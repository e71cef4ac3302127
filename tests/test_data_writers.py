"""Writers: image folders, numpy arrays, torchvision datasets (small fake files in torchvision's layout), CLI."""

from __future__ import annotations

import pickle
import re
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torchvision
from PIL import Image

from metagan_dist.data import Pool
from metagan_dist.data.arrays import array_source, load_array_files
from metagan_dist.data.image_folder import image_folder_source
from metagan_dist.data.make_shards import main
from metagan_dist.data.torchvision_datasets import expected_files, torchvision_source
from metagan_dist.data.writer import write_pool

REPO = Path(__file__).resolve().parents[1]


def write_and_open(source, out: Path) -> Pool:
    write_pool(source, out, command="test")
    return Pool(out)


def all_tasks(pool: Pool) -> dict[str, np.ndarray]:
    return {key: images for split in pool.manifest.splits for key, images in pool.load_tasks(split).items()}


# ---------------------------------------------------------------- image folders


@pytest.fixture
def image_folder(tmp_path) -> Path:
    root = tmp_path / "images"
    rng = np.random.default_rng(0)
    for task, (suffix, count) in {"alpha": (".png", 3), "beta.v2": (".jpg", 2), "gamma": (".BMP", 4)}.items():
        (root / task).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(root / task / f"{i}{suffix}")
    (root / "gamma" / "notes.txt").write_text("not an image")
    (root / "empty").mkdir()
    return root


def test_image_folder_tasks(image_folder, tmp_path, capsys):
    pool = write_and_open(image_folder_source(image_folder, channels=1, size=16, test_fraction=0.0), tmp_path / "out")
    assert "left out 1 sub-folder(s)" in capsys.readouterr().out
    tasks = all_tasks(pool)
    assert {key: images.shape for key, images in tasks.items()} == {
        "alpha": (3, 1, 16, 16),
        "beta_v2": (2, 1, 16, 16),
        "gamma": (4, 1, 16, 16),
    }
    expected = np.asarray(
        Image.open(image_folder / "alpha" / "1.png").convert("L").resize((16, 16), Image.Resampling.LANCZOS)
    )
    assert np.array_equal(tasks["alpha"][1, 0], expected)


def test_image_folder_keeps_images_of_the_right_size_byte_exact(tmp_path):
    root = tmp_path / "images"
    (root / "task").mkdir(parents=True)
    image = np.random.default_rng(1).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(image).save(root / "task" / "a.png")
    pool = write_and_open(image_folder_source(root, channels=3, size=8, test_fraction=0.0), tmp_path / "out")
    assert np.array_equal(pool.load_tasks("train")["task"][0], image.transpose(2, 0, 1))


def test_image_folder_bad_inputs(image_folder, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"image folder .*nowhere does not exist"):
        image_folder_source(tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"no task sub-folders with .png/.jpg/.jpeg/.bmp images under .*empty"):
        image_folder_source(image_folder / "empty")
    (image_folder / "alpha" / "9.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"cannot read image .*alpha/9.png"):
        write_pool(image_folder_source(image_folder), tmp_path / "out", command="test")
    (image_folder / "beta_v2").mkdir()
    (image_folder / "beta_v2" / "x.png").write_bytes((image_folder / "alpha" / "0.png").read_bytes())
    with pytest.raises(ValueError, match=r"task folders .*beta.v2 and .*beta_v2 both map to the task key 'beta_v2'"):
        image_folder_source(image_folder)


# ---------------------------------------------------------------- numpy arrays


@pytest.mark.parametrize("layout", ["NHW", "NHWC", "NCHW"])
def test_array_layouts(tmp_path, layout):
    rng = np.random.default_rng(2)
    channels = 1 if layout == "NHW" else 3
    images = rng.integers(0, 256, (12, 8, 8, channels), dtype=np.uint8)
    given = {"NHW": images[..., 0], "NHWC": images, "NCHW": images.transpose(0, 3, 1, 2)}[layout]
    labels = np.array(["cat", "dog", "cow"] * 4)
    pool = write_and_open(array_source(given, labels, size=8, test_fraction=0.0), tmp_path / "out")
    assert pool.image_shape == (channels, 8, 8)
    tasks = all_tasks(pool)
    assert sorted(tasks) == ["class_cat", "class_cow", "class_dog"]
    assert np.array_equal(tasks["class_dog"], images[1::3].transpose(0, 3, 1, 2))  # unchanged: byte-exact


def test_array_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match=r"faces.npy: images must be uint8 \(0..255\), got float64"):
        array_source(np.zeros((4, 8, 8)), np.zeros(4), where="faces.npy")
    with pytest.raises(ValueError, match=r"arrays: images must be \[N, H, W\], .* got \[4, 8, 8, 5\]"):
        array_source(np.zeros((4, 8, 8, 5), np.uint8), np.zeros(4))
    with pytest.raises(ValueError, match=r"arrays: labels must be one per image \(4\), got shape \[3\]"):
        array_source(np.zeros((4, 8, 8), np.uint8), np.zeros(3))
    np.savez(tmp_path / "both.npz", images=np.zeros(3))
    with pytest.raises(ValueError, match=r"both.npz holds several arrays"):
        load_array_files(tmp_path / "both.npz", tmp_path / "both.npz")
    with pytest.raises(FileNotFoundError, match=r"array file .*labels.npy does not exist"):
        load_array_files(tmp_path / "labels.npy", tmp_path / "both.npz")


# ---------------------------------------------------------------- torchvision (fake files, torchvision's layout)


def write_idx(path: Path, array: np.ndarray) -> None:
    """An IDX (MNIST) file: magic 0x0000 08 <ndim>, big-endian dims, uint8 data."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        bytes([0, 0, 8, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape) + array.tobytes()
    )


def fake_mnist_like(root: Path, folder: str, prefix: dict[str, str], classes: int = 3) -> np.ndarray:
    """Train (8 per class) and test (2 per class) IDX files; returns the train images."""
    rng = np.random.default_rng(3)
    train = None
    for part, per_class in (("train", 8), ("test", 2)):
        labels = np.tile(np.arange(classes, dtype=np.uint8), per_class)
        images = rng.integers(0, 256, (len(labels), 28, 28), dtype=np.uint8)
        write_idx(root / folder / "raw" / f"{prefix[part]}-images-idx3-ubyte", images)
        write_idx(root / folder / "raw" / f"{prefix[part]}-labels-idx1-ubyte", labels)
        train = images if part == "train" else train
    return train


@pytest.mark.parametrize("name, folder", [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")])
def test_mnist_like(tmp_path, name, folder):
    train = fake_mnist_like(tmp_path / "vision", folder, {"train": "train", "test": "t10k"})
    pool = write_and_open(torchvision_source(name, tmp_path / "vision", size=28, test_fraction=0.34), tmp_path / "out")
    assert pool.manifest.splits["train"]["tasks"] == 2 and pool.manifest.splits["test"]["tasks"] == 1
    tasks = all_tasks(pool)
    assert sorted(tasks) == [f"{name}_0", f"{name}_1", f"{name}_2"]
    assert all(images.shape == (10, 1, 28, 28) for images in tasks.values())
    assert np.array_equal(tasks[f"{name}_1"][0, 0], train[1])  # first image of class 1, untouched at 28x28


def test_emnist_is_turned_upright(tmp_path):
    root = tmp_path / "vision"
    train = fake_mnist_like(root, "EMNIST", {"train": "emnist-letters-train", "test": "emnist-letters-test"})
    source = torchvision_source("emnist", root, emnist_split="letters", size=28, test_fraction=0.0)
    pool = write_and_open(source, tmp_path / "out")
    tasks = pool.load_tasks("train")
    assert np.array_equal(tasks["emnist-letters_0"][0, 0], train[0].T)
    assert pool.manifest.source["kind"] == "torchvision-emnist" and pool.manifest.source["emnist_split"] == "letters"


def test_cifar100(tmp_path, monkeypatch):
    base = tmp_path / "vision" / "cifar-100-python"
    base.mkdir(parents=True)
    rng = np.random.default_rng(4)
    for part, per_class in (("train", 5), ("test", 1)):
        labels = [0, 7] * per_class
        data = rng.integers(0, 256, (len(labels), 3 * 32 * 32), dtype=np.uint8)
        (base / part).write_bytes(pickle.dumps({"data": data, "fine_labels": labels, "coarse_labels": labels}))
    (base / "meta").write_bytes(pickle.dumps({"fine_label_names": [f"name{i}" for i in range(100)]}))
    with pytest.raises(ValueError, match=r"torchvision CIFAR100 rejected the files under .*vision although they exist"):
        torchvision_source("cifar100", tmp_path / "vision")  # fake files fail torchvision's md5 checks
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args, **kwargs: True)
    pool = write_and_open(torchvision_source("cifar100", tmp_path / "vision", test_fraction=0.0), tmp_path / "out")
    assert pool.image_shape == (3, 32, 32)
    tasks = pool.load_tasks("train")
    assert {key: images.shape[0] for key, images in tasks.items()} == {"cifar100_0": 6, "cifar100_7": 6}
    first = pickle.loads((base / "train").read_bytes())["data"][1].reshape(3, 32, 32)
    assert np.array_equal(tasks["cifar100_7"][0], first)


def test_omniglot_background_is_train_evaluation_is_test(tmp_path, monkeypatch):
    folder = tmp_path / "vision" / "omniglot-py"
    rng = np.random.default_rng(5)
    for part, alphabet in (("images_background", "Latin"), ("images_evaluation", "Japanese_(katakana)")):
        (folder / f"{part}.zip").parent.mkdir(parents=True, exist_ok=True)
        (folder / f"{part}.zip").write_bytes(b"")
        for character in ("character01", "character02"):
            (folder / part / alphabet / character).mkdir(parents=True)
            for drawer in range(3):
                image = (rng.random((105, 105)) > 0.5).astype(np.uint8) * 255
                Image.fromarray(image).save(folder / part / alphabet / character / f"0001_{drawer:02d}.png")
    monkeypatch.setattr(torchvision.datasets.Omniglot, "_check_integrity", lambda self: True)
    pool = write_and_open(torchvision_source("omniglot", tmp_path / "vision"), tmp_path / "out")
    assert pool.keys("train") == ["Latin-character01", "Latin-character02"]
    assert pool.keys("test") == ["Japanese__katakana_-character01", "Japanese__katakana_-character02"]
    assert all(images.shape == (3, 1, 32, 32) for images in pool.load_tasks("test").values())


def test_missing_torchvision_files_are_listed_where_torchvision_expects_them(tmp_path):
    root = tmp_path / "vision"
    write_idx(root / "MNIST" / "raw" / "train-images-idx3-ubyte", np.zeros((1, 28, 28), np.uint8))
    with pytest.raises(FileNotFoundError) as error:
        torchvision_source("mnist", root)
    message = str(error.value)
    assert "torchvision dataset 'mnist' is incomplete under" in message and "3 of the 4 files" in message
    for missing in ("train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        assert str(root / "MNIST" / "raw" / missing) in message
    assert "train-images-idx3-ubyte" not in message
    omniglot = expected_files("omniglot", root)
    assert root / "omniglot-py" / "images_evaluation.zip" in omniglot
    assert expected_files("cifar100", root) == [root / "cifar-100-python" / name for name in ("train", "test", "meta")]


# ---------------------------------------------------------------- command line


def test_cli_writes_a_pool_and_records_its_command(image_folder, tmp_path, capsys):
    out = tmp_path / "pool"
    main(["image-folder", str(image_folder), "--out", str(out), "--size", "8", "--maxcount", "2"])
    summary = capsys.readouterr().out
    assert re.search(rf"wrote pool {re.escape(str(out))}: 3 tasks \(.*\), 9 images \[1, 8, 8\], \d+ shards", summary)
    manifest = Pool(out).manifest
    assert manifest.command == f"metagan-make-shards image-folder {image_folder} --out {out} --size 8 --maxcount 2"
    assert manifest.source["kind"] == "image-folder"


def test_cli_arrays(tmp_path):
    np.save(tmp_path / "images.npy", np.zeros((6, 8, 8), np.uint8))
    np.save(tmp_path / "labels.npy", np.array([0, 1, 2, 0, 1, 2]))
    main(
        [
            "arrays",
            str(tmp_path / "images.npy"),
            str(tmp_path / "labels.npy"),
            "--out",
            str(tmp_path / "pool"),
            "--size",
            "8",
            "--test-fraction",
            "0",
        ]
    )
    assert Pool(tmp_path / "pool").keys("train") == ["class_0", "class_1", "class_2"]


def test_cli_reports_bad_input_without_a_traceback(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["torchvision", "cifar100", "--root", str(tmp_path), "--out", str(tmp_path / "pool")])
    assert exit_.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("metagan-make-shards: error: torchvision dataset 'cifar100' is incomplete")
    assert str(tmp_path / "cifar-100-python" / "meta") in error and "Traceback" not in error


def test_cli_glyphs_refuses_an_existing_folder(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["glyphs", "--out", str(tmp_path)])
    assert exit_.value.code == 2
    assert f"{tmp_path} already exists: choose another output folder or pass --overwrite" in capsys.readouterr().err


def test_launch_script_help():
    result = subprocess.run(
        [sys.executable, str(REPO / "launch" / "make_shards.py"), "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and "image-folder" in result.stdout and "torchvision" in result.stdout
