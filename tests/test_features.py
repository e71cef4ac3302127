"""The task-classifier feature net: it learns, is deterministic, and its cache is exact and guarded."""

import numpy as np
import pytest
import torch

from metagan_dist.evaluation import features
from metagan_dist.evaluation.features import (
    DISTRIBUTION_FILE,
    FEATURE_DIM,
    RECOGNITION_FILE,
    corrupt,
    load_or_train_feature_net,
    load_or_train_feature_spaces,
    train_feature_net,
    uint8_to_unit_range,
)

CLASSES, PER_CLASS = 10, 16


def _pattern_pool(size: int = 32, channels: int = 1, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Class c: a bright square in cell c of a 4x4 grid, jittered by up to 2 px, on a noisy background."""
    rng = np.random.default_rng(seed)
    cell = size // 4
    images = rng.integers(0, 60, (CLASSES * PER_CLASS, channels, size, size)).astype(np.uint8)
    labels = np.repeat(np.arange(CLASSES), PER_CLASS)
    for image, label in zip(images, labels):
        top, left = (label // 4) * cell + rng.integers(0, 3), (label % 4) * cell + rng.integers(0, 3)
        image[:, top : top + cell - 2, left : left + cell - 2] = 230
    return images, labels


@pytest.fixture(scope="module")
def pool():
    return _pattern_pool()


@pytest.fixture(scope="module")
def net(pool):
    return train_feature_net(*pool, epochs=6, seed=0, progress=False)


def test_the_net_learns_the_tasks_well_above_chance(net):
    assert net.heldout_accuracy >= 0.75  # chance is 0.1 (16 held-out images)


def test_features_have_the_documented_shape_and_do_not_depend_on_the_batch(net, pool):
    images = uint8_to_unit_range(pool[0][:20])
    all_at_once = net.features(images)
    assert all_at_once.shape == (20, FEATURE_DIM) and all_at_once.dtype == torch.float32
    assert torch.isfinite(all_at_once).all()
    torch.testing.assert_close(net.features(images, batch_size=3), all_at_once)
    torch.testing.assert_close(net.features(images[:1]), all_at_once[:1])


def test_64px_colour_images_train_and_give_features_of_the_same_dimension():
    images, labels = _pattern_pool(size=64, channels=3)
    net = train_feature_net(images, labels, epochs=1, seed=0, progress=False)
    assert net.features(uint8_to_unit_range(images[:4])).shape == (4, FEATURE_DIM)


def test_training_is_deterministic_given_the_seed(pool):
    first, second, other = (train_feature_net(*pool, epochs=1, seed=s, progress=False) for s in (3, 3, 4))
    for name, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[name]), name
    assert not torch.equal(first.head.weight, other.head.weight)


def test_corrupt_keeps_shape_and_range_leaves_a_share_clean_and_is_seeded():
    images = uint8_to_unit_range(_pattern_pool()[0])
    first = corrupt(images, torch.Generator().manual_seed(0))
    assert first.shape == images.shape and first.min() >= -1 and first.max() <= 1
    unchanged = (first == images).flatten(1).all(1).float().mean().item()
    assert 0.15 < unchanged < 0.45  # CLEAN_SHARE = 0.25 of 160 images, give or take the draw
    assert torch.equal(first, corrupt(images, torch.Generator().manual_seed(0)))


def test_the_corruption_trained_net_recognises_noisy_images_the_clean_net_does_not():
    images, labels = _pattern_pool(seed=1)
    clean = train_feature_net(images, labels, epochs=6, seed=0, progress=False)
    robust = train_feature_net(images, labels, epochs=6, seed=0, corruptions=True, progress=False)
    test_images, test_labels = _pattern_pool(seed=2)
    inputs = uint8_to_unit_range(test_images)
    g = torch.Generator().manual_seed(0)
    salted = torch.where(torch.rand(inputs.shape, generator=g) < 0.15, torch.ones_like(inputs), inputs)

    def accuracy(net, x):
        return (net(x).argmax(1).numpy() == test_labels).mean()

    assert accuracy(robust, inputs) >= 0.9  # still a good classifier of clean images
    assert accuracy(robust, salted) >= accuracy(clean, salted) + 0.2


def test_feature_spaces_cache_two_nets_beside_the_pool(tmp_path, pool):
    spaces = load_or_train_feature_spaces(tmp_path, *pool, epochs=1, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([RECOGNITION_FILE, DISTRIBUTION_FILE])
    recognition, distribution = spaces.features(uint8_to_unit_range(pool[0][:3]))
    assert recognition.shape == distribution.shape == (3, FEATURE_DIM)
    assert not torch.equal(recognition, distribution)


def test_uint8_to_unit_range_maps_0_and_255_to_the_ends():
    converted = uint8_to_unit_range(np.array([[[[0, 255]]]], dtype=np.uint8))
    assert converted.tolist() == [[[[-1.0, 1.0]]]]


def test_cache_round_trip_returns_identical_features_without_retraining(tmp_path, pool, monkeypatch):
    cache = tmp_path / "pool" / "feature_net.pt"
    trained = load_or_train_feature_net(cache, *pool, epochs=1, seed=0, progress=False)
    assert cache.is_file() and sorted(p.name for p in cache.parent.iterdir()) == ["feature_net.pt"]

    monkeypatch.setattr(features, "train_feature_net", _must_not_train)
    loaded = load_or_train_feature_net(cache, *pool, epochs=1, seed=0, progress=False)
    images = uint8_to_unit_range(pool[0])
    assert torch.equal(loaded.features(images), trained.features(images))
    assert loaded.heldout_accuracy == trained.heldout_accuracy


def _must_not_train(*args, **kwargs):
    raise AssertionError("the cache should have been used")


def test_a_cache_from_other_data_is_rejected_or_retrained(tmp_path, pool):
    cache = tmp_path / "feature_net.pt"
    load_or_train_feature_net(cache, *pool, epochs=1, seed=0, progress=False)
    before = cache.read_bytes()
    images, labels = pool
    changed = images.copy()
    changed[0, 0, 0, 0] ^= 1  # one bit of one pixel

    for other in [(changed, labels, 0), (images, labels[::-1].copy(), 0), (images, labels, 1)]:
        with pytest.raises(ValueError, match="trained on other data or settings"):
            load_or_train_feature_net(
                cache, other[0], other[1], epochs=1, seed=other[2], progress=False, retrain_on_mismatch=False
            )
    assert cache.read_bytes() == before  # rejected, untouched

    load_or_train_feature_net(cache, changed, labels, epochs=1, seed=0, progress=False)
    assert cache.read_bytes() != before  # retrained and replaced
    assert torch.load(cache, weights_only=True)["fingerprint"] == features.training_fingerprint(
        changed, labels, epochs=1, seed=0
    )


def test_an_unreadable_cache_is_a_clear_error(tmp_path, pool):
    cache = tmp_path / "feature_net.pt"
    cache.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match=f"cannot read feature-net cache {cache}"):
        load_or_train_feature_net(cache, *pool, epochs=1, seed=0, progress=False)


@pytest.mark.parametrize(
    ("images", "labels", "message"),
    [
        (np.zeros((20, 1, 32, 32), np.float32), np.arange(20) % 2, "uint8 numpy array"),
        (np.zeros((20, 1, 28, 28), np.uint8), np.arange(20) % 2, "32x32 or 64x64"),
        (np.zeros((20, 2, 32, 32), np.uint8), np.arange(20) % 2, "1 or 3 channels"),
        (np.zeros((20, 1, 32, 32), np.uint8), np.arange(19) % 2, "labels must be 20 integers"),
        (np.zeros((20, 1, 32, 32), np.uint8), np.zeros(20, np.int64), "at least 2 tasks"),
        (np.zeros((6, 1, 32, 32), np.uint8), np.arange(6) % 2, "at least 10 images"),
    ],
)
def test_bad_training_data_raises(images, labels, message):
    with pytest.raises(ValueError, match=message):
        train_feature_net(images, labels, epochs=1, progress=False)


def test_images_of_another_shape_than_the_net_are_rejected(net):
    with pytest.raises(ValueError, match=r"images must be \[N, 1, 32, 32\], got \(2, 3, 32, 32\)"):
        net.features(torch.zeros(2, 3, 32, 32))
