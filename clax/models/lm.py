"""A tiny decoder-only (causal) transformer language model.

Small enough for tests and CPU examples: token and learned position embeddings, pre-LN
causal blocks (:class:`~clax.models.vit.TransformerBlock` with ``causal=True``), a final
LayerNorm and an untied output layer. Every projection is an ``nnx.Linear`` applied to
``(B, L, D)`` tokens, so layer-input capture, per-token Fisher and subspace methods see
ordinary 2-D kernels.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from clax.models._checks import check_positive_int
from clax.models.vit import TransformerBlock


class TinyCausalLM(nnx.Module):
    """``model(tokens (B, L) int32, task_ids=None) -> logits (B, L, vocab)``.

    Attributes (read by the training loop): ``input_shape = (max_len,)``,
    ``num_classes = vocab_size`` and ``num_tasks = 1``.

    Parameter paths: ``embed/embedding``, ``pos_embed``, ``blocks/0/attn/query/kernel``,
    ``blocks/0/fc1/kernel``, ``norm/scale``, ``head/kernel``.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        *,
        num_classes: int,
        dim: int = 32,
        depth: int = 2,
        num_heads: int = 2,
        mlp_ratio: int = 2,
        num_tasks: int = 1,
        rngs: nnx.Rngs,
    ):
        """Builds the model.

        Args:
            input_shape: ``(max_len,)``, the longest sequence the positions cover.
            num_classes: The vocabulary size (logits per position).
            dim: Token width; divisible by ``num_heads``.
            depth: Number of transformer blocks.
            num_heads: Attention heads.
            mlp_ratio: Hidden width of the block MLP as a multiple of ``dim``.
            num_tasks: Must be 1 (a language model has one output layer).
            rngs: Random streams for initialisation.

        Raises:
            ValueError: On a malformed argument.
        """
        shape = tuple(input_shape)
        if len(shape) != 1:
            raise ValueError(f"input_shape must be (max_len,) for a language model, got {shape}")
        self.max_len = check_positive_int("input_shape[0]", shape[0])
        self.vocab_size = check_positive_int("num_classes", num_classes)
        if num_tasks != 1:
            raise ValueError(f"num_tasks must be 1 for a language model, got {num_tasks}")
        dim = check_positive_int("dim", dim)
        num_heads = check_positive_int("num_heads", num_heads)
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.input_shape = shape
        self.num_classes = self.vocab_size
        self.num_tasks = 1
        self.feature_dim = dim
        self.embed = nnx.Embed(self.vocab_size, dim, rngs=rngs)
        init = nnx.initializers.truncated_normal(stddev=0.02)
        self.pos_embed = nnx.Param(init(rngs.params(), (1, self.max_len, dim)))
        self.blocks = nnx.List([
            TransformerBlock(dim, num_heads, check_positive_int("mlp_ratio", mlp_ratio),
                             causal=True, rngs=rngs)
            for _ in range(check_positive_int("depth", depth))])
        self.norm = nnx.LayerNorm(dim, rngs=rngs)
        self.head = nnx.Linear(dim, self.vocab_size, rngs=rngs)

    def hidden(self, tokens: jax.Array) -> jax.Array:
        """Final-LayerNorm hidden states ``(B, L, dim)``."""
        if tokens.ndim != 2 or tokens.shape[1] > self.max_len:
            raise ValueError(f"tokens must have shape (B, L) with L <= max_len={self.max_len}, "
                             f"got {tuple(tokens.shape)}")
        h = self.embed(tokens) + self.pos_embed[:, : tokens.shape[1]]
        for block in self.blocks:
            h = block(h)
        return self.norm(h)

    def __call__(self, tokens: jax.Array, task_ids: jax.Array | None = None) -> jax.Array:
        """Next-token logits ``(B, L, vocab)``; ``task_ids`` is ignored."""
        del task_ids
        return self.head(self.hidden(tokens))

    def features(self, tokens: jax.Array) -> jax.Array:
        """Mean of the final hidden states over positions, ``(B, dim)``."""
        return jnp.mean(self.hidden(tokens), axis=1)
