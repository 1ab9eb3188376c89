"""Vision Transformers: the ViT (B/16 layout, :func:`vit_b16`; pretrained weights through
:mod:`clax.models.vit_pretrained`) and the tiny ViT for small images, built from the same
pre-LN blocks."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import einops
import jax
import jax.numpy as jnp
from flax import nnx

from clax._validation import check_bool, check_int, check_real
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


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """Hyperparameters of a :class:`ViT` (defaults: ViT-B/16 at 224x224, 1000 classes).

    Attributes:
        image_size: Side of the square input images; divisible by ``patch_size``.
        patch_size: Side of the square patches.
        in_channels: Image channels.
        dim: Token width; divisible by ``num_heads``.
        depth: Transformer blocks.
        num_heads: Attention heads.
        mlp_dim: Hidden width of the block MLPs.
        norm_eps: LayerNorm epsilon (timm 1e-6, Hugging Face 1e-12).
        num_classes: Logits of the head.
        approximate_gelu: tanh GELU instead of the exact erf GELU of timm / HF ViTs.
    """

    image_size: int = 224
    patch_size: int = 16
    in_channels: int = 3
    dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    norm_eps: float = 1e-6
    num_classes: int = 1000
    approximate_gelu: bool = False

    def __post_init__(self) -> None:
        for name in ("image_size", "patch_size", "in_channels", "dim", "depth", "num_heads",
                     "mlp_dim", "num_classes"):
            check_positive_int(name, getattr(self, name))
        check_real("norm_eps", self.norm_eps, 0.0, math.inf, low_open=True, high_open=True)
        check_bool("approximate_gelu", self.approximate_gelu)
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size ({self.image_size}) must be divisible by patch_size "
                             f"({self.patch_size})")
        if self.dim % self.num_heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by num_heads "
                             f"({self.num_heads})")

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(image_size, image_size, in_channels)``."""
        return (self.image_size, self.image_size, self.in_channels)


def vit_b16(**overrides: Any) -> ViTConfig:
    """ViT-B/16: 224x224 RGB, patch 16, width 768, 12 blocks, 12 heads, MLP 3072.

    Args:
        **overrides: Fields to change, e.g. ``num_classes=10`` or ``image_size=96``.

    Returns:
        The configuration (timm's LayerNorm epsilon, 1e-6).
    """
    return dataclasses.replace(ViTConfig(), **overrides)


def vit_tiny_test(**overrides: Any) -> ViTConfig:
    """A tiny ViT for tests: 32x32 RGB, patch 8 (16 patches), width 32, 2 blocks, 4 heads.

    Args:
        **overrides: Fields to change.

    Returns:
        The configuration (MLP width 64, 10 classes).
    """
    base = ViTConfig(image_size=32, patch_size=8, dim=32, depth=2, num_heads=4, mlp_dim=64,
                     num_classes=10)
    return dataclasses.replace(base, **overrides)


