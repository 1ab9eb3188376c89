"""Tests for clax.edits.ssd (selective synaptic dampening) against a numpy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clax.edits import ssd_dampen


def np_ssd(theta, full, forget, alpha, lam):
    """SSD's ``modify_weight`` on one tensor, in float32 numpy like the PyTorch original."""
    theta, full, forget = (np.asarray(a, np.float32) for a in (theta, full, forget))
    out = theta.copy()
    locations = forget > np.float32(alpha) * full
    with np.errstate(divide="ignore", invalid="ignore"):
        weight = np.float32(lam) * full / forget
    update = np.minimum(weight[locations], 1.0)
    out[locations] = theta[locations] * update
    return out, locations


def _random_case(seed):
    rng = np.random.default_rng(seed)
    shapes = {"convs": {0: {"kernel": (3, 3, 1, 4), "bias": (4,)}},
              "norm": {"scale": (4,)}, "head": {"kernel": (4, 3), "bias": (3,)}}
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s), jnp.float32), shapes,
                          is_leaf=lambda s: isinstance(s, tuple))

    def fisher(s):
        f = rng.exponential(size=s) * (rng.uniform(size=s) < 0.8)  # some exact zeros
        return jnp.asarray(f, jnp.float32)

    full = jax.tree.map(fisher, shapes, is_leaf=lambda s: isinstance(s, tuple))
    forget = jax.tree.map(lambda f: jnp.asarray(
        np.asarray(f) * rng.choice([0.5, 20.0, 200.0], size=f.shape), jnp.float32), full)
    # Entries with F_full = 0 and F_forget > 0 (β = 0), and exact ties F_f = α·F_D.
    forget["head"]["bias"] = forget["head"]["bias"].at[0].set(1.0)
    full["head"]["bias"] = full["head"]["bias"].at[0].set(0.0)
    forget["norm"]["scale"] = 10.0 * full["norm"]["scale"]
    return params, full, forget


@pytest.mark.parametrize("alpha,lam", [(10.0, 1.0), (5.0, 0.1), (50.0, 3.0)])
def test_matches_numpy_reference(alpha, lam):
    params, full, forget = _random_case(int(alpha))
    new, report = ssd_dampen(params, full, forget, alpha=alpha, lam=lam)
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    total_selected = 0
    for (path, p), f, g, q in zip(flat, jax.tree.leaves(full), jax.tree.leaves(forget),
                                  jax.tree.leaves(new), strict=True):
        expected, selected = np_ssd(p, f, g, alpha, lam)
        np.testing.assert_allclose(np.asarray(q), expected, rtol=1e-6, atol=0)
        # Unselected entries are bit-identical.
        np.testing.assert_array_equal(np.asarray(q)[~selected], np.asarray(p)[~selected])
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        assert report.dampened[name] == int(selected.sum())
        assert report.total[name] == p.size
        total_selected += int(selected.sum())
        assert q.dtype == p.dtype
    assert report.num_dampened == total_selected > 0
    # Strict selection: F_f = α·F_D exactly is not selected.
    if alpha == 10.0:
        assert report.dampened["norm/scale"] == 0
    # F_D = 0 < F_f: selected and zeroed (β = 0).
    assert float(new["head"]["bias"][0]) == 0.0
    # Never increases a magnitude.
    for p, q in zip(jax.tree.leaves(params), jax.tree.leaves(new)):
        assert np.all(np.abs(np.asarray(q)) <= np.abs(np.asarray(p)))


def test_bad_input():
    params, full, forget = _random_case(0)
    for bad in (0.0, -1.0, float("inf"), float("nan"), True):
        with pytest.raises(ValueError, match="alpha"):
            ssd_dampen(params, full, forget, alpha=bad)
        with pytest.raises(ValueError, match="lam"):
            ssd_dampen(params, full, forget, lam=bad)
    missing = {k: v for k, v in forget.items() if k != "norm"}
    with pytest.raises(ValueError, match="fisher_forget.*norm/scale"):
        ssd_dampen(params, full, missing)
    negative = {**full, "head": {**full["head"], "kernel": -jnp.ones((4, 3))}}
    with pytest.raises(ValueError, match="fisher_full.*head/kernel.*negative"):
        ssd_dampen(params, negative, forget)
    nan = {**forget, "norm": {"scale": jnp.full((4,), jnp.nan)}}
    with pytest.raises(ValueError, match="fisher_forget.*norm/scale.*non-finite"):
        ssd_dampen(params, full, nan)
