"""A-GEM projection: numpy reference, no first-order increase of the reference loss."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from clax.transforms import agem


def _tree(rng, scale=1.0):
    return {"a": {"kernel": jnp.asarray(rng.normal(size=(3, 4)) * scale, jnp.float32)},
            "b": jnp.asarray(rng.normal(size=(5,)) * scale, jnp.float32)}


def _flat(tree):
    return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)]).astype(np.float64)


def _reference(g, r):
    dot = g @ r
    return g - dot / (r @ r) * r if dot < 0 else g


@pytest.mark.parametrize("seed", range(20))
def test_matches_numpy_and_never_conflicts(seed):
    rng = np.random.default_rng(seed)
    g, r = _tree(rng), _tree(rng, scale=rng.uniform(0.1, 10))
    tx = agem()
    u, state = jax.jit(tx.update)(g, tx.init(g), reference_grads=r)
    fu, fg, fr = _flat(u), _flat(g), _flat(r)
    np.testing.assert_allclose(fu, _reference(fg, fr), rtol=1e-5, atol=1e-6)
    # ⟨update, g_ref⟩ >= 0 after the projection (the reference loss does not rise to
    # first order), and the update is unchanged when there was no conflict.
    assert fu @ fr >= -1e-5 * np.linalg.norm(fu) * np.linalg.norm(fr)
    if fg @ fr >= 0:
        np.testing.assert_array_equal(fu, fg)
        assert int(state.num_projected) == 0
    else:
        assert abs(fu @ fr) <= 1e-5 * np.linalg.norm(fg) * np.linalg.norm(fr)
        assert int(state.num_projected) == 1
    np.testing.assert_allclose(float(state.last_dot), fg @ fr, rtol=1e-5, atol=1e-6)


def test_projection_is_the_closest_non_conflicting_vector():
    """A-GEM's QP: min ||g~ - g|| s.t. <g~, r> >= 0; the answer removes only the r part."""
    g = {"w": jnp.array([1.0, -2.0, 0.5])}
    r = {"w": jnp.array([0.0, 1.0, 0.0])}
    u, _ = agem().update(g, agem().init(g), reference_grads=r)
    np.testing.assert_allclose(u["w"], [1.0, 0.0, 0.5])


def test_zero_reference_never_projects():
    g = _tree(np.random.default_rng(0))
    zero = jax.tree.map(jnp.zeros_like, g)
    u, _ = agem().update(g, agem().init(g), reference_grads=zero)
    jax.tree.map(np.testing.assert_array_equal, u, g)
    assert bool(jnp.all(jnp.isfinite(_flat(u))))


def test_chains_before_sgd_and_ignores_other_extra_args():
    g = {"w": jnp.array([1.0, -1.0])}
    r = {"w": jnp.array([0.0, 1.0])}
    tx = optax.chain(agem(), optax.sgd(0.5))
    u, _ = tx.update(g, tx.init(g), g, reference_grads=r, unrelated=3)
    np.testing.assert_allclose(u["w"], [-0.5, 0.0])


def test_bad_reference_grads():
    g = {"w": jnp.ones(2)}
    tx = agem()
    with pytest.raises(ValueError, match="reference_grads="):
        tx.update(g, tx.init(g))
    with pytest.raises(ValueError, match="reference_grads must have the structure and leaf "
                                         "shapes of the gradients"):
        tx.update(g, tx.init(g), reference_grads={"v": jnp.ones(2)})
    with pytest.raises(ValueError, match=r"reference_grads differ in leaves 'w': shapes: "
                                         r"\(\d,\) != \(3,\)"):
        tx.update(g, tx.init(g), reference_grads={"w": jnp.ones(3)})
