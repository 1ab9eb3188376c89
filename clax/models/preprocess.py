"""Input preparation for pretrained vision backbones: small grey or RGB images to the
resolution, channel count and normalisation a backbone was trained with.

Fashion-MNIST (28x28x1) and scikit-learn's digits (8x8x1, values 0-16) are far from the
224x224 RGB ImageNet photos that EfficientNet-Lite0 and ViT-B/16 were trained on; these
helpers resize (bilinear, ``jax.image.resize``), replicate grey to RGB and apply the
backbone's mean/std, all jit-able so they can run inside a feature-extraction step.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

# Per-channel statistics of the common pretraining recipes (images scaled to [0, 1] first).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Inception-style [-1, 1] scaling (timm's ViT-B/16 augreg weights, HF google/vit-*).
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)


def resize_images(images: jax.Array, size: int | Sequence[int], *,
                  method: str = "bilinear") -> jax.Array:
    """Resizes ``(B, H, W, C)`` images to ``(B, size, size, 3)`` float32.

    One channel is replicated to three; three are kept. Values are not rescaled (call
    :func:`normalize` after scaling to ``[0, 1]``).

    Args:
        images: ``(B, H, W, C)`` with ``C`` in ``{1, 3}``, any real dtype.
        size: Output side, or ``(height, width)``.
        method: A ``jax.image.resize`` method (``"bilinear"``, ``"bicubic"``, ``"nearest"``).

    Raises:
        ValueError: On a wrong rank, channel count or size.
    """
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"images must have shape (B, H, W, C) with C in {{1, 3}}, got "
                         f"{tuple(images.shape)}")
    hw = (size, size) if isinstance(size, int) else tuple(size)
    if len(hw) != 2 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in hw):
        raise ValueError(f"size must be a positive int or (height, width), got {size!r}")
    x = jnp.asarray(images, jnp.float32)
    b, _, _, c = x.shape
    x = jax.image.resize(x, (b, *hw, c), method=method)
    return jnp.broadcast_to(x, (b, *hw, 3)) if c == 1 else x


def normalize(images: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
    """``(images - mean) / std`` per channel (last axis).

    Raises:
        ValueError: If ``mean``/``std`` do not have one entry per channel or ``std`` has a
            non-positive entry.
    """
    c = images.shape[-1]
    if len(mean) != c or len(std) != c:
        raise ValueError(f"mean and std must have {c} entries (one per channel), got "
                         f"{len(mean)} and {len(std)}")
    if min(std) <= 0:
        raise ValueError(f"std entries must be positive, got {tuple(std)}")
    return (images - jnp.asarray(mean, images.dtype)) / jnp.asarray(std, images.dtype)


def prepare_images(images: jax.Array, *, size: int, scale: float,
                   mean: Sequence[float] = IMAGENET_MEAN,
                   std: Sequence[float] = IMAGENET_STD) -> jax.Array:
    """Small images to a backbone's input: ``normalize(resize(images) / scale, mean, std)``.

    Args:
        images: ``(B, H, W, C)``, ``C`` in ``{1, 3}``.
        size: Side of the backbone's input.
        scale: The value that maps to 1.0 (255 for uint8 images, 16 for sklearn digits,
            1 for images already in ``[0, 1]``).
        mean, std: The backbone's normalisation (on ``[0, 1]`` values).

    Raises:
        ValueError: On a non-positive ``scale`` or malformed images / statistics.
    """
    if not scale > 0:
        raise ValueError(f"scale must be positive (the value that maps to 1.0), got {scale!r}")
    return normalize(resize_images(images, size) / scale, mean, std)
