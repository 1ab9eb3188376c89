"""Data sources: each loads a whole image classification dataset as numpy arrays.

Every source returns a `Dataset` with float32 images in [0, 1] shaped (N, H, W, C) and
int32 labels. The sources:

- ``digits``: scikit-learn's bundled 8x8 digits (no download, no files needed).
- ``idx``: a folder of MNIST-format IDX files (MNIST, Fashion-MNIST, KMNIST, ...).
- ``fashion_mnist``: the IDX files that the Debian package ``dataset-fashion-mnist``
  installs in ``/usr/share/datasets/fashion-mnist``.
- ``tfds``: a TensorFlow Datasets dataset already prepared in ArrayRecord format, read
  without TensorFlow through ``tfds.data_source`` and cached as ``.npz``.

Use `load_source` to pick one by name (e.g. from a config).
"""

from __future__ import annotations

import gzip
import inspect
import json
import os
import re
import tempfile
import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

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
    return _make_dataset(
        images["x_train"], arrays["y_train"], images["x_test"], arrays["y_test"], None, name
    )


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
# TensorFlow Datasets (prepared ArrayRecord data, read without TensorFlow)

_TFDS_NAME_RE = re.compile(
    r"^(?P<dataset>[A-Za-z0-9_]+)"
    r"(/(?P<config>[A-Za-z0-9_.\-]+))?"
    r"(:(?P<version>[0-9*]+\.[0-9*]+\.[0-9*]+))?$"
)
# Formats `tfds.data_source` can read (random access).
_RANDOM_ACCESS_FORMATS = ("array_record", "parquet")


