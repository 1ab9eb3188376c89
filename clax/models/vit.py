"""Tiny Vision Transformer for small images."""

from __future__ import annotations

from collections.abc import Sequence

import einops
import jax
import jax.numpy as jnp
from flax import nnx

from clax.models._checks import check_input_shape_arg, check_positive_int
from clax.models.base import Classifier


class SelfAttention(nnx.Module):
    """Multi-head self-attention built from ``nnx.Linear`` (no dropout).

    Plain ``nnx.Linear`` projections (not ``nnx.MultiHeadAttention``'s ``LinearGeneral``) so
    layer-input capture and per-layer projection methods see ordinary 2-D kernels.
    """

    def __init__(self, dim: int, num_heads: int, *, causal: bool = False, rngs: nnx.Rngs):
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.causal = causal
        self.query = nnx.Linear(dim, dim, rngs=rngs)
        self.key = nnx.Linear(dim, dim, rngs=rngs)
        self.value = nnx.Linear(dim, dim, rngs=rngs)
        self.out = nnx.Linear(dim, dim, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Attends over tokens ``x`` of shape ``(B, N, D)``; returns the same shape.

        With ``causal=True`` token ``n`` attends to tokens ``<= n`` only (a decoder).
        """

        def heads(t):
            return einops.rearrange(t, "b n (h d) -> b n h d", h=self.num_heads)

        q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
        # (B, N, H, D/H), scaled by 1/sqrt(D/H)
        out = jax.nn.dot_product_attention(q, k, v, is_causal=self.causal)
        return self.out(einops.rearrange(out, "b n h d -> b n (h d)"))


class TransformerBlock(nnx.Module):
    """Pre-LN block: ``h = x + attn(ln1(x))`` then ``h + fc2(gelu(fc1(ln2(h))))``.

    ``mlp_adapter`` (None until :func:`clax.models.peft.add_adapters` sets it) is the
    AdaptFormer hook: a module applied in parallel to the MLP on the same residual stream,
    ``out = h + mlp(ln2(h)) + mlp_adapter(h)``.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: int, *, causal: bool = False,
                 approximate_gelu: bool = True, norm_eps: float = 1e-6,
                 mlp_dim: int | None = None, rngs: nnx.Rngs):
        """Builds the block.

        Args:
            dim: Token width.
            num_heads: Attention heads; must divide ``dim``.
            mlp_ratio: MLP hidden width as a multiple of ``dim`` (ignored when ``mlp_dim`` is
                given).
            causal: Causal (decoder) attention.
            approximate_gelu: tanh-approximate GELU (``False``: exact erf GELU, as in
                timm / Hugging Face ViTs).
            norm_eps: LayerNorm epsilon.
            mlp_dim: MLP hidden width; overrides ``dim * mlp_ratio`` so checkpoints whose
                hidden width is not a multiple of ``dim`` can be represented.
            rngs: Random streams for initialisation.
        """
        hidden = dim * mlp_ratio if mlp_dim is None else mlp_dim
        self.approximate_gelu = approximate_gelu
        self.ln1 = nnx.LayerNorm(dim, epsilon=norm_eps, rngs=rngs)
        self.attn = SelfAttention(dim, num_heads, causal=causal, rngs=rngs)
        self.ln2 = nnx.LayerNorm(dim, epsilon=norm_eps, rngs=rngs)
        self.fc1 = nnx.Linear(dim, hidden, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, dim, rngs=rngs)
        self.mlp_adapter: nnx.Module | None = None

    def __call__(self, x: jax.Array) -> jax.Array:
        """Maps tokens ``(B, N, D)`` to ``(B, N, D)``."""
        h = x + self.attn(self.ln1(x))
        out = h + self.fc2(nnx.gelu(self.fc1(self.ln2(h)), approximate=self.approximate_gelu))
        if self.mlp_adapter is not None:
            out = out + self.mlp_adapter(h)
        return out


