"""Built-in data: scikit-learn's bundled handwritten digits, upsampled to 32x32.

The digits set ships inside scikit-learn (no download), 1797 grey 8x8 images of 0-9. We upsample
them 4x with bilinear interpolation so that a small CNN has enough pixels to make latency
measurable, scale to [0, 1], and split once with a fixed seed: the held-out part is never used
for training or calibration, so the accuracies the demo prints are honest.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["DIGITS_IMAGE_SIZE", "DIGITS_INPUT_NAME", "DigitsSplit", "load_digits_split"]

DIGITS_INPUT_NAME = "image"
DIGITS_IMAGE_SIZE = 32
_SPLIT_SEED = 0
_TEST_FRACTION = 0.25


@dataclass(frozen=True)
class DigitsSplit:
    """Images are float32 NCHW (N, 1, 32, 32) in [0, 1]; labels are int64 (N,)."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


def _upsample(images_8x8: np.ndarray) -> np.ndarray:
    from scipy.ndimage import zoom

    factor = DIGITS_IMAGE_SIZE / 8
    return np.stack([zoom(img, factor, order=1) for img in images_8x8]).astype(np.float32)


def load_digits_split() -> DigitsSplit:
    """Load the digits, upsample to 32x32, and split 75/25 with a fixed seed (stratified)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = _upsample(digits.images / 16.0)
    images = np.clip(images, 0.0, 1.0)[:, None, :, :]
    labels = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=_TEST_FRACTION, random_state=_SPLIT_SEED, stratify=labels
    )
    return DigitsSplit(
        np.ascontiguousarray(x_train), y_train, np.ascontiguousarray(x_test), y_test
    )
