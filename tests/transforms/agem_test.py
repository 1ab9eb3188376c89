"""A-GEM projection: numpy reference, no first-order increase of the reference loss."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from clax.params import train_only
from clax.transforms import agem, find_state
from clax.transforms.agem import AGEMState


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


@pytest.mark.parametrize("seed", range(6))
def test_inside_train_only_the_dot_products_use_the_trainable_leaves_only(seed):
    # train_only hands agem only the trainable leaves; the reference gradient is over
    # every parameter (as the agem method computes it) and is read at those paths.
    rng = np.random.default_rng(seed)
    g, r = _tree(rng), _tree(rng)
    # A frozen leaf that agrees strongly with the reference: over the full tree the two
    # gradients never conflict, so a dot product that included it would never project.
    g["frozen"] = jnp.full((4,), 100.0)
    r["frozen"] = jnp.full((4,), 100.0)
    if seed % 2 == 0:  # make the trainable part conflict
        r = {**r, "a": {"kernel": -g["a"]["kernel"]}, "b": -g["b"]}
    mask = {"a": {"kernel": True}, "b": True, "frozen": False}
    tx = train_only(agem(), mask)
    u, state = jax.jit(tx.update)(g, tx.init(g), reference_grads=r)
    trainable = lambda t: {"a": t["a"], "b": t["b"]}  # noqa: E731
    fg, fr = _flat(trainable(g)), _flat(trainable(r))
    np.testing.assert_allclose(_flat(trainable(u)), _reference(fg, fr), rtol=1e-5, atol=1e-6)
    assert np.asarray(u["frozen"]).tobytes() == np.zeros(4, np.float32).tobytes()
    last_dot = find_state(state, AGEMState).last_dot
    np.testing.assert_allclose(float(last_dot), fg @ fr, rtol=1e-5, atol=1e-6)
    if seed % 2 == 0:
        assert fg @ fr < 0 and _flat(g) @ _flat(r) > 0  # projected on the trainable part


def test_inside_train_only_a_trainable_leaf_without_reference_is_an_error():
    g = {"w": jnp.ones(2), "frozen": jnp.ones(3)}
    tx = train_only(agem(), {"w": True, "frozen": False})
    with pytest.raises(ValueError, match="reference_grads must have the structure.*path 'w' "
                                         "is in the gradients but not in reference_grads"):
        tx.update(g, tx.init(g), reference_grads={"frozen": jnp.ones(3)})
