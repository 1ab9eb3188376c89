"""LlamaLM against an independent numpy forward; KV cache, padding, generation, loaders."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from clax.models.generate import _generate, generate, token_nll, token_windows
from clax.models.llama import KVCache, LlamaConfig, LlamaLM, RopeScaling, rope_frequencies
from clax.models.llama_io import (
    llama_config_from_hf,
    load_llama_safetensors,
    save_llama_safetensors,
    unpermute_rotary,
)
from clax.models.registry import make_model
from tests.models.llama_reference import llama_forward, random_hf_weights

safetensors_numpy = pytest.importorskip("safetensors.numpy")

# float32 model vs float64 reference through 2 blocks of O(1) activations: relative
# rounding ~1e-6 per op, a few hundred ops deep; 2e-4 absolute on O(1) logits is ample
# and far below the effect of any wrong sign, permutation or missing term.
ATOL = 2e-4

SHAPES = dict(vocab=97, dim=32, depth=2, num_heads=4, num_kv_heads=2, hidden=48)


def _checkpoint(tmp_path, *, tied, qkv_bias, theta=10000.0, seed=0):
    w = random_hf_weights(np.random.default_rng(seed), tied=tied, qkv_bias=qkv_bias,
                          **SHAPES)
    safetensors_numpy.save_file(w, str(tmp_path / "model.safetensors"))
    cfg = {"model_type": "qwen2" if qkv_bias else "llama", "vocab_size": SHAPES["vocab"],
           "hidden_size": SHAPES["dim"], "num_hidden_layers": SHAPES["depth"],
           "num_attention_heads": SHAPES["num_heads"],
           "num_key_value_heads": SHAPES["num_kv_heads"],
           "intermediate_size": SHAPES["hidden"], "rms_norm_eps": 1e-5, "rope_theta": theta,
           "max_position_embeddings": 64, "tie_word_embeddings": tied}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return w


@nnx.jit
def _logits(model, tokens):
    return model(tokens)


def _reference(w, tokens, theta=10000.0, inv_freq=None):
    return llama_forward(w, tokens, depth=SHAPES["depth"], num_heads=SHAPES["num_heads"],
                         num_kv_heads=SHAPES["num_kv_heads"], theta=theta, eps=1e-5,
                         inv_freq=inv_freq)


@pytest.mark.parametrize("tied,qkv_bias", [(True, False), (False, False), (True, True)])
def test_safetensors_checkpoint_matches_numpy_forward(tmp_path, tied, qkv_bias):
    w = _checkpoint(tmp_path, tied=tied, qkv_bias=qkv_bias)
    model = load_llama_safetensors(tmp_path)
    assert model.config.tie_embeddings == tied and model.config.qkv_bias == qkv_bias
    tokens = np.array([3, 17, 42, 5, 96, 0, 11, 11], np.int32)
    got = np.asarray(_logits(model, jnp.asarray(tokens)[None]))[0]
    np.testing.assert_allclose(got, _reference(w, tokens), atol=ATOL, rtol=0)


def test_save_load_round_trip_is_exact(tmp_path):
    model = LlamaLM(config=LlamaConfig(tie_embeddings=False, qkv_bias=True),
                    rngs=nnx.Rngs(4))
    save_llama_safetensors(model, tmp_path)
    back = load_llama_safetensors(tmp_path)
    assert back.config == model.config
    jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(model, nnx.Param)),
                 nnx.to_pure_dict(nnx.state(back, nnx.Param)))


def test_kv_cache_decoding_equals_full_forward():
    model = LlamaLM(config=LlamaConfig(max_len=32), rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 11), 0, 256)
    full = _logits(model, tokens)
    cache = KVCache.empty(model.config, 2, 16)
    parts = []
    logits, cache = model.forward(tokens[:, :5], cache=cache)
    parts.append(logits)
    for i in range(5, 11):
        logits, cache = model.forward(tokens[:, i:i + 1], cache=cache)
        parts.append(logits)
    # Same arithmetic in a different order (masked slots add exact zeros): float32 level.
    np.testing.assert_allclose(jnp.concatenate(parts, 1), full, atol=1e-5, rtol=0)
    assert int(cache.index) == 11 and cache.positions.tolist() == [11, 11]


def test_left_padding_is_masked_exactly():
    model = LlamaLM(config=LlamaConfig(max_len=32), rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(2), (2, 7), 0, 256)
    pad = jnp.concatenate([jnp.full((2, 4), 9), tokens], axis=1)
    mask = jnp.concatenate([jnp.zeros((2, 4), bool), jnp.ones((2, 7), bool)], axis=1)
    padded, _ = model.forward(pad, attention_mask=mask)
    # Masked keys add exact zeros, but the softmax sums run over another length, so the
    # summation order (vectorisation) may differ by CPU: float32 rounding of O(1) logits.
    np.testing.assert_allclose(padded[:, 4:], _logits(model, tokens), atol=1e-5, rtol=0)


def test_greedy_generation_equals_argmax_loop_and_compiles_once_per_bucket():
    model = LlamaLM(config=LlamaConfig(max_len=64), rngs=nnx.Rngs(5))
    prompts = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9]]
    out = generate(model, prompts, max_new_tokens=5)
    for p, o in zip(prompts, out, strict=True):
        seq = list(p)
        for _ in range(5):
            # Right padding to one length (one compile): causal, so it cannot change the
            # logits at the last real position.
            padded = jnp.asarray([seq + [0] * (16 - len(seq))])
            seq.append(int(jnp.argmax(_logits(model, padded)[0, len(seq) - 1])))
        assert o == seq[len(p):]
    before = _generate._cache_size()
    generate(model, [[4, 4], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]], max_new_tokens=5)
    assert _generate._cache_size() == before, "recompiled for prompts in the same bucket"


def test_sampling_respects_top_k_and_eos():
    model = LlamaLM(config=LlamaConfig(max_len=64), rngs=nnx.Rngs(5))
    prompt = [[1, 2, 3]]
    logits = np.asarray(_logits(model, jnp.asarray(prompt)))[0, -1]
    top = set(np.argsort(logits)[-3:].tolist())
    for seed in range(5):
        first = generate(model, prompt, max_new_tokens=1, temperature=1.5, top_k=3,
                         seed=seed)[0][0]
        assert first in top
    greedy = generate(model, prompt, max_new_tokens=6)[0]
    cut = generate(model, prompt, max_new_tokens=6, eos_id=greedy[1])[0]
    assert cut == greedy[: greedy.index(greedy[1]) + 1]


def test_token_windows_predict_every_token_once():
    ids = np.arange(1, 24)
    tokens, weights = token_windows(ids, 5, pad_id=0)
    predicted = [int(t) for row, wr in zip(tokens, weights, strict=True)
                 for t, x in zip(row, wr, strict=True) if x]
    assert predicted == ids[1:].tolist()


def test_token_nll_equals_direct_computation():
    model = LlamaLM(config=LlamaConfig(max_len=64), rngs=nnx.Rngs(2))
    ids = np.random.default_rng(0).integers(0, 256, size=40)
    nll, count = token_nll(model, ids, context=41, batch_size=2)
    logp = jax.nn.log_softmax(_logits(model, jnp.asarray(ids[None, :-1])), axis=-1)[0]
    direct = -np.mean(np.take_along_axis(np.asarray(logp), ids[1:, None], 1))
    assert count == 39
    np.testing.assert_allclose(nll, direct, rtol=1e-5)


def test_unpermute_inverts_llama_cpp_permutation():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4 * 8, 6))

    def llama_cpp_permute(w, n_head):  # convert_hf_to_gguf.py's permute
        return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
                .swapaxes(1, 2).reshape(w.shape))

    np.testing.assert_array_equal(unpermute_rotary(llama_cpp_permute(w, 4), 4), w)
    b = rng.standard_normal(32)
    np.testing.assert_array_equal(unpermute_rotary(llama_cpp_permute(b, 4), 4), b)


def test_llama3_rope_scaling_matches_transcription():
    cfg = LlamaConfig(dim=128, num_heads=2, rope_theta=500000.0,
                      rope_scaling=RopeScaling(32.0, 1.0, 4.0, 8192))
    hd = 64
    inv = 1.0 / 500000.0 ** (np.arange(0, hd, 2) / hd)
    expect = []
    for f in inv:  # Hugging Face _compute_llama3_parameters, loop form
        wavelen = 2 * np.pi / f
        if wavelen < 8192 / 4.0:
            expect.append(f)
        elif wavelen > 8192 / 1.0:
            expect.append(f / 32.0)
        else:
            s = (8192 / wavelen - 1.0) / (4.0 - 1.0)
            expect.append((1 - s) * f / 32.0 + s * f)
    np.testing.assert_allclose(rope_frequencies(cfg), expect, rtol=1e-6)


def test_bfloat16_forward_is_close_to_float32():
    cfg = LlamaConfig(max_len=32)
    m32 = LlamaLM(config=cfg, rngs=nnx.Rngs(0))
    m16 = LlamaLM(config=cfg.replace(dtype="bfloat16", param_dtype="bfloat16"),
                  rngs=nnx.Rngs(0))
    # The same weights rounded to bfloat16 (random init in bfloat16 draws other values).
    nnx.update(m16, jax.tree.map(lambda x: x.astype(jnp.bfloat16), nnx.state(m32, nnx.Param)))
    tokens = jnp.arange(10)[None]
    a, b = _logits(m32, tokens), _logits(m16, tokens)
    assert b.dtype == jnp.float32
    # bfloat16 keeps 8 bits of mantissa: ~4e-3 relative per value.
    np.testing.assert_allclose(b, a, atol=0.05 * float(jnp.abs(a).max()))


def test_registry_builds_llama_with_overrides():
    m = make_model("llama", input_shape=(24,), num_classes=50, dim=16, num_heads=2,
                   num_kv_heads=1, hidden_dim=32, depth=1)
    assert m.config.max_len == 24 and m.config.vocab_size == 50 and len(m.layers) == 1
    assert _logits(m, jnp.zeros((1, 24), jnp.int32)).shape == (1, 24, 50)
    with pytest.raises(ValueError, match="unknown keyword"):
        make_model("llama", input_shape=(24,), num_classes=50, widths=(3,))


def test_sharding_names_on_kernels():
    m = LlamaLM(config=LlamaConfig(tie_embeddings=False), rngs=nnx.Rngs(0))
    specs = nnx.get_partition_spec(nnx.state(m, nnx.Param))
    assert tuple(specs["layers"][0]["self_attn"]["q_proj"]["kernel"].value) == ("embed", "heads")
    assert tuple(specs["layers"][0]["mlp"]["down_proj"]["kernel"].value) == ("mlp", "embed")
    assert tuple(specs["embed_tokens"]["embedding"].value) == ("vocab", "embed")
    assert tuple(specs["lm_head"]["kernel"].value) == ("embed", "vocab")


def test_bad_input_messages(tmp_path):
    model = LlamaLM(config=LlamaConfig(max_len=8), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="exceeds the model's max_len=8"):
        model(jnp.zeros((1, 9), jnp.int32))
    with pytest.raises(ValueError, match="num_kv_heads"):
        LlamaConfig(num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        llama_config_from_hf({"model_type": "gpt2"})
    with pytest.raises(ValueError, match="rope_scaling type 'yarn'"):
        llama_config_from_hf({"model_type": "llama", "hidden_size": 8,
                              "num_hidden_layers": 1, "num_attention_heads": 2,
                              "intermediate_size": 8, "vocab_size": 8,
                              "rope_scaling": {"rope_type": "yarn", "factor": 2.0}})
    w = _checkpoint(tmp_path, tied=True, qkv_bias=False)
    del w["model.layers.1.mlp.up_proj.weight"]
    safetensors_numpy.save_file(w, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing tensor\(s\) \['model.layers.1.mlp.up_proj"):
        load_llama_safetensors(tmp_path)
    w = _checkpoint(tmp_path, tied=True, qkv_bias=False)
    w["model.layers.0.mlp.up_proj.weight"] = w["model.layers.0.mlp.up_proj.weight"][:-1]
    safetensors_numpy.save_file(w, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="'model.layers.0.mlp.up_proj.weight' has shape"):
        load_llama_safetensors(tmp_path)
    with pytest.raises(ValueError, match="exceeds the model's max_len"):
        generate(model, [[1, 2, 3]], max_new_tokens=8, prompt_buckets=(4,))


def test_bfloat16_checkpoint_loads_exactly(tmp_path):
    # Real Llama / Qwen checkpoints are stored in bfloat16.
    safetensors_flax = pytest.importorskip("safetensors.flax")
    w = _checkpoint(tmp_path, tied=True, qkv_bias=False)
    safetensors_flax.save_file({k: jnp.asarray(v, jnp.bfloat16) for k, v in w.items()},
                               str(tmp_path / "model.safetensors"))
    model = load_llama_safetensors(tmp_path, param_dtype="bfloat16")
    got = model.layers[0].self_attn.q_proj.kernel[...]
    assert got.dtype == jnp.bfloat16
    want = jnp.asarray(w["model.layers.0.self_attn.q_proj.weight"], jnp.bfloat16).T
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    # Saved back in bfloat16 (the file stays half the float32 size) and read back exactly.
    out = tmp_path / "saved"
    save_llama_safetensors(model, out)
    with safetensors_flax.safe_open(str(out / "model.safetensors"), "flax") as f:
        assert f.get_tensor("model.layers.0.self_attn.q_proj.weight").dtype == jnp.bfloat16
    back = load_llama_safetensors(out)  # the caller picks the dtype: float32 by default
    assert back.config.param_dtype == "float32"
    np.testing.assert_array_equal(np.asarray(back.layers[0].self_attn.q_proj.kernel[...],
                                             np.float32), np.asarray(got, np.float32))


def _write_gguf(path, w, arch, *, permute):
    """A tiny F32 GGUF as llama.cpp's converter writes it (Q/K rows permuted for llama)."""
    gguf = pytest.importorskip("gguf")

    def llama_cpp_permute(x, n_head):  # convert_hf_to_gguf.py's permute
        return (x.reshape(n_head, 2, x.shape[0] // n_head // 2, *x.shape[1:])
                .swapaxes(1, 2).reshape(x.shape))

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_uint32(f"{arch}.embedding_length", SHAPES["dim"])
    writer.add_uint32(f"{arch}.block_count", SHAPES["depth"])
    writer.add_uint32(f"{arch}.attention.head_count", SHAPES["num_heads"])
    writer.add_uint32(f"{arch}.attention.head_count_kv", SHAPES["num_kv_heads"])
    writer.add_uint32(f"{arch}.feed_forward_length", SHAPES["hidden"])
    writer.add_uint32(f"{arch}.context_length", 64)
    writer.add_uint32(f"{arch}.vocab_size", SHAPES["vocab"])
    writer.add_float32(f"{arch}.rope.freq_base", 10000.0)
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)
    block = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
             "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for name, x in w.items():
        if name == "model.embed_tokens.weight":
            out = "token_embd.weight"
        elif name == "model.norm.weight":
            out = "output_norm.weight"
        else:
            _, _, i, rest = name.split(".", 3)
            mod, kind = rest.rsplit(".", 1)
            out = f"blk.{i}.{block[mod]}.{kind}"
            if permute and mod == "self_attn.q_proj":
                x = llama_cpp_permute(x, SHAPES["num_heads"])
            elif permute and mod == "self_attn.k_proj":
                x = llama_cpp_permute(x, SHAPES["num_kv_heads"])
        writer.add_tensor(out, np.ascontiguousarray(x, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("arch,qkv_bias", [("llama", False), ("qwen2", True)])
def test_gguf_import_matches_numpy_forward(tmp_path, arch, qkv_bias):
    # llama.cpp permutes Q/K for the llama architecture only (qwen2 keeps the HF layout).
    from clax.models.llama_io import load_llama_gguf

    w = random_hf_weights(np.random.default_rng(3), tied=True, qkv_bias=qkv_bias, **SHAPES)
    _write_gguf(tmp_path / "m.gguf", w, arch, permute=arch == "llama")
    model = load_llama_gguf(tmp_path / "m.gguf")
    assert model.config.qkv_bias == qkv_bias
    tokens = np.array([1, 5, 9, 2, 77, 3], np.int32)
    got = np.asarray(_logits(model, jnp.asarray(tokens)[None]))[0]
    np.testing.assert_allclose(got, _reference(w, tokens), atol=ATOL, rtol=0)


def test_transformers_5_rope_parameters_are_read():
    base = {"model_type": "llama", "hidden_size": 8, "num_hidden_layers": 1,
            "num_attention_heads": 2, "intermediate_size": 8, "vocab_size": 8}
    cfg = llama_config_from_hf({**base, "rope_parameters": {"rope_theta": 5000.0,
                                                            "rope_type": "default"}})
    assert cfg.rope_theta == 5000.0 and cfg.rope_scaling is None
    cfg = llama_config_from_hf({**base, "rope_parameters": {
        "rope_theta": 500000.0, "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}})
    assert cfg.rope_theta == 500000.0 and cfg.rope_scaling == RopeScaling(32.0, 1.0, 4.0, 8192)


def test_generation_fits_the_bucket_to_max_len_and_checks_ids():
    model = LlamaLM(config=LlamaConfig(max_len=16), rngs=nnx.Rngs(0))
    assert len(generate(model, [[1, 2]], max_new_tokens=4)[0]) == 4  # bucket 16 capped to 12
    with pytest.raises(ValueError, match=r"token ids outside \[0, 256\)"):
        generate(model, [[1, 300]], max_new_tokens=2)
    with pytest.raises(ValueError, match="prompt_buckets must be a non-empty"):
        generate(model, [[1]], max_new_tokens=2, prompt_buckets=())
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        token_nll(model, np.arange(10), context=8, batch_size=0)
    with pytest.raises(ValueError, match="token ids outside"):
        token_nll(model, np.array([1, 2, -1]), context=8)
