"""Data sources: each loads a whole image classification dataset as numpy arrays.

Every source returns a `Dataset` with float32 images in [0, 1] shaped (N, H, W, C) and
int32 labels. The sources:

- ``digits``: scikit-learn's bundled 8x8 digits (no download, no files needed).
- ``idx``: a folder of MNIST-format IDX files (MNIST, Fashion-MNIST, KMNIST, ...).
- ``fashion_mnist``: the IDX files that the Debian package ``dataset-fashion-mnist``
  installs in ``/usr/share/datasets/fashion-mnist``.
- ``tfds``: a TensorFlow Datasets dataset already prepared in ArrayRecord format, read
  without TensorFlow through ``tfds.data_source`` and cached as ``.npz``
  (`clax.data.tfds_source`).

Use `load_source` to pick one by name (e.g. from a config).
"""

from __future__ import annotations

import gzip
import inspect
import os
import re
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from clax.data.dataset import Dataset, _make_dataset, _to_unit_float
from clax.data.tfds_source import load_tfds

__all__ = [
    "Dataset",
    "SOURCES",
    "load_digits",
    "load_fashion_mnist",
    "load_idx",
    "load_source",
    "load_tfds",
    "read_idx",
]

DEFAULT_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


# --------------------------------------------------------------------------------------
# digits


