"""Tests for clax.data.sources: digits, IDX files, TFDS (offline) and the registry."""

import gzip
import json
import os
import struct
import time
from pathlib import Path

import numpy as np
import pytest

from clax import data
from clax.data import sources, tfds_source

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


# --------------------------------------------------------------------------------------
# digits


def test_digits_shapes_ranges_and_split():
    ds = data.load_digits()
    assert ds.name == "digits" and ds.num_classes == 10
    assert ds.x_train.shape[1:] == (8, 8, 1) and ds.x_test.shape[1:] == (8, 8, 1)
    assert len(ds.x_train) + len(ds.x_test) == 1797
    assert len(ds.x_train) == len(ds.y_train) and len(ds.x_test) == len(ds.y_test)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
    assert ds.y_test.dtype == np.int32
    for x in (ds.x_train, ds.x_test):
        assert x.min() >= 0.0 and x.max() <= 1.0
    assert ds.x_train.max() == 1.0  # 16/16: scaled, not left in 0..16.
    # Stratified: every class is in both splits, ~20% of each in test.
    for c in range(10):
        n_train, n_test = (ds.y_train == c).sum(), (ds.y_test == c).sum()
        assert abs(n_test / (n_train + n_test) - 0.2) < 0.01


def test_digits_deterministic_given_seed():
    a, b, c = data.load_digits(seed=3), data.load_digits(seed=3), data.load_digits(seed=4)
    for field in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert a.x_test.shape == c.x_test.shape  # Same class counts ...
    assert not np.array_equal(a.x_test, c.x_test)  # ... but different examples.


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, "0.2"])
def test_digits_rejects_bad_test_fraction(bad):
    with pytest.raises(ValueError, match="test_fraction"):
        data.load_digits(test_fraction=bad)


# --------------------------------------------------------------------------------------
# IDX

_IDX_CODES = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C, np.float32: 0x0D}


