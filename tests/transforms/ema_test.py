"""Tests for clax.transforms.ema (EMA balancing)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from clax.params import train_only
from clax.transforms import EMABalancingState, ema_balancing, ema_params, find_state


def _run(tx, params, grads_seq, **extra):
    """Eager steps; returns the per-step (updates, state, new params)."""
    state = tx.init(params)
    out = []
    for grads in grads_seq:
        updates, state = tx.update(grads, state, params, **extra)
        params = optax.apply_updates(params, updates)
        out.append((updates, state, params))
    return out


def _scalar_tree(x):
    return {"w": jnp.array([x], jnp.float32)}


# ------------------------------------------------------------------ independent numpy references


def np_fixed_ema(thetas, decay):
    ema = None
    out = []
    for theta in thetas:
        ema = theta.copy() if ema is None else decay * ema + (1 - decay) * theta
        out.append(ema)
    return out


def np_adaptive_ema(thetas, grads, fallback):
    """CoIN's dynamic EMA for one tensor; returns the EMA and the rate of every step."""
    ema, prev, out, rates = None, None, [], []
    for theta, g in zip(thetas, grads, strict=True):
        theta, g = np.asarray(theta, np.float64), np.asarray(g, np.float64)
        if ema is None:
            # First step: EMA starts at θ_1; CoIN's KeyError branch uses the fallback (no-op).
            ema, alpha = theta.copy(), fallback
        else:
            a = np.abs(theta - ema).sum()
            b = np.abs(g).sum()
            c = np.abs(g - prev).sum()
            with np.errstate(divide="ignore", invalid="ignore"):
                alpha = 2.0 * (1.0 + b) / (a * c)
            if not 0 < alpha < 1:
                alpha = fallback
            ema = (1 - alpha) * ema + alpha * theta
        prev = g
        out.append(ema)
        rates.append(alpha)
    return out, rates


# ------------------------------------------------------------------------------------ fixed EMA


def test_fixed_ema_hand_computed_steps():
    # SGD lr 1: θ = 1 - cumsum(g) = 0, -2, -1, -1.5.
    grads = [_scalar_tree(g) for g in (1.0, 2.0, -1.0, 0.5)]
    steps = _run(ema_balancing(optax.sgd(1.0), decay=0.5), _scalar_tree(1.0), grads)
    # θ*_1 = θ_1 = 0; then θ* = 0.5 θ* + 0.5 θ_t: -1, -1, -1.25.
    expected = [0.0, -1.0, -1.0, -1.25]
    for (_, state, _), want in zip(steps, expected, strict=True):
        np.testing.assert_array_equal(ema_params(state)["w"], [want])
    assert int(steps[-1][1].count) == 4
    np.testing.assert_allclose(steps[-1][1].rates["w"], 0.5)
    assert steps[-1][1].prev_grads == ()  # not stored when not adaptive


