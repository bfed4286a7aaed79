"""``digits[:SPLIT]``: scikit-learn's bundled 8x8 digits; its values 0..16 are scaled to uint8 0..255 by
``round(v * 255 / 16)``. ``train`` = the first 1,437 images (80 %, the default), ``test`` = the last 360,
``all`` = 1,797. Captioned from the class names ("a photo of a seven.")."""

from __future__ import annotations

import numpy as np

from mlcd_jax.data.sources.base import ArraySource, Kind, classified, split_arg

DIGITS_TRAIN = 1437
DIGIT_CLASSES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images [N, 8, 8, 1] and int64 labels [N] of ``split``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    labels = digits.target.astype(np.int64)
    part = {"train": slice(0, DIGITS_TRAIN), "test": slice(DIGITS_TRAIN, None), "all": slice(None)}[split]
    return images[part], labels[part]


def _open(spec: str, args: list[str], split: str | None) -> ArraySource:
    split = split or (split_arg(spec, args[0]) if args else "train")
    return classified(f"digits/{split}", *arrays(split), DIGIT_CLASSES)


KIND = Kind("digits", "digits[:SPLIT]", _open, lambda args, split: list(DIGIT_CLASSES))
