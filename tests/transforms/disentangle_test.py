"""GU transform: retain invariance, the joint formula, Adam geometry, rank-k span, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from clax.transforms.disentangle import (
    GeometricUnlearningState,
    geometric_disentanglement,
    geometric_unlearning_adam,
)

# float32 tolerance on a normalised inner product: |⟨u, g⟩| <= TOL·‖u‖·‖g‖.
TOL = 1e-5


def _tree(rng, lead=()):
    return {
        "dense": {"kernel": jnp.asarray(rng.normal(size=(*lead, 5, 3)), jnp.float32),
                  "bias": jnp.asarray(rng.normal(size=(*lead, 3)), jnp.float32)},
        "scale": jnp.asarray(rng.normal(size=(*lead, 4)), jnp.float32),
    }


def _flat(tree):
    return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)])


def _stacked_flat(tree):
    leaves = jax.tree.leaves(tree)
    k = leaves[0].shape[0]
    return np.concatenate([np.asarray(x, np.float64).reshape(k, -1) for x in leaves], axis=1)


def _cos(a, b):
    return abs(a @ b) / (np.linalg.norm(a) * np.linalg.norm(b))


def test_rank1_projection_only_is_orthogonal_to_retain_gradient():
    rng = np.random.default_rng(0)
    g_f, g_r = _tree(rng), _tree(rng)
    tx = geometric_disentanglement(alpha=0.0)
    out, _ = jax.jit(tx.update)(g_f, tx.init(g_f), None, retain_grads=g_r)
    u, r, f = _flat(out), _flat(g_r), _flat(g_f)
    assert _cos(u, r) <= TOL
    # It is the global (not per-tensor) rank-1 projection.
    np.testing.assert_allclose(u, f - (f @ r) / (r @ r) * r, rtol=1e-5, atol=1e-6)


def test_joint_form_matches_formula():
    rng = np.random.default_rng(1)
    g_f, g_r = _tree(rng), _tree(rng)
    gamma, alpha = 0.7, 0.3
    tx = geometric_disentanglement(gamma=gamma, alpha=alpha)
    out, state = tx.update(g_f, tx.init(g_f), None, retain_grads=g_r)
    f, r = _flat(g_f), _flat(g_r)
    want = gamma * (f - (f @ r) / (r @ r) * r) + alpha * r
    np.testing.assert_allclose(_flat(out), want, rtol=1e-5, atol=1e-6)
    assert int(state.count) == 1 and state.nu == ()


def test_orthogonal_gradient_unchanged_and_zero_retain():
    rng = np.random.default_rng(2)
    g_r = _tree(rng)
    f, r = _flat(_tree(rng)), _flat(g_r)
    f = f - (f @ r) / (r @ r) * r
    leaves, treedef = jax.tree.flatten(g_r)
    parts, i = [], 0
    for x in leaves:
        parts.append(jnp.asarray(f[i:i + x.size].reshape(x.shape), jnp.float32))
        i += x.size
    g_f = treedef.unflatten(parts)
    tx = geometric_disentanglement(alpha=0.0)
    out, _ = tx.update(g_f, tx.init(g_f), None, retain_grads=g_r)
    np.testing.assert_allclose(_flat(out), f, rtol=1e-5, atol=1e-6)
    # A zero retain gradient (projection_eps floor) leaves the forget gradient as is.
    zeros = jax.tree.map(jnp.zeros_like, g_r)
    out, _ = tx.update(g_f, tx.init(g_f), None, retain_grads=zeros)
    np.testing.assert_allclose(_flat(out), f, rtol=1e-6, atol=1e-7)


def test_rank_k_span_orthogonal_to_every_retain_gradient_with_dependent_ones():
    rng = np.random.default_rng(3)
    g_f = _tree(rng)
    per_ex = _tree(rng, lead=(4,))
    # Make example 3 a combination of 0 and 1 (dependent) and example 2 a copy of 0.
    per_ex = jax.tree.map(lambda x: x.at[3].set(2 * x[0] - x[1]).at[2].set(x[0]), per_ex)
    tx = geometric_disentanglement(subspace="span", alpha=0.0)
    out, _ = jax.jit(tx.update)(g_f, tx.init(g_f), None, retain_grads=per_ex)
    u, rows, f = _flat(out), _stacked_flat(per_ex), _flat(g_f)
    for row in rows:
        assert _cos(u, row) <= TOL
    # Exactly the projection onto the complement of the (rank-2) span.
    q = np.linalg.qr(rows[:2].T)[0]
    np.testing.assert_allclose(u, f - q @ (q.T @ f), rtol=1e-4, atol=1e-5)
    # Joint form: + α·mean of the per-example gradients.
    tx = geometric_disentanglement(subspace="span", gamma=2.0, alpha=0.5)
    out, _ = tx.update(g_f, tx.init(g_f), None, retain_grads=per_ex)
    np.testing.assert_allclose(_flat(out), 2.0 * (f - q @ (q.T @ f)) + 0.5 * rows.mean(0),
                               rtol=1e-4, atol=1e-5)


def test_adam_geometry_invariance_and_mirrored_second_moment():
    rng = np.random.default_rng(4)
    params = _tree(rng)
    gu = geometric_disentanglement(geometry="adam", alpha=0.0, b2=0.9, eps=1e-8)
    adam = optax.scale_by_adam(b1=0.0, b2=0.9, eps=1e-8)
    s_gu, s_adam = gu.init(params), adam.init(params)
    for step in range(4):
        g_f, g_r = _tree(rng), _tree(rng)
        count = int(s_gu.count)
        d = jax.tree.map(
            lambda v, c=count: np.sqrt(np.asarray(v) / (1 - 0.9**max(c, 1))) + 1e-8 if c else
            np.ones_like(v), s_gu.nu)
        out, s_gu = gu.update(g_f, s_gu, None, retain_grads=g_r)
        # Invariance in the metric D of this step: ⟨g_r, out / D⟩ = 0.
        assert _cos(_flat(jax.tree.map(lambda o, dd: o / dd, out, d)), _flat(g_r)) <= TOL
        if step == 0:  # D = 1 before Adam has a state: the Euclidean projection.
            assert _cos(_flat(out), _flat(g_r)) <= TOL
        _, s_adam = adam.update(out, s_adam)
        # GU's ν is the downstream β1 = 0 Adam's ν.
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), s_gu.nu,
                     s_adam.nu)
    # The applied step of the full chain is near-orthogonal to g_r once ν has settled (Adam's
    # D' includes this step's output, GU's D does not: the first steps leak), while the same
    # Adam on the raw forget gradient is not.
    tx = geometric_unlearning_adam(1e-2, alpha=0.0, b2=0.999)
    plain = optax.chain(optax.scale_by_adam(b1=0.0, b2=0.999), optax.scale_by_learning_rate(1e-2))
    state, plain_state = tx.init(params), plain.init(params)
    update, plain_update = jax.jit(tx.update), jax.jit(plain.update)
    for k in range(16):
        g_r = _tree(rng)
        g_f = jax.tree.map(lambda a, b: a + 2 * b, _tree(rng), g_r)  # correlated with g_r
        step, state = update(g_f, state, params, retain_grads=g_r)
        plain_step, plain_state = plain_update(g_f, plain_state, params)
        if k >= 10:
            assert _cos(_flat(step), _flat(g_r)) < 0.05
            assert _cos(_flat(plain_step), _flat(g_r)) > 0.5


def test_no_retrace():
    rng = np.random.default_rng(5)
    tx = geometric_disentanglement(subspace="span", geometry="adam")
    g = _tree(rng)
    state = tx.init(g)
    traces = []

    @jax.jit
    def step(state, g_f, g_r):
        traces.append(1)
        return tx.update(g_f, state, None, retain_grads=g_r)

    for _ in range(3):
        _, state = step(state, _tree(rng), _tree(rng, lead=(3,)))
    assert len(traces) == 1 and isinstance(state, GeometricUnlearningState)


def test_errors_name_the_argument_and_leaf():
    rng = np.random.default_rng(6)
    g = _tree(rng)
    tx = geometric_disentanglement()
    state = tx.init(g)
    with pytest.raises(ValueError, match="missing keyword extra arg `retain_grads`"):
        tx.update(g, state, None)
    missing = {"dense": {"kernel": g["dense"]["kernel"]}, "scale": g["scale"]}
    with pytest.raises(ValueError, match="path 'dense/bias' is in the forget gradients but "
                                         "not in retain_grads"):
        tx.update(g, state, None, retain_grads=missing)
    # Retain gradients of parameters the update does not hold (frozen ones) are ignored.
    extra = {**g, "other": g["scale"]}
    jax.tree.map(np.testing.assert_array_equal, tx.update(g, state, None, retain_grads=extra)[0],
                 tx.update(g, state, None, retain_grads=g)[0])
    wrong = {**g, "scale": jnp.zeros((5,))}
    with pytest.raises(ValueError,
                       match=r"retain_grads at 'scale' has shape \(5,\); expected \(4,\)"):
        tx.update(g, state, None, retain_grads=wrong)
    span = geometric_disentanglement(subspace="span")
    with pytest.raises(ValueError, match=r"retain_grads at 'dense/bias' has shape \(3,\); expected "
                                         r"\(k, 3\)"):
        span.update(g, span.init(g), None, retain_grads=g)
    for kwargs, msg in [({"subspace": "rank2"}, r"subspace must be one of \['mean', 'span'\]"),
                        ({"geometry": "sgd"}, "geometry"), ({"b2": 1.0}, "b2"),
                        ({"eps": -1e-8}, "eps must be a finite number > 0")]:
        with pytest.raises(ValueError, match=msg):
            geometric_disentanglement(**kwargs)
    for kwargs, msg in [({"gamma": "1"}, r"gamma must be a finite number >= 0, got '1' \(str\)"),
                        ({"subspace": None}, "subspace must be one of"),
                        ({"alpha": True}, "alpha must be a finite number")]:
        with pytest.raises(TypeError, match=msg):
            geometric_disentanglement(**kwargs)


@pytest.mark.parametrize("name", ["gamma", "alpha", "b2", "eps", "tolerance",
                                  "projection_eps"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0])
def test_float_hyperparameters_must_be_finite_and_in_range(name, bad):
    # gamma=nan (or a negative weight, eps=-1, ...) used to build a transform whose
    # updates were NaN (or pointed the wrong way); it is refused at construction.
    with pytest.raises(ValueError, match=rf"^{name} must be a (finite number|number in).*"
                                         rf"got {bad}$"):
        geometric_disentanglement(**{name: bad})


@pytest.mark.parametrize("name", ["eps", "projection_eps"])
def test_zero_floors_are_refused(name):
    # A zero floor divides by zero: a zero retain gradient (mean) or second moment (adam)
    # gave NaN updates.
    with pytest.raises(ValueError, match=rf"^{name} must be a finite number > 0, got 0.0$"):
        geometric_disentanglement(**{name: 0.0})


def test_span_with_zero_stacked_retain_gradients_is_refused():
    # k = 0 per-example gradients used to fail in the reshape with "integer modulo by zero".
    g = _tree(np.random.default_rng(8))
    tx = geometric_disentanglement(subspace="span")
    empty = jax.tree.map(lambda a: jnp.zeros((0, *a.shape)), g)
    with pytest.raises(ValueError, match=r"retain_grads must stack k >= 1 per-example .*"
                                         r"\(subspace='span'\), got k=0"):
        tx.update(g, tx.init(g), None, retain_grads=empty)


def test_inside_train_only_projects_over_the_trainable_leaves():
    from clax.params import train_only

    rng = np.random.default_rng(11)
    g_f = {"a": jnp.asarray(rng.standard_normal((3, 4)), jnp.float32),
           "b": jnp.asarray(rng.standard_normal((5,)), jnp.float32)}
    g_r = {"a": jnp.asarray(rng.standard_normal((3, 4)), jnp.float32),
           "b": jnp.asarray(rng.standard_normal((5,)), jnp.float32)}
    tx = train_only(geometric_disentanglement(alpha=0.0), {"a": True, "b": False})
    out, _ = tx.update(g_f, tx.init(g_f), g_f, retain_grads=g_r)
    np.testing.assert_array_equal(out["b"], 0.0)  # frozen: exact zero
    f, r = np.asarray(g_f["a"], np.float64), np.asarray(g_r["a"], np.float64)
    expect = f - (f * r).sum() / (r * r).sum() * r  # rank-1 projection on the trainable leaf
    np.testing.assert_allclose(out["a"], expect, rtol=1e-5, atol=1e-6)
    assert abs(float((np.asarray(out["a"]) * r).sum())) < 1e-4
