"""scikit-learn's bundled 8x8 handwritten digits (1797 images, no download): the quickstart's data."""

from __future__ import annotations

from typing import Any

import numpy as np

from diffusion_lab.data.base import BaseDataModule, init_args

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def load_digits_uint8() -> tuple[np.ndarray, np.ndarray]:
    """All 1797 digits as uint8 (N, 8, 8) in 0..255 (ink bright) and int64 labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.round(d.images / 16.0 * 255.0).astype(np.uint8)
    return images, d.target.astype(np.int64)


class DigitsDataModule(BaseDataModule):
    """Digits upsampled to `image_size`, split train/val/test with a seed (val/test are held out)."""

    num_classes = 10
    class_names = DIGIT_NAMES

    def __init__(
        self,
        *,
        image_size: int = 16,
        channels: int = 1,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        **loader: Any,
    ) -> None:
        super().__init__(**init_args(locals()))

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        self._labelled_splits(*load_digits_uint8(), style="handwritten")