def _idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file built by hand from the format spec (independent of the reader)."""
    code = _IDX_CODES[array.dtype.type]
    header = struct.pack(">BBBB", 0, 0, code, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def _write_idx(path: Path, array: np.ndarray, gz: bool) -> None:
    raw = _idx_bytes(array)
    if gz:
        path = path.with_name(path.name + ".gz")
        raw = gzip.compress(raw)
    path.write_bytes(raw)


def _write_idx_folder(root: Path, rng, gz: bool):
    root.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (12, 5, 7), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 4, 12, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (6, 5, 7), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 4, 6, dtype=np.uint8),
    }
    arrays["train-labels-idx1-ubyte"][0] = 5  # So num_classes = 6 from max(label) + 1.
    arrays["train-images-idx3-ubyte"][0, 0, 0] = 255
    for name, array in arrays.items():
        _write_idx(root / name, array, gz)
    return arrays


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
def test_idx_round_trip(tmp_path, gz):
    arrays = _write_idx_folder(tmp_path, np.random.default_rng(0), gz)
    ds = data.load_idx(tmp_path, name="toy")
    assert ds.name == "toy" and ds.num_classes == 6
    assert ds.x_train.shape == (12, 5, 7, 1) and ds.x_test.shape == (6, 5, 7, 1)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
    np.testing.assert_array_equal(
        ds.x_train[..., 0], arrays["train-images-idx3-ubyte"].astype(np.float32) / 255
    )
    np.testing.assert_array_equal(
        ds.x_test[..., 0], arrays["t10k-images-idx3-ubyte"].astype(np.float32) / 255
    )
    np.testing.assert_array_equal(ds.y_train, arrays["train-labels-idx1-ubyte"])
    np.testing.assert_array_equal(ds.y_test, arrays["t10k-labels-idx1-ubyte"])
    assert ds.x_train.max() == 1.0


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int32, np.float32])
def test_read_idx_other_types_are_big_endian(tmp_path, dtype):
    # Values over 255 / negative catch a wrong byte order or element size.
    array = (np.arange(24).reshape(2, 3, 4) * 37 - 300).astype(dtype)
    if dtype == np.int8:
        array = (np.arange(24).reshape(2, 3, 4) - 12).astype(dtype)
    (tmp_path / "a.idx").write_bytes(_idx_bytes(array))
    out = data.read_idx(tmp_path / "a.idx")
    assert out.dtype == np.dtype(dtype) and out.shape == array.shape
    np.testing.assert_array_equal(out, array)


def test_idx_bad_magic_number(tmp_path):
    _write_idx_folder(tmp_path, np.random.default_rng(0), gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    raw = bytearray(path.read_bytes())
    raw[0:4] = b"\x01\x02\x08\x03"
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="magic number 0x01020803") as e:
        data.load_idx(tmp_path)
    assert str(path) in str(e.value)


def test_idx_unknown_type_code(tmp_path):
    (tmp_path / "x.idx").write_bytes(b"\x00\x00\x07\x01" + struct.pack(">I", 1) + b"\x00")
    with pytest.raises(ValueError, match="magic number"):
        data.read_idx(tmp_path / "x.idx")


def test_idx_truncated_data(tmp_path):
    raw = _idx_bytes(np.zeros((4, 3, 3), np.uint8))
    (tmp_path / "x.idx").write_bytes(raw[:-1])
    with pytest.raises(ValueError, match="35 data bytes .* needs 36"):
        data.read_idx(tmp_path / "x.idx")


def test_idx_missing_folder_names_path_and_how_to_get_data(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as e:
        data.load_idx(missing)
    assert str(missing) in str(e.value)
    assert "dataset-fashion-mnist" in str(e.value)


def test_idx_missing_file_names_it(tmp_path):
    _write_idx_folder(tmp_path, np.random.default_rng(0), gz=True)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte") as e:
        data.load_idx(tmp_path)
    assert str(tmp_path) in str(e.value)


def test_idx_label_count_mismatch(tmp_path):
    _write_idx_folder(tmp_path, np.random.default_rng(0), gz=False)
    _write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(11, np.uint8), gz=False)
    with pytest.raises(ValueError, match="labels must be"):
        data.load_idx(tmp_path)


def test_idx_garbage_labels_with_a_valid_header_are_refused(tmp_path):
    rng = np.random.default_rng(0)
    _write_idx_folder(tmp_path, rng, gz=False)
    for name, n in (("train-labels-idx1-ubyte", 12), ("t10k-labels-idx1-ubyte", 6)):
        _write_idx(tmp_path / name, rng.integers(0, 256, n, dtype=np.uint8), gz=False)
    with pytest.raises(ValueError, match=r"do not look like class labels: labels up to \d+ "
                                         r"give \d+ classes"):
        data.load_idx(tmp_path)


@pytest.fixture(scope="module")
def fashion_mnist():
    if not FASHION_MNIST_DIR.is_dir():
        pytest.skip(f"{FASHION_MNIST_DIR} absent (apt-get install dataset-fashion-mnist)")
    return data.load_fashion_mnist()


def test_fashion_mnist_from_debian_package(fashion_mnist):
    ds = fashion_mnist
    assert ds.name == "fashion_mnist" and ds.num_classes == 10
    assert ds.x_train.shape == (60000, 28, 28, 1) and ds.x_test.shape == (10000, 28, 28, 1)
    assert ds.y_train.shape == (60000,) and ds.y_test.shape == (10000,)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
    assert 0.0 <= ds.x_train.min() and ds.x_train.max() == 1.0
    # Fashion-MNIST is balanced: 6000 / 1000 images of each class.
    np.testing.assert_array_equal(np.bincount(ds.y_train), np.full(10, 6000))
    np.testing.assert_array_equal(np.bincount(ds.y_test), np.full(10, 1000))


# --------------------------------------------------------------------------------------
# TFDS (offline)


def _fake_prepared(data_dir: Path, name="mnist", version="3.0.1", fmt="array_record"):
    """The metadata file that marks a dataset as prepared (no records needed here)."""
    version_dir = data_dir / name / version
    version_dir.mkdir(parents=True)
    info = {"name": name, "version": version, "fileFormat": fmt,
            "splits": [{"name": "train"}, {"name": "test"}]}
    (version_dir / "dataset_info.json").write_text(json.dumps(info))
    return version_dir


def test_tfds_not_prepared_fails_fast_offline(tmp_path):
    data_dir, cache_dir = tmp_path / "tfds", tmp_path / "cache"
    start = time.monotonic()
    with pytest.raises(FileNotFoundError) as e:
        data.load_tfds("mnist", data_dir=data_dir, cache_dir=cache_dir)
    assert time.monotonic() - start < 10
    message = str(e.value)
    assert str(data_dir) in message and str(cache_dir) in message
    assert "tfds build mnist" in message and "clax[prepare]" in message


def test_tfds_default_dirs_come_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "env_tfds"))
    monkeypatch.setenv("CLAX_CACHE_DIR", str(tmp_path / "env_cache"))
    start = time.monotonic()
    with pytest.raises(FileNotFoundError) as e:
        data.load_source("tfds", name="cifar10")
    assert time.monotonic() - start < 10
    assert str(tmp_path / "env_tfds") in str(e.value)
    assert str(tmp_path / "env_cache" / "tfds") in str(e.value)


def test_tfds_prepared_without_random_access_format(tmp_path):
    _fake_prepared(tmp_path / "tfds", fmt="tfrecord")
    with pytest.raises(FileNotFoundError, match="array_record"):
        data.load_tfds("mnist", data_dir=tmp_path / "tfds", cache_dir=tmp_path / "cache")


def test_tfds_finds_config_and_version_folders(tmp_path):
    root = tmp_path / "tfds"
    for rel in ("ds/1.0.0", "ds/2.0.0", "ds/10.0.0", "cfgds/small/1.2.0"):
        (root / rel).mkdir(parents=True)
        (root / rel / "dataset_info.json").write_text("{}")
    find = tfds_source._find_prepared_tfds
    assert find("ds", root) == root / "ds/10.0.0"  # Highest version, compared as numbers.
    assert find("ds:2.0.0", root) == root / "ds/2.0.0"
    assert find("ds:3.0.0", root) is None
    assert find("cfgds", root) == root / "cfgds/small/1.2.0"
    assert find("cfgds/small", root) == root / "cfgds/small/1.2.0"
    assert find("cfgds/small:1.*.*", root) == root / "cfgds/small/1.2.0"
    assert find("cfgds/large", root) is None
    assert find("other", root) is None
    with pytest.raises(ValueError, match="dataset/config"):
        find("../etc", root)


def test_tfds_uses_cached_npz_without_calling_tfds(tmp_path, monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")

    def no_tfds(*args, **kwargs):
        raise AssertionError("tfds.data_source must not be called when the cache exists")

    monkeypatch.setattr(tfds, "data_source", no_tfds)
    rng = np.random.default_rng(0)
    cached = {
        "x_train": rng.integers(0, 256, (5, 4, 4, 3), dtype=np.uint8),
        "y_train": np.array([0, 1, 2, 1, 0]),
        "x_test": rng.integers(0, 256, (2, 4, 4, 3), dtype=np.uint8),
        "y_test": np.array([2, 0]),
        "num_classes": np.int64(7),
    }
    (tmp_path / "cache").mkdir()
    np.savez(tmp_path / "cache" / "mnist.npz", **cached)
    ds = data.load_tfds("mnist", data_dir=tmp_path / "missing", cache_dir=tmp_path / "cache")
    assert ds.name == "mnist" and ds.num_classes == 7
    np.testing.assert_array_equal(ds.x_train, cached["x_train"].astype(np.float32) / 255)
    np.testing.assert_array_equal(ds.y_test, cached["y_test"])
    assert ds.y_train.dtype == np.int32


def test_tfds_mock_data_end_to_end(tmp_path, monkeypatch):
    """tfds.testing.mock_data works for tfds.data_source without TensorFlow (checked).

    mock_data ignores data_dir and fakes the records, but load_tfds first looks for the
    prepared files on disk, so a stub dataset_info.json stands in for them.
    """
    tfds = pytest.importorskip("tensorflow_datasets")
    data_dir, cache_dir = tmp_path / "tfds", tmp_path / "cache"
    _fake_prepared(data_dir)
    with tfds.testing.mock_data(num_examples=12):
        ds = data.load_tfds("mnist", data_dir=data_dir, cache_dir=cache_dir)
        expected = tfds.data_source("mnist", split="train")
        expected_images = np.stack([expected[i]["image"] for i in range(12)])
        expected_labels = np.array([expected[i]["label"] for i in range(12)])
    assert ds.name == "mnist" and ds.num_classes == 10  # From the ClassLabel feature.
    assert ds.x_train.shape == (12, 28, 28, 1) and ds.x_test.shape == (12, 28, 28, 1)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
    np.testing.assert_array_equal(ds.x_train, expected_images.astype(np.float32) / 255)
    np.testing.assert_array_equal(ds.y_train, expected_labels)
    assert (cache_dir / "mnist.npz").is_file()

    # Second load: from the npz, tfds untouched.
    def no_tfds(*args, **kwargs):
        raise AssertionError("tfds.data_source called despite the cache")

    monkeypatch.setattr(tfds, "data_source", no_tfds)
    again = data.load_tfds("mnist", data_dir=data_dir, cache_dir=cache_dir)
    for field in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(again, field), getattr(ds, field))
    assert again.num_classes == 10


def test_source_to_arrays_on_fake_source():
    records = [{"image": np.full((3, 2), i, np.uint8), "label": np.int64(i % 2)} for i in range(5)]
    x, y = tfds_source._source_to_arrays(records, "image", "label", what="fake", batch_size=2)
    assert x.shape == (5, 3, 2, 1) and x.dtype == np.uint8  # (H, W) gets a channel axis.
    np.testing.assert_array_equal(x[:, 0, 0, 0], np.arange(5))
    np.testing.assert_array_equal(y, [0, 1, 0, 1, 0])
    with pytest.raises(ValueError, match="image_key='img'"):
        tfds_source._source_to_arrays(records, "img", "label", what="fake")
    records[3] = {"image": np.zeros((4, 2), np.uint8), "label": 0}
    with pytest.raises(ValueError, match="one shape"):
        tfds_source._source_to_arrays(records, "image", "label", what="fake")


# --------------------------------------------------------------------------------------
# Registry


def test_sources_registry_names():
    assert set(data.SOURCES) == {"digits", "idx", "fashion_mnist", "tfds"}


def test_load_source_unknown_name_lists_choices():
    with pytest.raises(ValueError, match="unknown data source 'mnist'") as e:
        data.load_source("mnist")
    for name in ("digits", "idx", "fashion_mnist", "tfds"):
        assert name in str(e.value)


def test_load_source_unknown_kwarg_lists_valid_arguments():
    with pytest.raises(ValueError, match=r"\['colour'\]") as e:
        data.load_source("digits", colour=True)
    assert "test_fraction" in str(e.value) and "seed" in str(e.value)


def test_load_source_missing_required_argument():
    with pytest.raises(ValueError, match=r"needs argument\(s\) \['root'\]"):
        data.load_source("idx")


def test_load_source_passes_kwargs(tmp_path):
    _write_idx_folder(tmp_path, np.random.default_rng(1), gz=True)
    assert data.load_source("idx", root=str(tmp_path), name="toy").x_train.shape == (12, 5, 7, 1)
    a, b = data.load_source("digits", seed=5), data.load_digits(seed=5)
    np.testing.assert_array_equal(a.x_test, b.x_test)


def test_public_names_exported():
    for name in data.__all__:
        assert hasattr(data, name), name
    assert os.path.basename(sources.__file__) == "sources.py"
