"""Reptile wrapper: meta steps every k updates against a plain-numpy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from clax.replay import ReptileState, reptile


def _reference(params, grads, lr, every, eps):
    theta, anchor, out = params.copy(), params.copy(), []
    for t, g in enumerate(grads, start=1):
        theta = theta - lr * g
        if t % every == 0:
            theta = anchor + eps * (theta - anchor)
            anchor = theta.copy()
        out.append(theta.copy())
    return out


@pytest.mark.parametrize("every,eps", [(1, 0.5), (3, 0.1), (4, 1.0)])
def test_matches_reference_under_scan(every, eps):
    rng = np.random.default_rng(0)
    p0 = rng.normal(size=(4,)).astype(np.float32)
    grads = rng.normal(size=(10, 4)).astype(np.float32)
    tx = reptile(optax.sgd(0.1), every=every, meta_lr=eps)

    def step(carry, g):
        params, state = carry
        u, state = tx.update({"w": g}, state, params)
        params = optax.apply_updates(params, u)
        return (params, state), params["w"]

    params = {"w": jnp.asarray(p0)}
    (_, state), traj = jax.lax.scan(step, (params, tx.init(params)), jnp.asarray(grads))
    np.testing.assert_allclose(traj, _reference(p0, grads, 0.1, every, eps), rtol=1e-5,
                               atol=1e-6)
    assert isinstance(state, ReptileState) and int(state.count) == 10


def test_inactive_steps_move_the_anchor_with_the_parameters():
    """reptile_active=False: plain updates; the anchor is where the parameters were."""
    tx = reptile(optax.sgd(1.0), every=2, meta_lr=0.5)
    p = {"w": jnp.zeros(1)}
    s = tx.init(p)
    for active, g, want in [(False, 1.0, -1.0), (False, 1.0, -2.0),  # count 2: no meta step
                            (True, 1.0, -3.0),
                            (True, 1.0, -3.0)]:  # count 4: -2 + 0.5·(-4 + 2) = -3
        u, s = tx.update({"w": jnp.full(1, g)}, s, p, reptile_active=active)
        p = optax.apply_updates(p, u)
        np.testing.assert_allclose(p["w"], [want])
    np.testing.assert_allclose(s.anchor["w"], [-3.0])


def test_inner_state_is_not_reset_and_extra_args_pass_through():
    seen = []

    def init(params):
        return jnp.zeros((), jnp.int32)

    def update(u, s, params=None, **extra):
        seen.append(sorted(extra))
        return u, s + 1

    inner = optax.GradientTransformationExtraArgs(init, update)
    tx = reptile(inner, every=1, meta_lr=0.5)
    p = {"w": jnp.ones(2)}
    s = tx.init(p)
    for _ in range(3):
        _, s = tx.update(p, s, p, foo=1)
    assert int(s.inner) == 3 and seen == [["foo"]] * 3


def test_bad_arguments():
    with pytest.raises(ValueError, match="every"):
        reptile(optax.sgd(0.1), every=0)
    with pytest.raises(ValueError, match="meta_lr"):
        reptile(optax.sgd(0.1), meta_lr=0.0)
    tx = reptile(optax.sgd(0.1))
    p = {"w": jnp.ones(2)}
    with pytest.raises(ValueError, match="params"):
        tx.update(p, tx.init(p))