def test_fixed_ema_decay_09_literals():
    grads = [_scalar_tree(g) for g in (1.0, 2.0, -1.0, 0.5)]
    steps = _run(ema_balancing(optax.sgd(1.0), decay=0.9), _scalar_tree(1.0), grads)
    # 0; 0.9*0 + 0.1*(-2) = -0.2; 0.9*(-0.2) + 0.1*(-1) = -0.28; 0.9*(-0.28) + 0.1*(-1.5).
    expected = [0.0, -0.2, -0.28, -0.402]
    got = [float(ema_params(s)["w"][0]) for _, s, _ in steps]
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_fixed_ema_matches_reference_on_a_tree_with_adam():
    rng = np.random.default_rng(0)
    params = {"a": jnp.asarray(rng.standard_normal((3, 4)), jnp.float32), "b": jnp.zeros(2)}
    grads = [jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape)), params)]
    grads += [jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape)), params)] * 4
    steps = _run(ema_balancing(optax.adam(0.1), decay=0.8), params, grads)
    for key in ("a", "b"):
        thetas = [np.asarray(p[key], np.float64) for _, _, p in steps]
        for (_, state, _), want in zip(steps, np_fixed_ema(thetas, 0.8), strict=True):
            np.testing.assert_allclose(ema_params(state)[key], want, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------- adaptive EMA


def test_adaptive_rate_hand_case_both_branches():
    # SGD lr 1 on one scalar. Step 2: a = 10, b = 10, c = 9.9 -> α = 22/99 in (0, 1).
    # Step 3: g = 0, a = (1 - 22/99)·10, c = 10 -> α = 2/a/10 in (0, 1).
    # Step 4: g = g_3 = 0 -> c = 0 -> α = inf -> fallback.
    grads = [_scalar_tree(g) for g in (0.1, 10.0, 0.0, 0.0)]
    steps = _run(
        ema_balancing(optax.sgd(1.0), adaptive=True, fallback_rate=0.05), _scalar_tree(0.0), grads
    )
    rates = [float(s.rates["w"]) for _, s, _ in steps]
    a3 = (1 - 22 / 99) * 10
    np.testing.assert_allclose(rates, [0.05, 22 / 99, 2 / (a3 * 10), 0.05], rtol=1e-5)

    thetas = [np.asarray(p["w"]) for _, _, p in steps]
    want, want_rates = np_adaptive_ema(thetas, [np.asarray(g["w"]) for g in grads], 0.05)
    np.testing.assert_allclose(rates, want_rates, rtol=1e-5)
    for (_, state, _), w in zip(steps, want, strict=True):
        np.testing.assert_allclose(ema_params(state)["w"], w, rtol=1e-5)
    # θ*_1 = θ_1 = -0.1 exactly, whatever the fallback rate.
    np.testing.assert_array_equal(ema_params(steps[0][1])["w"], thetas[0])


def test_adaptive_large_rate_falls_back():
    # Tiny moves and gradient changes: α = 2(1 + b)/(a c) >> 1, so every step falls back.
    grads = [_scalar_tree(g) for g in (1e-3, 2e-3, 1e-3)]
    steps = _run(ema_balancing(optax.sgd(1.0), adaptive=True), _scalar_tree(0.0), grads)
    # The fallback is selected, not computed: exactly float32(0.01) (not 0.01 within 1e-7,
    # which is below float32's resolution and held only by the luck of its rounding).
    np.testing.assert_array_equal([s.rates["w"] for _, s, _ in steps], [np.float32(0.01)] * 3)
    thetas = [np.asarray(p["w"]) for _, _, p in steps]
    want, _ = np_adaptive_ema(thetas, [np.asarray(g["w"]) for g in grads], 0.01)
    np.testing.assert_allclose(ema_params(steps[-1][1])["w"], want[-1], rtol=1e-6)


def test_adaptive_matches_numpy_reference_per_tensor():
    rng = np.random.default_rng(1)
    # Tensor "big" gets large moves (valid α), "small" tiny ones (fallback).
    params = {"big": jnp.zeros((4, 3)), "small": jnp.zeros(5)}
    grads = [
        {
            "big": jnp.asarray(rng.normal(0, 5, (4, 3)), jnp.float32),
            "small": jnp.asarray(rng.normal(0, 1e-3, 5), jnp.float32),
        }
        for _ in range(6)
    ]
    steps = _run(ema_balancing(optax.sgd(1.0), adaptive=True), params, grads)
    branches = set()
    for key in ("big", "small"):
        thetas = [np.asarray(p[key]) for _, _, p in steps]
        want, want_rates = np_adaptive_ema(thetas, [np.asarray(g[key]) for g in grads], 0.01)
        got_rates = [float(s.rates[key]) for _, s, _ in steps]
        np.testing.assert_allclose(got_rates, want_rates, rtol=1e-5)
        for (_, state, _), w in zip(steps, want, strict=True):
            np.testing.assert_allclose(ema_params(state)[key], w, rtol=1e-5, atol=1e-6)
        branches |= {"valid" if r != 0.01 else "fallback" for r in want_rates[1:]}
        # g_t is stored every step.
        np.testing.assert_array_equal(steps[-1][1].prev_grads[key], grads[-1][key])
    assert branches == {"valid", "fallback"}


# ------------------------------------------------------------------ wrapper behaviour, jit, chain


@pytest.mark.parametrize("adaptive", [False, True])
def test_updates_and_inner_state_pass_through_unchanged(adaptive):
    rng = np.random.default_rng(2)
    params = {"w": jnp.asarray(rng.standard_normal((3, 2)), jnp.float32)}
    grads = [{"w": jnp.asarray(rng.standard_normal((3, 2)), jnp.float32)} for _ in range(3)]
    bare = _run(optax.adam(0.05), params, grads)
    wrapped = _run(ema_balancing(optax.adam(0.05), adaptive=adaptive), params, grads)
    for (u0, s0, p0), (u1, s1, p1) in zip(bare, wrapped, strict=True):
        np.testing.assert_array_equal(u0["w"], u1["w"])
        np.testing.assert_array_equal(p0["w"], p1["w"])
        jax.tree.map(np.testing.assert_array_equal, s0, s1.inner)


@pytest.mark.parametrize("adaptive", [False, True])
def test_jit_does_not_retrace_and_matches_eager(adaptive):
    tx = ema_balancing(optax.sgd(0.1, momentum=0.9), adaptive=adaptive)
    traces = []

    @jax.jit
    def step(params, state, grads):
        traces.append(1)  # Python side effect: runs once per trace
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    rng = np.random.default_rng(3)
    params = {"w": jnp.asarray(rng.standard_normal(4), jnp.float32), "b": jnp.ones(())}
    grads = [
        jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32), params)
        for _ in range(3)
    ]
    p, state = params, tx.init(params)
    for g in grads:
        p, state = step(p, state, g)
    assert len(traces) == 1
    eager = _run(tx, params, grads)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
        ema_params(state),
        ema_params(eager[-1][1]),
    )

    # The state is a valid lax.scan carry: its dtypes and shapes do not change across steps.
    def body(carry, g):
        return step.__wrapped__(*carry, g), None

    (_, scanned), _ = jax.lax.scan(
        body, (params, tx.init(params)), jax.tree.map(lambda *x: jnp.stack(x), *grads)
    )
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
        ema_params(scanned),
        ema_params(state),
    )


