"""An independent numpy forward of a Llama-architecture model, for tests.

Takes weights by Hugging Face name in PyTorch layout (``(out, in)``), computes in float64,
and supports both RoPE conventions: ``"half"`` (Hugging Face: the two halves of a head
are the rotated pairs) and ``"interleaved"`` (llama.cpp / Meta: adjacent coordinates are
the pairs), so GGUF files can be checked on their raw, permuted Q/K weights.
"""

from __future__ import annotations

import numpy as np


def _rms(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _rope(x, pos, theta, inv_freq, mode):
    # x: (L, H, hd)
    hd = x.shape[-1]
    if inv_freq is None:
        inv_freq = 1.0 / theta ** (np.arange(0, hd, 2) / hd)
    ang = pos[:, None] * inv_freq[None, :]  # (L, hd/2)
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    if mode == "half":
        a, b = x[..., : hd // 2], x[..., hd // 2:]
        return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)
    a, b = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = a * cos - b * sin
    out[..., 1::2] = b * cos + a * sin
    return out


def llama_forward(w: dict[str, np.ndarray], tokens: np.ndarray, *, depth: int,
                  num_heads: int, num_kv_heads: int, theta: float, eps: float,
                  rope: str = "half", inv_freq: np.ndarray | None = None) -> np.ndarray:
    """Logits ``(L, vocab)`` of one sequence ``tokens`` ``(L,)``."""
    w = {k: np.asarray(v, np.float64) for k, v in w.items()}
    emb = w["model.embed_tokens.weight"]
    h = emb[tokens]
    seq = len(tokens)
    pos = np.arange(seq, dtype=np.float64)
    causal = np.tril(np.ones((seq, seq), bool))
    for i in range(depth):
        p = f"model.layers.{i}."
        x = _rms(h, w[p + "input_layernorm.weight"], eps)

        def proj(name, x=x, p=p):
            y = x @ w[p + f"self_attn.{name}.weight"].T
            b = w.get(p + f"self_attn.{name}.bias")
            return y if b is None else y + b

        q = proj("q_proj").reshape(seq, num_heads, -1)
        k = proj("k_proj").reshape(seq, num_kv_heads, -1)
        v = proj("v_proj").reshape(seq, num_kv_heads, -1)
        hd = q.shape[-1]
        q, k = _rope(q, pos, theta, inv_freq, rope), _rope(k, pos, theta, inv_freq, rope)
        rep = num_heads // num_kv_heads
        k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
        s = np.einsum("lhd,shd->hls", q, k) / np.sqrt(hd)
        s = np.where(causal[None], s, -np.inf)
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        o = np.einsum("hls,shd->lhd", s, v).reshape(seq, -1)
        h = h + o @ w[p + "self_attn.o_proj.weight"].T
        x = _rms(h, w[p + "post_attention_layernorm.weight"], eps)
        g = x @ w[p + "mlp.gate_proj.weight"].T
        u = x @ w[p + "mlp.up_proj.weight"].T
        h = h + ((g / (1 + np.exp(-g))) * u) @ w[p + "mlp.down_proj.weight"].T
    h = _rms(h, w["model.norm.weight"], eps)
    head = w.get("lm_head.weight", emb)
    return h @ head.T


def random_hf_weights(rng: np.random.Generator, *, vocab: int, dim: int, depth: int,
                      num_heads: int, num_kv_heads: int, hidden: int, tied: bool,
                      qkv_bias: bool) -> dict[str, np.ndarray]:
    """A random checkpoint in the Hugging Face layout (float32, ``(out, in)``)."""
    hd = dim // num_heads

    def r(*shape, s=0.1):
        return (rng.standard_normal(shape) * s).astype(np.float32)

    w = {"model.embed_tokens.weight": r(vocab, dim, s=0.5),
         "model.norm.weight": (1 + r(dim)).astype(np.float32)}
    if not tied:
        w["lm_head.weight"] = r(vocab, dim)
    for i in range(depth):
        p = f"model.layers.{i}."
        w[p + "self_attn.q_proj.weight"] = r(num_heads * hd, dim)
        w[p + "self_attn.k_proj.weight"] = r(num_kv_heads * hd, dim)
        w[p + "self_attn.v_proj.weight"] = r(num_kv_heads * hd, dim)
        w[p + "self_attn.o_proj.weight"] = r(dim, num_heads * hd)
        if qkv_bias:
            w[p + "self_attn.q_proj.bias"] = r(num_heads * hd)
            w[p + "self_attn.k_proj.bias"] = r(num_kv_heads * hd)
            w[p + "self_attn.v_proj.bias"] = r(num_kv_heads * hd)
        w[p + "mlp.gate_proj.weight"] = r(hidden, dim)
        w[p + "mlp.up_proj.weight"] = r(hidden, dim)
        w[p + "mlp.down_proj.weight"] = r(dim, hidden)
        w[p + "input_layernorm.weight"] = (1 + r(dim)).astype(np.float32)
        w[p + "post_attention_layernorm.weight"] = (1 + r(dim)).astype(np.float32)
    return w
