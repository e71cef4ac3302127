"""Style shifts of held-out tasks (evaluate --shift) against numpy references of the blur and the max filter."""

from __future__ import annotations

import numpy as np
import pytest

from metagan_dist.evaluation.shifts import BLUR_SIGMA, shift_images, shift_tasks


@pytest.fixture
def images() -> np.ndarray:
    rng = np.random.default_rng(0)
    pictures = rng.integers(0, 40, (3, 1, 12, 12)).astype(np.uint8)
    pictures[:, :, 4:8, 5] = 250  # a one-pixel stroke
    return pictures


def reference_blur(images: np.ndarray, sigma: float, radius: int = 3) -> np.ndarray:
    """Separable Gaussian of 2·radius + 1 taps, reflect padding (torchvision's), one explicit sum per pixel."""
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    padded = np.pad(images.astype(np.float64), ((0, 0), (0, 0), (radius, radius), (radius, radius)), mode="reflect")
    h, w = images.shape[-2:]
    out = np.zeros(images.shape)
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            out += taps[dy] * taps[dx] * padded[..., dy : dy + h, dx : dx + w]
    return out


def test_none_leaves_the_images_as_they_are(images):
    assert shift_images(images, "none") is images


def test_blur_is_a_gaussian_of_sigma_one_pixel(images):
    blurred = shift_images(images, "blur")
    assert blurred.dtype == np.uint8 and blurred.shape == images.shape
    assert np.abs(blurred.astype(np.float64) - reference_blur(images, BLUR_SIGMA)).max() <= 0.5 + 1e-3
    assert blurred[:, :, 4:8, 5].max() < 200  # the stroke spreads out


def test_bold_widens_bright_strokes_by_a_pixel_on_each_side(images):
    bold = shift_images(images, "bold")
    padded = np.pad(images, ((0, 0), (0, 0), (1, 1), (1, 1)), mode="constant", constant_values=0)
    expected = np.max([padded[..., dy : dy + 12, dx : dx + 12] for dy in range(3) for dx in range(3)], axis=0)
    np.testing.assert_array_equal(bold, expected)
    assert (bold[:, :, 4:8, 4:7] == 250).all()  # the stroke is 3 pixels wide now


def test_tasks_keep_their_keys_and_order_and_an_unknown_shift_is_named(images):
    shifted = shift_tasks({"b": images, "a": images[:1]}, "bold")
    assert list(shifted) == ["b", "a"] and shifted["a"].shape == (1, 1, 12, 12)
    with pytest.raises(ValueError, match="unknown shift 'thin': choose one of none, blur, bold"):
        shift_images(images, "thin")