def test_clipping_before_the_wrapper_feeds_clipped_gradients_to_the_rate():
    params = _scalar_tree(0.0)
    grads = [_scalar_tree(g) for g in (0.1, 30.0, 0.0)]
    clip = optax.clip_by_global_norm(10.0)
    outside = optax.chain(clip, ema_balancing(optax.sgd(1.0), adaptive=True))
    inside = ema_balancing(optax.chain(clip, optax.sgd(1.0)), adaptive=True)
    s_out, s_in = _run(outside, params, grads), _run(inside, params, grads)
    # Same training either way (clipping is stateless)...
    for (u0, _, _), (u1, _, _) in zip(s_out, s_in, strict=True):
        np.testing.assert_array_equal(u0["w"], u1["w"])
    # ...but the rate sees the clipped gradient only when clipping comes first.
    thetas = [np.asarray(p["w"]) for _, _, p in s_out]
    clipped = [np.asarray([0.1]), np.asarray([10.0]), np.asarray([0.0])]
    raw = [np.asarray(g["w"]) for g in grads]
    _, rates_clipped = np_adaptive_ema(thetas, clipped, 0.01)
    _, rates_raw = np_adaptive_ema(thetas, raw, 0.01)
    np.testing.assert_allclose(
        [float(s[1].rates["w"]) for _, s, _ in s_out], rates_clipped, rtol=1e-5
    )
    np.testing.assert_allclose([float(s.rates["w"]) for _, s, _ in s_in], rates_raw, rtol=1e-5)
    assert not np.allclose(rates_clipped, rates_raw)


def test_wrapper_first_in_a_chain_tracks_its_inner_trajectory():
    # Documented semantics: θ_t = params + inner updates, so a later transform is not seen.
    tx = optax.chain(ema_balancing(optax.sgd(1.0), decay=0.0), optax.scale(0.5))
    params = _scalar_tree(1.0)
    state = tx.init(params)
    updates, state = tx.update(_scalar_tree(2.0), state, params)
    np.testing.assert_allclose(updates["w"], [-1.0])  # 0.5 · (-2)
    np.testing.assert_allclose(ema_params(state)["w"], [-1.0])  # 1 - 2, the sgd step alone


def test_extra_args_reach_the_inner_transformation():
    def scale_by_factor():
        def update(updates, state, params=None, *, factor=1.0, **extra):
            del params, extra
            return jax.tree.map(lambda u: factor * u, updates), state

        return optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), update)

    tx = ema_balancing(scale_by_factor(), decay=0.0)
    params = _scalar_tree(1.0)
    updates, state = tx.update(_scalar_tree(2.0), tx.init(params), params, factor=3.0)
    np.testing.assert_allclose(updates["w"], [6.0])
    np.testing.assert_allclose(ema_params(state)["w"], [7.0])
    # A plain GradientTransformation ignores extra args instead of failing.
    plain = ema_balancing(optax.sgd(1.0))
    plain.update(_scalar_tree(2.0), plain.init(params), params, factor=3.0)