def load_digits(*, test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes, no download).

    The split is stratified: each class puts ``round(test_fraction * count)`` of its images
    (at least one, and leaving at least one for training) in the test set, chosen with
    ``np.random.default_rng(seed)``. Both splits keep the original example order.

    Args:
        test_fraction: fraction of each class held out for testing, in (0, 1).
        seed: seed of the split.

    Returns:
        A `Dataset` named ``"digits"`` with images (N, 8, 8, 1) scaled to [0, 1] (/16).
    """
    from sklearn import datasets as sk_datasets  # Deferred: sklearn imports slowly.

    if not isinstance(test_fraction, (int, float)) or not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be a float in (0, 1), got {test_fraction!r}")
    bunch = sk_datasets.load_digits()
    images = (bunch.images.astype(np.float32) / np.float32(16.0))[..., None]
    labels = bunch.target.astype(np.int32)
    rng = np.random.default_rng(seed)
    is_test = np.zeros(len(labels), bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        n_test = int(round(test_fraction * len(idx)))
        n_test = min(max(n_test, 1), max(len(idx) - 1, 1))
        is_test[rng.permutation(idx)[:n_test]] = True
    return _make_dataset(
        images[~is_test], labels[~is_test], images[is_test], labels[is_test], 10, "digits"
    )


# --------------------------------------------------------------------------------------
# IDX (MNIST format)

# IDX type codes (third byte of the magic number) and their big-endian numpy dtypes.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

_IDX_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}

_IDX_HELP = (
    "Get MNIST-format data with e.g. `apt-get install dataset-fashion-mnist` (puts "
    f"Fashion-MNIST in {DEFAULT_FASHION_MNIST_DIR}/), or download the four MNIST IDX files "
    "(" + ", ".join(_IDX_FILES.values()) + ", each optionally .gz) into one folder. "
    "Without any files, use the 'digits' source."
)


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Reads one IDX file (plain, or gzip when the name ends in ``.gz``).

    The header is two zero bytes, a type code (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C
    int32, 0x0D float32, 0x0E float64), the number of dimensions, then each dimension as a
    big-endian uint32; the big-endian data follows.

    Args:
        path: the file to read.

    Returns:
        The array, in native byte order, shaped by the header's dimensions.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IDX file {str(path)!r} does not exist. {_IDX_HELP}")
    try:
        raw = path.read_bytes()
        if path.suffix == ".gz":
            raw = gzip.decompress(raw)  # One shot: about 2x faster than gzip.open().read().
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError.
        raise ValueError(f"could not read IDX file {str(path)!r}: {e}") from e
    if len(raw) < 4:
        raise ValueError(f"IDX file {str(path)!r} is too short ({len(raw)} bytes) for a header")
    zero0, zero1, code, ndim = raw[0], raw[1], raw[2], raw[3]
    if zero0 != 0 or zero1 != 0 or code not in _IDX_DTYPES or ndim == 0:
        raise ValueError(
            f"bad IDX magic number 0x{raw[:4].hex()} in {str(path)!r}: expected 0x0000TTDD "
            f"with type code TT in {{{', '.join(f'{c:02x}' for c in _IDX_DTYPES)}}} and "
            "DD >= 1 dimensions (is this an IDX file?)"
        )
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise ValueError(f"IDX file {str(path)!r} is truncated inside its {ndim}-dim header")
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[code]
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(raw) - header_len != expected:
        raise ValueError(
            f"IDX file {str(path)!r} has {len(raw) - header_len} data bytes but its header "
            f"{dims} of {dtype.name} needs {expected}"
        )
    data = np.frombuffer(raw, dtype, offset=header_len).reshape(dims)
    return data.astype(dtype.newbyteorder("="), copy=False)


def _find_idx_file(root: Path, base: str) -> Path:
    """``base`` or ``base.gz`` in root; also accepts the ``train-images.idx3-ubyte`` spelling."""
    dotted = re.sub(r"-(idx\d-ubyte)$", r".\1", base)
    for name in (base, base + ".gz", dotted, dotted + ".gz"):
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(
        f"IDX folder {str(root)!r} has no {base!r} (nor {base + '.gz'!r}). {_IDX_HELP}"
    )


def load_idx(root: str | os.PathLike[str], *, name: str = "idx") -> Dataset:
    """A dataset from a folder of MNIST-format IDX files (MNIST, Fashion-MNIST, KMNIST...).

    The folder must hold ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
    ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte``, each plain or ``.gz``.
    Nothing is cached: 60k gzipped 28x28 images load in about a second.

    Args:
        root: the folder.
        name: the dataset's name (used in scenario names).

    Returns:
        A `Dataset` with images (N, H, W, 1) (uint8 / 255) and ``max(label) + 1`` classes.
    """
    if root is None or (isinstance(root, str) and not root):
        raise ValueError(f"root must be a folder of IDX files, got {root!r}. {_IDX_HELP}")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"IDX folder {str(root)!r} does not exist. {_IDX_HELP}")
    arrays = {key: read_idx(_find_idx_file(root, base)) for key, base in _IDX_FILES.items()}
    images = {}
    for key in ("x_train", "x_test"):
        x = arrays[key]
        if x.ndim == 3:  # (N, H, W): grayscale, add the channel axis.
            x = x[..., None]
        if x.ndim != 4:
            raise ValueError(
                f"{_IDX_FILES[key]} in {str(root)!r} must hold (N, H, W) images, got {x.shape}"
            )
        images[key] = _to_unit_float(x, f"{_IDX_FILES[key]} in {str(root)!r}")
    for key in ("y_train", "y_test"):
        y = arrays[key]
        if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
            raise ValueError(
                f"{_IDX_FILES[key]} in {str(root)!r} must hold (N,) integer labels, got "
                f"{y.shape} of {y.dtype}"
            )
    dataset = _make_dataset(
        images["x_train"], arrays["y_train"], images["x_test"], arrays["y_test"], None, name
    )
    _check_idx_labels(arrays["y_train"], arrays["y_test"], root)
    return dataset


def _check_idx_labels(y_train: np.ndarray, y_test: np.ndarray, root: Path) -> None:
    """Refuses label files that cannot be class labels (a valid header over other bytes).

    Classes are ``0 .. max(label)``: most of them must have training examples and every
    test label must occur in training, else the files are not a label set.
    """
    where = f"{_IDX_FILES['y_train']} / {_IDX_FILES['y_test']} in {str(root)!r}"
    if min(y_train.min(initial=0), y_test.min(initial=0)) < 0:
        raise ValueError(f"{where}: labels must be >= 0")
    num_classes = int(max(y_train.max(initial=0), y_test.max(initial=0))) + 1
    empty = num_classes - len(np.unique(y_train))
    unseen = np.setdiff1d(np.unique(y_test), np.unique(y_train))
    if 2 * empty > num_classes or len(unseen):
        raise ValueError(
            f"{where} do not look like class labels: labels up to {num_classes - 1} give "
            f"{num_classes} classes, {empty} of them without a training example, and "
            f"{len(unseen)} test label value(s) never seen in training (corrupt or not a "
            "label file?)")


def load_fashion_mnist(root: str | os.PathLike[str] = DEFAULT_FASHION_MNIST_DIR) -> Dataset:
    """Fashion-MNIST (60000/10000 images, 28x28x1, 10 classes) from its IDX files.

    Args:
        root: the folder with the IDX files; the default is where the Debian package
            ``dataset-fashion-mnist`` installs them.

    Returns:
        A `Dataset` named ``"fashion_mnist"``.
    """
    return load_idx(root, name="fashion_mnist")


# --------------------------------------------------------------------------------------
# Registry

SOURCES: dict[str, Callable[..., Dataset]] = {
    "digits": load_digits,
    "idx": load_idx,
    "fashion_mnist": load_fashion_mnist,
    "tfds": load_tfds,
}


def _call_checked(fn: Callable[..., Any], kwargs: Mapping[str, Any], what: str, **fixed: Any):
    """Calls ``fn(**fixed, **kwargs)``, with a clear error for unknown or missing kwargs."""
    params = {
        n: p
        for n, p in inspect.signature(fn).parameters.items()
        if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and n not in fixed
    }
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        raise ValueError(
            f"unknown argument(s) {unknown} for {what}; valid arguments: {sorted(params)}"
        )
    missing = sorted(n for n, p in params.items() if p.default is p.empty and n not in kwargs)
    if missing:
        raise ValueError(f"{what} needs argument(s) {missing}; valid arguments: {sorted(params)}")
    return fn(**fixed, **kwargs)


def load_source(name: str, /, **kwargs: Any) -> Dataset:
    """Loads the data source registered as ``name`` (see `SOURCES`) with its kwargs.

    Args:
        name: one of ``digits``, ``idx``, ``fashion_mnist``, ``tfds`` (positional only, so
            ``name=`` in kwargs reaches the source, e.g. ``load_source("tfds", name="mnist")``).
        **kwargs: that source's keyword arguments (e.g. ``root=`` for ``idx``).

    Returns:
        The loaded `Dataset`.
    """
    if name not in SOURCES:
        raise ValueError(f"unknown data source {name!r}; valid choices: {sorted(SOURCES)}")
    return _call_checked(SOURCES[name], kwargs, f"data source {name!r}")