class ViT(Classifier):
    """Vision Transformer with the timm / Hugging Face ViT layout (pre-LN, cls-token head).

    ``features(x)`` is the final-LayerNorm output at the cls token, shape ``(B, dim)``.
    Parameter paths as in :class:`~clax.models.vit.TinyViT`: ``patch_embed/kernel``
    (``(p, p, C, dim)``), ``cls_token`` (``(1, 1, dim)``), ``pos_embed``
    (``(1, N + 1, dim)``), ``blocks/<i>/{ln1,attn/{query,key,value,out},ln2,fc1,fc2}``,
    ``norm``, ``head``.

    Hooks, as on TinyViT: ``prompt`` (None until set) gives ``(B, P, dim)`` tokens that are
    inserted after the cls token once the position embeddings are added; each block's
    ``mlp_adapter`` runs parallel to its MLP (see :class:`~clax.models.vit.TransformerBlock`).

    Attributes:
        patch_size, dim, depth, num_heads, mlp_dim, norm_eps, approximate_gelu: As built.
        grid_size: Patches per side ``(H // p, W // p)``.
        num_patches: ``grid_size[0] * grid_size[1]``.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        *,
        num_classes: int,
        num_tasks: int = 1,
        patch_size: int = 16,
        dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: int = 4,
        mlp_dim: int | None = None,
        norm_eps: float = 1e-6,
        approximate_gelu: bool = False,
        rngs: nnx.Rngs,
    ):
        """Builds the transformer (defaults: ViT-B/16).

        Args:
            input_shape: Image shape ``(H, W, C)``; ``H`` and ``W`` divisible by
                ``patch_size``.
            num_classes: Logits per example.
            num_tasks: Heads; ``> 1`` gives a multi-head (task-incremental) model.
            patch_size: Side of the square patches.
            dim: Token width; divisible by ``num_heads``.
            depth: Number of transformer blocks.
            num_heads: Attention heads.
            mlp_ratio: Block MLP hidden width as a multiple of ``dim`` (when ``mlp_dim`` is
                None).
            mlp_dim: Block MLP hidden width; overrides ``mlp_ratio``.
            norm_eps: LayerNorm epsilon of every LayerNorm.
            approximate_gelu: tanh GELU instead of the exact erf GELU.
            rngs: Random streams for initialisation.

        Raises:
            TypeError: On an argument of the wrong type.
            ValueError: On a malformed argument.
        """
        input_shape = check_input_shape_arg(input_shape)
        num_classes = check_positive_int("num_classes", num_classes)
        num_tasks = check_positive_int("num_tasks", num_tasks)
        self.patch_size = check_positive_int("patch_size", patch_size)
        self.dim = check_positive_int("dim", dim)
        self.depth = check_positive_int("depth", depth)
        self.num_heads = check_positive_int("num_heads", num_heads)
        mlp_ratio = check_positive_int("mlp_ratio", mlp_ratio)
        mlp_dim = check_int("mlp_dim", mlp_dim, low=1, optional=True)
        self.mlp_dim = dim * mlp_ratio if mlp_dim is None else mlp_dim
        self.norm_eps = check_real("norm_eps", norm_eps, 0.0, math.inf, low_open=True,
                                   high_open=True)
        self.approximate_gelu = check_bool("approximate_gelu", approximate_gelu)
        h, w, c = input_shape
        if h % patch_size or w % patch_size:
            raise ValueError(
                f"input_shape spatial dims {(h, w)} must be divisible by patch_size={patch_size}"
            )
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.grid_size = (h // patch_size, w // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.patch_embed = nnx.Conv(c, dim, kernel_size=(patch_size, patch_size),
                                    strides=patch_size, padding="VALID", rngs=rngs)
        init = nnx.initializers.truncated_normal(stddev=0.02)
        self.cls_token = nnx.Param(init(rngs.params(), (1, 1, dim)))
        self.pos_embed = nnx.Param(init(rngs.params(), (1, self.num_patches + 1, dim)))
        self.blocks = nnx.List([
            TransformerBlock(dim, num_heads, mlp_ratio, mlp_dim=self.mlp_dim,
                             approximate_gelu=self.approximate_gelu, norm_eps=self.norm_eps,
                             rngs=rngs)
            for _ in range(depth)
        ])
        self.norm = nnx.LayerNorm(dim, epsilon=self.norm_eps, rngs=rngs)
        self.prompt: nnx.Module | None = None
        self._init_classifier(input_shape, num_classes, num_tasks, dim, rngs)

    @classmethod
    def from_config(cls, config: ViTConfig, *, num_tasks: int = 1, rngs: nnx.Rngs) -> ViT:
        """Builds a randomly initialised model from a :class:`ViTConfig`.

        Args:
            config: The hyperparameters.
            num_tasks: Heads; ``> 1`` gives a multi-head model.
            rngs: Random streams for initialisation.

        Returns:
            The model.

        Raises:
            TypeError: ``config`` is not a :class:`ViTConfig`.
        """
        if not isinstance(config, ViTConfig):
            raise TypeError(f"config must be a ViTConfig, got {type(config).__name__}")
        return cls(config.input_shape, num_classes=config.num_classes, num_tasks=num_tasks,
                   patch_size=config.patch_size, dim=config.dim, depth=config.depth,
                   num_heads=config.num_heads, mlp_dim=config.mlp_dim,
                   norm_eps=config.norm_eps, approximate_gelu=config.approximate_gelu,
                   rngs=rngs)

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



class TinyViT(ViT):
    """Tiny Vision Transformer for small images: a :class:`ViT` with small defaults and the
    tanh GELU.

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
        super().__init__(input_shape, num_classes=num_classes, num_tasks=num_tasks,
                         patch_size=patch_size, dim=dim, depth=depth, num_heads=num_heads,
                         mlp_ratio=mlp_ratio, norm_eps=1e-6, approximate_gelu=True,
                         rngs=rngs)
        self.mlp_ratio = mlp_ratio