def test_ema_params_found_inside_chains_and_errors():
    params = _scalar_tree(1.0)
    tx = optax.chain(optax.clip_by_global_norm(1.0), ema_balancing(optax.adam(0.1)))
    state = tx.init(params)
    assert isinstance(find_state(state, EMABalancingState), EMABalancingState)
    np.testing.assert_array_equal(ema_params(state)["w"], [1.0])  # copy of params before step 1
    with pytest.raises(ValueError, match="no EMABalancingState found"):
        ema_params(optax.adam(0.1).init(params))
    nested = ema_balancing(ema_balancing(optax.sgd(0.1)))
    with pytest.raises(ValueError, match="2 EMABalancingState instances; ambiguous"):
        ema_params(nested.init(params))
    twice = optax.chain(ema_balancing(optax.sgd(0.1)), ema_balancing(optax.sgd(0.1)))
    with pytest.raises(ValueError, match="ambiguous"):
        ema_params(twice.init(params))


@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("jit", [False, True])
def test_a_constant_parameter_keeps_its_ema_exactly(adaptive, jit):
    # The wrapper around a base optimizer that freezes a leaf (train_only inside): that
    # leaf never moves, so its EMA must stay bit-identical to it (swapping the EMA in at a
    # task end must not move a frozen parameter). decay·θ + (1 − decay)·θ is not always θ
    # in float32; θ* + (1 − decay)·(θ − θ*) is.
    p = np.random.default_rng(0).normal(size=64).astype(np.float32)
    assert (np.float32(0.99) * p + np.float32(0.01) * p != p).any()  # the values matter
    params = {"w": jnp.zeros(3), "frozen": jnp.asarray(p)}
    tx = ema_balancing(train_only(optax.adam(0.1), {"w": True, "frozen": False}),
                       decay=0.99, adaptive=adaptive)
    update = jax.jit(tx.update) if jit else tx.update
    state = tx.init(params)
    rng = np.random.default_rng(1)
    for _ in range(5):
        grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32),
                             params)
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
    assert np.asarray(params["frozen"]).tobytes() == p.tobytes()
    assert np.asarray(ema_params(state)["frozen"]).tobytes() == p.tobytes()
    assert not np.array_equal(ema_params(state)["w"], params["w"])  # the EMA lags


def test_inside_train_only_tracks_the_trainable_leaves_only():
    # train_only around the wrapper: the EMA holds the trainable leaves (MaskedNode at the
    # frozen ones) and equals the EMA of those leaves alone.
    params = {"w": jnp.array([1.0, -1.0]), "frozen": jnp.array([3.0])}
    grads = [{"w": jnp.array([g, -g]), "frozen": jnp.array([5.0])} for g in (1.0, 0.5, -2.0)]
    steps = _run(train_only(ema_balancing(optax.sgd(0.5), decay=0.8),
                            {"w": True, "frozen": False}), params, grads)
    ema = ema_params(steps[-1][1])
    assert isinstance(ema["frozen"], optax.MaskedNode)
    thetas = [np.asarray(p["w"], np.float64) for _, _, p in steps]
    np.testing.assert_allclose(ema["w"], np_fixed_ema(thetas, 0.8)[-1], rtol=1e-6)
    np.testing.assert_array_equal(steps[-1][2]["frozen"], params["frozen"])


def test_preserves_low_precision_dtypes():
    params = {"w": jnp.ones(3, jnp.bfloat16)}
    tx = ema_balancing(optax.sgd(0.5), adaptive=True)
    state = tx.init(params)
    for _ in range(2):
        updates, state = tx.update({"w": jnp.ones(3, jnp.bfloat16)}, state, params)
        params = optax.apply_updates(params, updates)
    assert state.ema["w"].dtype == jnp.bfloat16
    assert state.prev_grads["w"].dtype == jnp.bfloat16
    assert state.rates["w"].dtype == jnp.float32
    assert state.count.dtype == jnp.int32


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"decay": 1.0}, "decay must be a number in \\[0.0, 1.0\\)"),
        ({"decay": -0.1}, "decay must be"),
        ({"fallback_rate": 0.0}, "fallback_rate must be a number in \\(0.0, 1.0\\)"),
        ({"fallback_rate": 1.0}, "fallback_rate must be"),
    ],
)
def test_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ema_balancing(optax.sgd(0.1), **kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"adaptive": 1}, r"adaptive must be a bool, got 1 \(int\)"),
        ({"decay": "0.9"}, r"decay must be a number in \[0.0, 1.0\), got '0.9' \(str\)"),
        ({"fallback_rate": None}, "fallback_rate must be a number"),
    ],
)
def test_wrong_hyperparameter_types(kwargs, match):
    with pytest.raises(TypeError, match=match):
        ema_balancing(optax.sgd(0.1), **kwargs)


def test_params_are_required():
    tx = ema_balancing(optax.sgd(0.1))
    params = _scalar_tree(1.0)
    with pytest.raises(ValueError, match="params"):
        tx.update(_scalar_tree(1.0), tx.init(params))
