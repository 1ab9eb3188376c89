"""Decoding and scoring for :class:`~clax.models.llama.LlamaLM`: greedy / temperature /
top-k generation with a KV cache, and mean next-token NLL of a long token stream.

Both compile once per configured shape, never per input length:

* :func:`generate` left-pads the prompts to the smallest of ``prompt_buckets`` that fits
  the longest one, so prompts of 5 and 9 tokens share one compiled program; the decode
  loop is a ``lax.fori_loop`` inside the same ``jax.jit``.
* :func:`token_nll` cuts the stream into fixed windows of ``context`` tokens (the last
  padded and masked), scored ``batch_size`` windows per call.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from clax.models.llama import KVCache, LlamaLM

DEFAULT_PROMPT_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048)


def _check_ids(ids: Any, vocab_size: int, what: str) -> None:
    # Out-of-vocabulary ids would index past the embedding table (NaN logits in XLA).
    flat = np.concatenate([np.asarray(row, np.int64).ravel() for row in ids]) if len(ids) \
        else np.zeros(0, np.int64)
    if flat.size and (flat.min() < 0 or flat.max() >= vocab_size):
        raise ValueError(f"{what} hold token ids outside [0, {vocab_size}) (min {flat.min()}, "
                         f"max {flat.max()}): use the model's own tokenizer")


def _bucket(length: int, buckets: Sequence[int], what: str) -> int:
    for b in sorted(buckets):
        if b >= length:
            return b
    raise ValueError(f"{what} of {length} tokens is longer than the largest bucket "
                     f"{max(buckets)}; add a bucket or shorten the input")


@functools.partial(jax.jit, static_argnums=(0,),
                   static_argnames=("max_new_tokens", "temperature", "top_k", "eos_id",
                                    "pad_id"))
def _generate(graphdef: Any, state: Any, tokens: jax.Array, mask: jax.Array, key: jax.Array,
              *, max_new_tokens: int, temperature: float, top_k: int, eos_id: int | None,
              pad_id: int) -> jax.Array:
    model = nnx.merge(graphdef, state)
    b, p = tokens.shape
    cache = KVCache.empty(model.config, b, p + max_new_tokens)

    def pick(logits, key):
        if temperature == 0.0:
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)
        scaled = logits / temperature
        if top_k:
            kth = jax.lax.top_k(scaled, top_k)[0][:, -1:]
            scaled = jnp.where(scaled < kth, -jnp.inf, scaled)
        return jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)

    logits, cache = model.forward(tokens, attention_mask=mask, cache=cache)
    keys = jax.random.split(key, max_new_tokens)
    first = pick(logits[:, -1], keys[0])
    out = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)
    done = (first == eos_id) if eos_id is not None else jnp.zeros((b,), bool)

    def step(i, carry):
        out, cache, done, last = carry
        logits, cache = model.forward(last[:, None], cache=cache)
        nxt = pick(logits[:, -1], keys[i])
        nxt = jnp.where(done, pad_id, nxt)
        out = out.at[:, i].set(nxt)
        if eos_id is not None:
            done = done | (nxt == eos_id)
        return out, cache, done, nxt

    out, *_ = jax.lax.fori_loop(1, max_new_tokens, step, (out, cache, done, first))
    return out


def generate(model: LlamaLM, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             temperature: float = 0.0, top_k: int = 0, seed: int = 0,
             eos_id: int | None = None, pad_id: int = 0,
             prompt_buckets: Sequence[int] = DEFAULT_PROMPT_BUCKETS) -> list[list[int]]:
    """Continues each prompt by up to ``max_new_tokens`` tokens.

    Args:
        model: The language model.
        prompts: Token ids, one list per sequence (lengths may differ).
        max_new_tokens: Tokens to generate per sequence.
        temperature: 0 for greedy decoding, else sampling from ``softmax(logits / T)``.
        top_k: With sampling, keep only the ``top_k`` most likely tokens (0: all).
        seed: Seed of the sampling key.
        eos_id: Stop a sequence after this token (it is included in the output).
        pad_id: Id used for left padding (masked: it never affects the result).
        prompt_buckets: Allowed padded prompt lengths (one compile per bucket used).

    Returns:
        The generated ids per prompt (without the prompt), cut after ``eos_id``.

    Raises:
        ValueError: On empty prompts, a bad option, or prompt + new tokens longer than the
            model's ``max_len``.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty token lists")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
            or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {temperature!r}")
    if top_k < 0 or top_k > model.config.vocab_size:
        raise ValueError(f"top_k must be in [0, vocab_size={model.config.vocab_size}], got "
                         f"{top_k}")
    if not prompt_buckets or any(isinstance(b, bool) or not isinstance(b, int) or b < 1
                                 for b in prompt_buckets):
        raise ValueError(f"prompt_buckets must be a non-empty sequence of positive ints, got "
                         f"{prompt_buckets!r}")
    _check_ids(prompts, model.config.vocab_size, "prompts")
    longest = max(len(p) for p in prompts)
    room = model.config.max_len - max_new_tokens
    if longest > room:
        raise ValueError(f"a prompt of {longest} tokens + max_new_tokens ({max_new_tokens}) "
                         f"exceeds the model's max_len={model.config.max_len}")
    # The bucket, capped by what fits (one more compiled shape at most).
    p = min(_bucket(longest, tuple(prompt_buckets) + (room,), "a prompt"), room)
    tokens = np.full((len(prompts), p), pad_id, np.int32)
    mask = np.zeros((len(prompts), p), bool)
    for i, ids in enumerate(prompts):
        tokens[i, p - len(ids):] = ids
        mask[i, p - len(ids):] = True
    graphdef, state = nnx.split(model)
    out = np.asarray(_generate(graphdef, state, jnp.asarray(tokens), jnp.asarray(mask),
                               jax.random.key(seed), max_new_tokens=max_new_tokens,
                               temperature=float(temperature), top_k=int(top_k),
                               eos_id=eos_id, pad_id=pad_id))
    result = []
    for row in out.tolist():
        if eos_id is not None and eos_id in row:
            row = row[: row.index(eos_id) + 1]
        result.append(row)
    return result


