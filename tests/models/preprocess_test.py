"""clax.models.preprocess: small images to a pretrained backbone's input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clax.models.preprocess import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    normalize,
    prepare_images,
    resize_images,
)


def test_grey_is_replicated_and_resized():
    x = jnp.asarray(np.random.default_rng(0).random((2, 8, 8, 1)), jnp.float32)
    y = resize_images(x, 16)
    assert y.shape == (2, 16, 16, 3) and y.dtype == jnp.float32
    np.testing.assert_array_equal(y[..., 0], y[..., 2])
    # A constant image stays constant under bilinear resizing.
    c = resize_images(jnp.full((1, 5, 7, 3), 0.25), (9, 4))
    assert c.shape == (1, 9, 4, 3)
    np.testing.assert_allclose(c, 0.25, atol=1e-7)


def test_prepare_matches_the_formula():
    x = jnp.asarray(np.random.default_rng(1).integers(0, 256, (3, 4, 4, 3)), jnp.uint8)
    got = prepare_images(x, size=4, scale=255.0)  # same size: resize is the identity
    want = (np.asarray(x, np.float64) / 255.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    jitted = jax.jit(lambda a: prepare_images(a, size=8, scale=255.0))(x)
    assert jitted.shape == (3, 8, 8, 3)


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match=r"images must have shape \(B, H, W, C\)"):
        resize_images(jnp.zeros((4, 4, 2)), 8)
    with pytest.raises(ValueError, match="C in"):
        resize_images(jnp.zeros((1, 4, 4, 2)), 8)
    with pytest.raises(ValueError, match="size must be a positive int"):
        resize_images(jnp.zeros((1, 4, 4, 1)), 0)
    with pytest.raises(ValueError, match="mean and std must have 3 entries"):
        normalize(jnp.zeros((1, 2, 2, 3)), (0.5,), (0.5,))
    with pytest.raises(ValueError, match="std entries must be positive"):
        normalize(jnp.zeros((1, 2, 2, 3)), (0.5,) * 3, (0.5, 0.0, 0.5))
    with pytest.raises(ValueError, match="scale must be positive"):
        prepare_images(jnp.zeros((1, 2, 2, 1)), size=4, scale=0)