def _default_tfds_data_dir() -> Path:
    return Path(os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets").expanduser()


def _default_cache_dir() -> Path:
    root = os.environ.get("CLAX_CACHE_DIR")
    return Path(root).expanduser() / "tfds" if root else Path("~/.cache/clax/tfds").expanduser()


def _tfds_help(dataset: str, data_dir: Path, cache_dir: Path) -> str:
    return (
        f"Prepare it on a machine with TensorFlow (`pip install 'clax[prepare]'`, then "
        f"`tfds build {dataset} --file_format=array_record` or "
        f"`tfds.builder('{dataset}', file_format='array_record').download_and_prepare()`), "
        f"and copy ~/tensorflow_datasets/{dataset} into {str(data_dir)!r} (or pass data_dir=, "
        f"or set $TFDS_DATA_DIR). Converted arrays are cached in {str(cache_dir)!r}. "
        "Without TFDS, use the 'idx' or 'digits' sources."
    )


def _version_key(path: Path) -> tuple[int, ...]:
    """Sort key of a ``.../<version>/dataset_info.json`` path (highest version last)."""
    parts = path.parent.name.split(".")
    return tuple(int(p) if p.isdigit() else -1 for p in parts)


def _find_prepared_tfds(name: str, data_dir: Path) -> Path | None:
    """The version folder of prepared data for ``name`` under data_dir, looking only at files.

    ``name`` is ``DATASET[/CONFIG][:VERSION]``; without a config, both
    ``DATASET/VERSION`` and ``DATASET/<any config>/VERSION`` match; without a version, the
    highest prepared version wins.
    """
    m = _TFDS_NAME_RE.match(name)
    if m is None:
        raise ValueError(
            f"tfds name must look like 'dataset', 'dataset/config', 'dataset:1.2.3' or "
            f"'dataset/config:1.2.3', got {name!r}"
        )
    dataset, config, version = m["dataset"], m["config"], m["version"] or "*"
    base = data_dir / dataset
    if not base.is_dir():
        return None
    patterns = [f"{config}/{version}"] if config else [version, f"*/{version}"]
    found = [p for pat in patterns for p in base.glob(f"{pat}/dataset_info.json")]
    if not found:
        return None
    return max(found, key=_version_key).parent


def _read_dataset_info(version_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((version_dir / "dataset_info.json").read_text())
    except (OSError, ValueError):
        return {}  # Unreadable metadata: let tfds itself decide.


def _source_to_arrays(
    source: Sequence[Mapping[str, Any]],
    image_key: str,
    label_key: str,
    *,
    what: str,
    batch_size: int = 1024,
) -> tuple[np.ndarray, np.ndarray]:
    """Reads every record of a random-access source into (images, labels) arrays.

    Args:
        source: a sequence of feature dicts, e.g. a ``tfds.data_source`` split.
        image_key: the image feature, (H, W, C) or (H, W) per record.
        label_key: the integer label feature.
        what: a description for error messages.
        batch_size: records fetched per ``__getitems__`` call (when the source has one).

    Returns:
        Images (N, H, W, C) in the source's dtype, and int64 labels (N,).
    """
    n = len(source)
    if n == 0:
        raise ValueError(f"{what} is empty")
    get_many = getattr(source, "__getitems__", None)
    images: np.ndarray | None = None
    labels = np.empty(n, np.int64)
    for start in range(0, n, batch_size):
        keys = list(range(start, min(start + batch_size, n)))
        records = None
        if get_many is not None:
            try:
                records = get_many(keys)
            except TypeError:  # tfds.testing.mock_data sources have a broken __getitems__.
                get_many = None
        if records is None:
            records = [source[i] for i in keys]
        for i, record in zip(keys, records):
            if image_key not in record or label_key not in record:
                raise ValueError(
                    f"{what} records have features {sorted(record)}; image_key={image_key!r} "
                    f"and label_key={label_key!r} must be among them"
                )
            image = np.asarray(record[image_key])
            if image.ndim == 2:
                image = image[..., None]
            if images is None:
                if image.ndim != 3:
                    raise ValueError(
                        f"{what}: {image_key!r} must be (H, W, C) or (H, W) images, got "
                        f"shape {image.shape}"
                    )
                images = np.empty((n, *image.shape), image.dtype)
            if image.shape != images.shape[1:]:
                raise ValueError(
                    f"{what}: images must all have one shape, record {i} is {image.shape} "
                    f"and record 0 is {images.shape[1:]} (resize the dataset first)"
                )
            images[i] = image
            labels[i] = int(np.asarray(record[label_key]))
    assert images is not None
    return images, labels


def _tfds_cache_path(
    cache_dir: Path, name: str, image_key: str, label_key: str, train_split: str, test_split: str
) -> Path:
    parts = [name]
    if (image_key, label_key) != ("image", "label"):
        parts += [image_key, label_key]
    if (train_split, test_split) != ("train", "test"):
        parts += [train_split, test_split]
    return cache_dir / (re.sub(r"[^A-Za-z0-9_.\-]+", "_", "__".join(parts)) + ".npz")


_CACHE_KEYS = ("x_train", "y_train", "x_test", "y_test", "num_classes")


def _load_cache(path: Path, name: str) -> Dataset:
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in _CACHE_KEYS}
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"cached dataset {str(path)!r} is unreadable ({e}); delete it") from e
    return _make_dataset(
        _to_unit_float(arrays["x_train"], str(path)),
        arrays["y_train"],
        _to_unit_float(arrays["x_test"], str(path)),
        arrays["y_test"],
        int(arrays["num_classes"]),
        name,
    )