def generate_text(model: LlamaLM, tokenizer: Any, prompt: str, *, max_new_tokens: int = 32,
                  chat: bool = False, **kwargs: Any) -> str:
    """Decoded continuation of one text prompt (``chat=True`` applies the chat template)."""
    if chat:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    ids = tokenizer.encode(prompt)
    kwargs.setdefault("eos_id", tokenizer.eos_id)
    kwargs.setdefault("pad_id", tokenizer.pad_id if tokenizer.pad_id is not None else 0)
    out = generate(model, [ids], max_new_tokens=max_new_tokens, **kwargs)[0]
    return tokenizer.decode(out, skip_special=True)


@functools.partial(jax.jit, static_argnums=(0,))
def _window_nll(graphdef: Any, state: Any, tokens: jax.Array, weights: jax.Array
                ) -> tuple[jax.Array, jax.Array]:
    model = nnx.merge(graphdef, state)
    logits = model(tokens[:, :-1])
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    w = weights[:, 1:]
    return jnp.sum(nll * w), jnp.sum(w)


def token_windows(ids: Sequence[int] | np.ndarray, context: int, *, pad_id: int = 0
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Cuts a token stream into ``(N, context)`` windows and a 0/1 weight of the same shape.

    Consecutive windows overlap by one token, so every token but the first of the stream
    is predicted exactly once (from at most ``context - 1`` tokens of context); the last
    window is padded with ``pad_id`` at weight 0.
    """
    ids = np.asarray(ids, np.int32)
    if ids.ndim != 1 or len(ids) < 2:
        raise ValueError(f"need a 1-D stream of at least 2 tokens, got shape {ids.shape}")
    if context < 2:
        raise ValueError(f"context must be >= 2, got {context}")
    step = context - 1
    n = -(-(len(ids) - 1) // step)
    tokens = np.full((n, context), pad_id, np.int32)
    weights = np.zeros((n, context), np.float32)
    for i in range(n):
        chunk = ids[i * step: i * step + context]
        tokens[i, : len(chunk)] = chunk
        weights[i, 1: len(chunk)] = 1.0
    return tokens, weights


def token_nll(model: LlamaLM, ids: Sequence[int] | np.ndarray, *, context: int = 512,
              batch_size: int = 4, pad_id: int = 0, progress: bool = False
              ) -> tuple[float, int]:
    """Mean next-token negative log-likelihood (nats) of a token stream, and its count.

    Args:
        model: The language model.
        ids: The token stream.
        context: Window length (<= the model's ``max_len``).
        batch_size: Windows per compiled call.
        pad_id: Padding id of the last window (weight 0).
        progress: Print a progress bar to stderr.

    Returns:
        ``(mean NLL, number of predicted tokens)``.
    """
    if context > model.config.max_len:
        raise ValueError(f"context={context} exceeds the model's max_len="
                         f"{model.config.max_len}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    _check_ids([np.asarray(ids)], model.config.vocab_size, "ids")
    tokens, weights = token_windows(ids, context, pad_id=pad_id)
    n = len(tokens)
    pad = (-n) % batch_size
    if pad:
        tokens = np.concatenate([tokens, np.full((pad, context), pad_id, np.int32)])
        weights = np.concatenate([weights, np.zeros((pad, context), np.float32)])
    graphdef, state = nnx.split(model)
    total, count = 0.0, 0.0
    batches = len(tokens) // batch_size
    for i in range(batches):
        s = slice(i * batch_size, (i + 1) * batch_size)
        nll, w = _window_nll(graphdef, state, jnp.asarray(tokens[s]), jnp.asarray(weights[s]))
        total += float(nll)
        count += float(w)
        if progress:
            _bar(i + 1, batches, total / max(count, 1.0))
    if progress:
        print(file=sys.stderr)
    return total / count, int(count)


def _bar(done: int, total: int, nll: float, width: int = 30) -> None:
    fill = int(width * done / total)
    print(f"\r[{'#' * fill}{'.' * (width - fill)}] {done}/{total} windows  nll={nll:.4f}",
          end="", file=sys.stderr, flush=True)
