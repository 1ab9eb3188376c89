"""Forget losses: hand-computed values, gradients, NPO's limits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clax.unlearning import gradient_ascent_loss, log_likelihood, npo_loss, retain_loss


def test_hand_computed_values():
    logits = jnp.array([[0.0, 0.0], [np.log(3.0), 0.0]])  # π(y=0) = 1/2, 3/4
    ref = jnp.array([[0.0, np.log(3.0)], [np.log(3.0), 0.0]])  # π_ref(y=0) = 1/4, 3/4
    y = jnp.array([0, 0])
    np.testing.assert_allclose(log_likelihood(logits, y), np.log([0.5, 0.75]), rtol=1e-6)
    np.testing.assert_allclose(retain_loss(logits, y), -np.log([0.5, 0.75]).mean(), rtol=1e-6)
    np.testing.assert_allclose(gradient_ascent_loss(logits, y), np.log([0.5, 0.75]).mean(),
                               rtol=1e-6)
    # β = 1: ratios 2 and 1 -> (2/1)·mean(log(1 + 2), log(1 + 1)).
    np.testing.assert_allclose(npo_loss(logits, ref, y, beta=1.0),
                               2.0 * np.mean([np.log(3.0), np.log(2.0)]), rtol=1e-6)
    # β = 0.5: (2/0.5)·mean(log(1 + 2^0.5), log 2).
    np.testing.assert_allclose(npo_loss(logits, ref, y, beta=0.5),
                               4.0 * np.mean([np.log(1 + np.sqrt(2.0)), np.log(2.0)]), rtol=1e-6)
    # Weights: only the first example.
    np.testing.assert_allclose(npo_loss(logits, ref, y, beta=1.0, weights=jnp.array([1.0, 0.0])),
                               2.0 * np.log(3.0), rtol=1e-6)


def test_npo_gradient_is_weighted_ga_and_tends_to_ga():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(5, 4)), jnp.float32)
    ref = jnp.asarray(rng.normal(size=(5, 4)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 4, 5))
    ga = jax.grad(gradient_ascent_loss)(logits, y)
    # ∇L_NPO = mean_b 2σ(β·log-ratio_b) ∇log π_b, i.e. GA's per-example gradient weighted.
    beta = 0.7
    ratio = log_likelihood(logits, y) - log_likelihood(ref, y)
    w = 2 * jax.nn.sigmoid(beta * ratio)
    npo = jax.grad(lambda z: npo_loss(z, ref, y, beta=beta))(logits)
    np.testing.assert_allclose(npo, ga * w[:, None], rtol=1e-5, atol=1e-7)
    small = jax.grad(lambda z: npo_loss(z, ref, y, beta=1e-4))(logits)
    np.testing.assert_allclose(small, ga, rtol=1e-3, atol=1e-6)
    # No gradient flows into the reference logits.
    np.testing.assert_array_equal(jax.grad(lambda r: npo_loss(logits, r, y))(ref), 0.0)


def test_bad_input():
    with pytest.raises(ValueError, match=r"labels must have shape \(2,\)"):
        retain_loss(jnp.zeros((2, 3)), jnp.zeros((3,), jnp.int32))
    with pytest.raises(ValueError, match=r"ref_logits must have shape \(B, C\)"):
        npo_loss(jnp.zeros((2, 3)), jnp.zeros((3,)), jnp.zeros((2,), jnp.int32))
    with pytest.raises(ValueError, match="beta must be a finite number > 0, got 0.0"):
        npo_loss(jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.zeros((2,), jnp.int32), beta=0.0)
    with pytest.raises(TypeError, match=r"beta must be a finite number > 0, got '0.1' \(str\)"):
        npo_loss(jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.zeros((2,), jnp.int32), beta="0.1")