class TinyViT(Classifier):
    """Patch embedding (Conv, stride = patch), cls token, learned positions, pre-LN blocks.

    Features are the final-LayerNorm output at the cls token, shape ``(B, dim)``.

    Parameter paths: ``patch_embed/kernel`` (``(p, p, C, dim)``), ``cls_token``,
    ``pos_embed`` (``(1, N + 1, dim)``), ``blocks/0/attn/query/kernel``,
    ``blocks/0/fc1/kernel``, ``blocks/1/ln2/scale``, ``norm/scale``, ``head/kernel``.

    ``prompt`` (None until :func:`clax.models.peft.add_prompt` sets it) is the prompt-tuning
    hook: ``prompt(batch_size)`` gives ``(B, P, dim)`` tokens inserted after the cls token
    (after the position embeddings are added, as in L2P), so features stay the cls output.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        *,
        num_classes: int,
        patch_size: int = 4,
        dim: int = 64,
        depth: int = 2,
        num_heads: int = 4,
        mlp_ratio: int = 2,
        num_tasks: int = 1,
        rngs: nnx.Rngs,
    ):
        """Builds the transformer.

        Args:
            input_shape: Image shape ``(H, W, C)``; ``H`` and ``W`` divisible by ``patch_size``.
            num_classes: Logits per example.
            patch_size: Side of the square patches.
            dim: Token width; divisible by ``num_heads``.
            depth: Number of transformer blocks.
            num_heads: Attention heads.
            mlp_ratio: Hidden width of the block MLP as a multiple of ``dim``.
            num_tasks: Heads; ``> 1`` gives a multi-head (task-incremental) model.
            rngs: Random streams for initialisation.

        Raises:
            ValueError: On a malformed argument.
        """
        input_shape = check_input_shape_arg(input_shape)
        num_classes = check_positive_int("num_classes", num_classes)
        num_tasks = check_positive_int("num_tasks", num_tasks)
        self.patch_size = check_positive_int("patch_size", patch_size)
        self.dim = check_positive_int("dim", dim)
        self.depth = check_positive_int("depth", depth)
        self.num_heads = check_positive_int("num_heads", num_heads)
        self.mlp_ratio = check_positive_int("mlp_ratio", mlp_ratio)
        h, w, c = input_shape
        if h % patch_size or w % patch_size:
            raise ValueError(
                f"input_shape spatial dims {(h, w)} must be divisible by patch_size={patch_size}"
            )
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_patches = (h // patch_size) * (w // patch_size)
        self.patch_embed = nnx.Conv(
            c,
            dim,
            kernel_size=(patch_size, patch_size),
            strides=patch_size,
            padding="VALID",
            rngs=rngs,
        )
        init = nnx.initializers.truncated_normal(stddev=0.02)
        self.cls_token = nnx.Param(init(rngs.params(), (1, 1, dim)))
        self.pos_embed = nnx.Param(init(rngs.params(), (1, self.num_patches + 1, dim)))
        self.blocks = nnx.List(
            [TransformerBlock(dim, num_heads, mlp_ratio, rngs=rngs) for _ in range(depth)]
        )
        self.norm = nnx.LayerNorm(dim, rngs=rngs)
        self.prompt: nnx.Module | None = None
        self._init_classifier(input_shape, num_classes, num_tasks, dim, rngs)

    def _features(self, x: jax.Array) -> jax.Array:
        b = x.shape[0]
        tokens = self.patch_embed(x).reshape(b, self.num_patches, self.dim)
        cls = jnp.broadcast_to(self.cls_token[...], (b, 1, self.dim))
        h = jnp.concatenate([cls, tokens], axis=1) + self.pos_embed[...]
        if self.prompt is not None:
            h = jnp.concatenate([h[:, :1], self.prompt(b).astype(h.dtype), h[:, 1:]], axis=1)
        for block in self.blocks:
            h = block(h)
        return self.norm(h)[:, 0]
