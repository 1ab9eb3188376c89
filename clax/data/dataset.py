"""The in-memory `Dataset` every source returns, and the checks that build it."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = ["Dataset"]


class Dataset(NamedTuple):
    """A whole image classification dataset held in memory.

    Attributes:
        x_train: float32 images (N, H, W, C) with values in [0, 1].
        y_train: int32 labels (N,) in ``[0, num_classes)``.
        x_test: float32 images (M, H, W, C).
        y_test: int32 labels (M,).
        num_classes: the number of classes (labels are ``0 .. num_classes - 1``).
        name: a short name used in scenario names and logs, e.g. ``"digits"``.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    name: str


def _make_dataset(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    num_classes: int | None,
    name: str,
) -> Dataset:
    """Checks shapes and labels, and builds the `Dataset` (float32 images, int32 labels)."""
    for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        if x.ndim != 4:
            raise ValueError(f"{name}: {split} images must be (N, H, W, C), got shape {x.shape}")
        if y.ndim != 1 or len(y) != len(x):
            raise ValueError(
                f"{name}: {split} labels must be ({len(x)},) to match the images, "
                f"got shape {y.shape}"
            )
    if x_train.shape[1:] != x_test.shape[1:]:
        raise ValueError(
            f"{name}: train and test images differ in shape: {x_train.shape[1:]} vs "
            f"{x_test.shape[1:]}"
        )
    labels = np.concatenate([y_train, y_test])
    if len(labels) and labels.min() < 0:
        raise ValueError(f"{name}: labels must be >= 0, found {labels.min()}")
    seen = int(labels.max()) + 1 if len(labels) else 0
    if num_classes is None:
        num_classes = seen
    elif seen > num_classes:
        raise ValueError(f"{name}: found label {seen - 1} but num_classes is {num_classes}")
    return Dataset(
        x_train=x_train.astype(np.float32, copy=False),
        y_train=y_train.astype(np.int32, copy=False),
        x_test=x_test.astype(np.float32, copy=False),
        y_test=y_test.astype(np.int32, copy=False),
        num_classes=int(num_classes),
        name=name,
    )


def _to_unit_float(x: np.ndarray, what: str) -> np.ndarray:
    """Images to float32 in [0, 1]: uint8 is divided by 255, floats are kept as they are."""
    if x.dtype == np.uint8:
        out = x.astype(np.float32)
        out /= np.float32(255.0)  # Divide (not * 1/255) so values are exactly x / 255.
        return out
    if np.issubdtype(x.dtype, np.floating):
        return x.astype(np.float32, copy=False)
    if x.dtype == np.bool_:
        return x.astype(np.float32)
    raise ValueError(f"{what}: expected uint8, bool or float images, got dtype {x.dtype}")