def _save_cache(path: Path, arrays: Mapping[str, Any]) -> None:
    """Writes the npz atomically, so an interrupted run leaves no half-written cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_tfds(
    name: str,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    image_key: str = "image",
    label_key: str = "label",
    train_split: str = "train",
    test_split: str = "test",
) -> Dataset:
    """A TFDS dataset prepared in ArrayRecord format, read without TensorFlow.

    The first call reads both splits through ``tfds.data_source`` and caches the arrays
    as ``<cache_dir>/<name>.npz``; later calls load that file and never touch tfds (the
    cache is keyed by name, keys and splits, not by data_dir). Before calling into tfds,
    the prepared files are looked up on disk, so a missing dataset fails at once instead
    of tfds trying (and, offline, hanging for minutes) to download it.

    Args:
        name: ``DATASET[/CONFIG][:VERSION]``, e.g. ``"mnist"`` or ``"cifar10:3.0.2"``.
        data_dir: a local folder of prepared TFDS data (default ``$TFDS_DATA_DIR`` or
            ``~/tensorflow_datasets``).
        cache_dir: where the converted ``.npz`` goes (default ``$CLAX_CACHE_DIR/tfds`` or
            ``~/.cache/clax/tfds``).
        image_key: the image feature; images must all share one shape.
        label_key: the label feature (a ``ClassLabel`` gives ``num_classes``).
        train_split: the split used for training (slices like ``"train[:10%]"`` work).
        test_split: the split used for testing.

    Returns:
        A `Dataset` named after the dataset (``name`` without config or version).
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a TFDS dataset name like 'mnist', got {name!r}")
    if data_dir is not None and "://" in str(data_dir):
        # The prepared-data check below only looks at the local filesystem.
        raise ValueError(f"data_dir must be a local folder, got {str(data_dir)!r}")
    data_dir = Path(data_dir).expanduser() if data_dir is not None else _default_tfds_data_dir()
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else _default_cache_dir()
    short_name = re.split(r"[/:]", name, maxsplit=1)[0]
    cache_path = _tfds_cache_path(cache_dir, name, image_key, label_key, train_split, test_split)
    if cache_path.is_file():
        return _load_cache(cache_path, short_name)

    version_dir = _find_prepared_tfds(name, data_dir)
    if version_dir is None:
        raise FileNotFoundError(
            f"TFDS dataset {name!r} is not prepared in data_dir {str(data_dir)!r} (no "
            f"{short_name}/[config/]version/dataset_info.json there) and not cached at "
            f"{str(cache_path)!r}. {_tfds_help(short_name, data_dir, cache_dir)}"
        )
    info = _read_dataset_info(version_dir)
    formats = [info.get("fileFormat") or "tfrecord", *info.get("alternativeFileFormats", [])]
    if info and not any(f in _RANDOM_ACCESS_FORMATS for f in formats):
        raise FileNotFoundError(
            f"TFDS dataset {name!r} in {str(version_dir)!r} is prepared as {formats}, but "
            f"reading it without TensorFlow needs one of {list(_RANDOM_ACCESS_FORMATS)}. "
            f"{_tfds_help(short_name, data_dir, cache_dir)}"
        )
    split_names = [s.get("name") for s in info.get("splits", [])]
    for arg, split in (("train_split", train_split), ("test_split", test_split)):
        if split_names and split.split("[", 1)[0] not in split_names:
            raise ValueError(
                f"{arg}={split!r} is not a split of {name!r}; it has {split_names}"
            )

    import tensorflow_datasets as tfds  # Deferred: only needed on a cache miss.

    arrays: dict[str, Any] = {}
    num_classes = None
    for prefix, split in (("train", train_split), ("test", test_split)):
        try:
            # download=False: the data is on disk (checked above); never reach the network.
            source = tfds.data_source(name, split=split, data_dir=str(data_dir), download=False)
        except Exception as e:  # tfds raises assorted types; say which dataset and where.
            raise FileNotFoundError(
                f"tfds could not open split {split!r} of {name!r} in {str(data_dir)!r}: "
                f"{type(e).__name__}: {e}. {_tfds_help(short_name, data_dir, cache_dir)}"
            ) from e
        x, y = _source_to_arrays(source, image_key, label_key, what=f"tfds {name!r} {split!r}")
        arrays[f"x_{prefix}"], arrays[f"y_{prefix}"] = x, y
        if num_classes is None:
            num_classes = _tfds_num_classes(source, label_key)
    if num_classes is None:
        num_classes = int(max(arrays["y_train"].max(), arrays["y_test"].max())) + 1
    arrays["num_classes"] = np.int64(num_classes)
    # Validate before caching, so a bad conversion is never cached.
    dataset = _make_dataset(
        _to_unit_float(arrays["x_train"], f"tfds {name!r}"),
        arrays["y_train"],
        _to_unit_float(arrays["x_test"], f"tfds {name!r}"),
        arrays["y_test"],
        num_classes,
        short_name,
    )
    _save_cache(cache_path, arrays)
    return dataset


def _tfds_num_classes(source: Any, label_key: str) -> int | None:
    """``num_classes`` of the label's ClassLabel feature, when the source carries its info."""
    try:
        n = source.dataset_info.features[label_key].num_classes
    except (AttributeError, KeyError, TypeError):
        return None
    return int(n) if n else None


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
