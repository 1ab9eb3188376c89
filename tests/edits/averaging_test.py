"""Tests for clax.edits.averaging."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from clax.edits import (
    WeightAveragingState,
    average,
    averaged_params,
    interpolate,
    running_average_update,
    weight_averaging,
)


def _tree(seed):
    rng = np.random.default_rng(seed)
    return {
        "layers": {
            0: {
                "kernel": rng.standard_normal((3, 4)).astype(np.float32),
                "bias": rng.standard_normal(4).astype(np.float32),
            }
        },
        "head": {"kernel": rng.standard_normal((4, 2)).astype(np.float32)},
    }


def _assert_trees(actual, expected, **tol):
    jax.tree.map(lambda a, e: np.testing.assert_allclose(a, e, **tol), actual, expected)


def test_interpolate_endpoints_are_exact_and_midpoint_is_the_mean():
    ref, ft = _tree(0), _tree(1)
    jax.tree.map(np.testing.assert_array_equal, interpolate(ref, ft, weight=0.0), ref)
    jax.tree.map(np.testing.assert_array_equal, interpolate(ref, ft, weight=1.0), ft)
    _assert_trees(
        interpolate(ref, ft, weight=0.25),
        jax.tree.map(lambda r, f: 0.75 * r + 0.25 * f, ref, ft),
        rtol=1e-6,
    )


def test_interpolate_traced_weight_under_jit():
    ref, ft = _tree(0), _tree(1)
    out = jax.jit(lambda w: interpolate(ref, ft, weight=w))(jnp.float32(0.5))
    _assert_trees(out, jax.tree.map(lambda r, f: (r + f) / 2, ref, ft), rtol=1e-6)


def test_interpolate_bad_inputs():
    ref, ft = _tree(0), _tree(1)
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="weight must be in \\[0, 1\\]"):
            interpolate(ref, ft, weight=bad)
    with pytest.raises(TypeError, match=r"weight must be a real number, got '0.5' \(str\)"):
        interpolate(ref, ft, weight="0.5")
    del ft["layers"][0]["bias"]
    with pytest.raises(ValueError, match="'layers/0/bias' is in reference but not in finetuned"):
        interpolate(ref, ft, weight=0.5)


def test_average_of_identical_trees_is_the_tree():
    tree = _tree(0)
    _assert_trees(average([tree, tree, tree]), tree, rtol=1e-6)
    _assert_trees(average([tree, tree], weights=[0.2, 5.0]), tree, rtol=1e-6)


def test_average_weighted_matches_numpy():
    trees = [_tree(s) for s in range(3)]
    weights = [1.0, 2.0, 1.0]
    expected = jax.tree.map(lambda a, b, c: (a + 2 * b + c) / 4, *trees)
    _assert_trees(average(trees, weights=weights), expected, rtol=1e-5, atol=1e-6)
    _assert_trees(
        average(trees), jax.tree.map(lambda *x: np.mean(x, axis=0), *trees), rtol=1e-5, atol=1e-6
    )


def test_average_bad_inputs():
    trees = [_tree(0), _tree(1)]
    with pytest.raises(ValueError, match="trees must be a non-empty sequence"):
        average([])
    with pytest.raises(ValueError, match="one entry per tree \\(2\\), got 3"):
        average(trees, weights=[1, 1, 1])
    with pytest.raises(ValueError, match="non-negative and not all zero"):
        average(trees, weights=[1.0, -1.0])
    with pytest.raises(ValueError, match="non-negative and not all zero"):
        average(trees, weights=[0.0, 0.0])
    bad = _tree(2)
    bad["head"]["kernel"] = np.zeros((2, 4), np.float32)
    with pytest.raises(ValueError, match="differ at path 'head/kernel'"):
        average([trees[0], bad])


def test_running_average_equals_mean_of_seen_params():
    seen = [_tree(s) for s in range(5)]
    avg, count = jax.tree.map(np.zeros_like, seen[0]), 0
    for i, params in enumerate(seen):
        avg, count = running_average_update(avg, params, count)
        assert count == i + 1
        _assert_trees(
            avg, jax.tree.map(lambda *x: np.mean(x, axis=0), *seen[: i + 1]), rtol=1e-5, atol=1e-6
        )
    # First step is exactly the params, whatever avg held.
    first, _ = running_average_update(_tree(9), seen[0], 0)
    jax.tree.map(np.testing.assert_array_equal, first, seen[0])


def test_running_average_bad_inputs():
    with pytest.raises(ValueError, match="count must be a non-negative integer"):
        running_average_update(_tree(0), _tree(1), -1)
    with pytest.raises(TypeError, match="count must be a non-negative integer"):
        running_average_update(_tree(0), _tree(1), 1.5)
    with pytest.raises(ValueError, match="avg and params differ"):
        running_average_update(_tree(0), {"head": _tree(1)["head"]}, 0)


@pytest.mark.parametrize("every", [1, 3])
def test_weight_averaging_averages_exactly_every_kth_step(every):
    rng = np.random.default_rng(4)
    params = {"w": jnp.asarray(rng.standard_normal((2, 3)), jnp.float32)}
    tx = weight_averaging(optax.sgd(0.1, momentum=0.5), every=every)
    bare = optax.sgd(0.1, momentum=0.5)
    state, bare_state, p = tx.init(params), bare.init(params), params
    thetas = []
    traces = []

    @jax.jit
    def step(p, state, g):
        traces.append(1)
        updates, state = tx.update(g, state, p)
        return updates, state

    for t in range(1, 11):
        g = {"w": jnp.asarray(rng.standard_normal((2, 3)), jnp.float32)}
        updates, state = step(p, state, g)
        bare_updates, bare_state = bare.update(g, bare_state, p)
        np.testing.assert_allclose(updates["w"], bare_updates["w"], rtol=1e-6)
        p = optax.apply_updates(p, updates)
        thetas.append(np.asarray(p["w"]))
        averaged = [thetas[s - 1] for s in range(every, t + 1, every)]
        assert int(state.num_averaged) == len(averaged)
        if averaged:
            np.testing.assert_allclose(
                averaged_params(state)["w"], np.mean(averaged, axis=0), rtol=1e-5, atol=1e-6
            )
        else:
            np.testing.assert_array_equal(averaged_params(state)["w"], params["w"])
    assert len(traces) == 1
    assert int(state.count) == 10


def test_weight_averaging_inside_a_chain_and_errors():
    params = {"w": jnp.ones(2)}
    tx = optax.chain(optax.clip_by_global_norm(1.0), weight_averaging(optax.sgd(1.0)))
    state = tx.init(params)
    _, state = tx.update({"w": jnp.ones(2)}, state, params)
    assert isinstance(state[1], WeightAveragingState)
    # float32: √½ is rounded ~3 times (norm, clip scale, sgd step), ≤ 3u·√½ absolute, and
    # 1 − √½ ≈ 0.29 turns that into 3u·√½/(1 − √½) ≈ 7u relative; the subtraction and the
    # running mean add a few u more. rtol = 12u = 7e-7 (error measured 4e-8); a missed
    # clip (1 − 1 = 0) or a mean with the initial params (0.65) is far outside.
    np.testing.assert_allclose(averaged_params(state)["w"], 1 - np.sqrt(0.5),
                               rtol=12 * np.finfo(np.float32).eps / 2)
    with pytest.raises(ValueError, match="no WeightAveragingState found"):
        averaged_params(optax.sgd(1.0).init(params))
    for bad in (0, -2):
        with pytest.raises(ValueError, match="every must be a positive int"):
            weight_averaging(optax.sgd(1.0), every=bad)
    for bad in (1.5, True):
        with pytest.raises(TypeError, match="every must be a positive int"):
            weight_averaging(optax.sgd(1.0), every=bad)
    with pytest.raises(ValueError, match="weight_averaging needs the current parameters"):
        tx.update({"w": jnp.ones(2)}, tx.init(params))
