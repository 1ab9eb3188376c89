"""TensorFlow Datasets source: prepared ArrayRecord data read without TensorFlow.

``tfds.data_source`` reads a dataset that was prepared beforehand (``download_and_prepare``
needs TensorFlow: the ``prepare`` extra). The arrays are converted once and cached as
``.npz``; offline with nothing prepared, `load_tfds` fails within seconds with instructions
instead of waiting on the network.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from clax.data.dataset import Dataset, _make_dataset, _to_unit_float

__all__ = ["load_tfds"]


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
        for i, record in zip(keys, records, strict=False):
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
