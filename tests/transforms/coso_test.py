"""CoSO transform: numpy reference of CoSO's step, orthogonality, sketch, task end, errors."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from clax.models import make_model
from clax.params import train_only
from clax.params.paths import pure_tree
from clax.subspace.basis import SubspaceBasis, empty_basis, orthonormality_error
from clax.subspace.frequent_directions import sketch_covariance
from clax.transforms import find_state
from clax.transforms.coso import (
    CoSOState,
    coso,
    coso_bases,
    coso_mask,
    coso_task_end,
    merge_sketch,
)
from tests.subspace.frequent_directions_test import DoubleSVDReference

B1, B2, EPS = 0.9, 0.999, 1e-6


def _sign_fix(v, prev):
    """The transform's sign convention: agree with the previous P, else largest entry > 0."""
    out = v.copy()
    for j in range(v.shape[1]):
        overlap = 0.0 if prev is None else prev[:, j] @ v[:, j]
        if overlap != 0:
            s = np.sign(overlap)
        else:
            s = -1.0 if v[np.argmax(np.abs(v[:, j])), j] < 0 else 1.0
        out[:, j] *= s
    return out


def coso_reference(grads, q, *, r, ell, interval, decay=1.0, scale=1.0):
    """CoSO's per-step rule (``CoSOProjector.project`` + ``CoSOAdamW.step``) in numpy,
    Flax orientation: G (in, out), projections on the output side. Adam's eps on the
    bias-corrected sqrt(v̂) as in optax; all columns kept (rank_rtol=0)."""
    m = grads[0].shape[0]
    mu, nu = np.zeros((m, r)), np.zeros((m, r))
    proj, sketch, outs, projected = None, DoubleSVDReference(ell, decay), [], []
    for k, g in enumerate(grads):
        g = g.astype(np.float64)
        g = g - (g @ q) @ q.T
        projected.append(g)
        if proj is None or k % interval == 0:
            _, _, vh = np.linalg.svd(g, full_matrices=False)
            proj = _sign_fix(vh.T[:, :r], proj)
            sketch.increment_update(g.T)  # CoSO sketches the (out, in) gradient's columns
        low = g @ proj
        t = k + 1
        mu = B1 * mu + (1 - B1) * low
        nu = B2 * nu + (1 - B2) * low**2
        u = (mu / (1 - B1**t)) / (np.sqrt(nu / (1 - B2**t)) + EPS)
        outs.append(scale * u @ proj.T)
    return outs, sketch, projected


def _orthonormal(n, k, seed):
    return np.linalg.qr(np.random.default_rng(seed).normal(size=(n, k)))[0]


def _basis(q, capacity):
    k = q.shape[1]
    vectors = np.zeros((q.shape[0], capacity), np.float32)
    vectors[:, :k] = q
    return SubspaceBasis(jnp.asarray(vectors), jnp.asarray(k, jnp.int32))


def _grads(seed, steps, shape):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=shape).astype(np.float32) for _ in range(steps)]


@pytest.mark.parametrize("interval", [1, 2])
def test_matches_numpy_reference(interval):
    m, n, r, ell = 7, 6, 3, 4
    q = _orthonormal(n, 2, 0)
    grads = _grads(1, 5, (m, n))
    ref, ref_sketch, _ = coso_reference(grads, q, r=r, ell=ell, interval=interval, scale=0.5)
    tx = coso(proj_rank=r, sketch_rank=ell, update_interval=interval, rank_rtol=0.0, scale=0.5)
    params = {"w": jnp.zeros((m, n))}
    state = tx.init(params)
    bases = {"w": _basis(q, n)}
    update = jax.jit(tx.update)
    for g, want in zip(grads, ref, strict=False):
        out, state = update({"w": jnp.asarray(g)}, state, params, bases=bases)
        np.testing.assert_allclose(out["w"], want, rtol=1e-4, atol=1e-4)
    # The FD sketch of the projected gradients matches CoSO's DoubleSVD.
    sk = state.sketches["w"]
    np.testing.assert_allclose(sk.sigma, ref_sketch.sketch_sigma, rtol=1e-4, atol=1e-4)
    cov = ref_sketch.sketch_matrix @ ref_sketch.sketch_matrix.T
    np.testing.assert_allclose(sketch_covariance(sk), cov, rtol=1e-4, atol=1e-3)
    assert int(state.count) == len(grads)


def test_update_orthogonal_to_history_and_low_rank():
    """Every update is orthogonal to Q on the output side and has rank <= proj_rank."""
    m, n, r = 9, 8, 2
    q = _orthonormal(n, 3, 2)
    tx = coso(proj_rank=r, sketch_rank=4)
    params = {"w": jnp.zeros((m, n))}
    state, bases = tx.init(params), {"w": _basis(q, n)}
    update = jax.jit(tx.update)
    for g in _grads(3, 4, (m, n)):
        out, state = update({"w": jnp.asarray(g)}, state, params, bases=bases)
        u = np.asarray(out["w"], np.float64)
        # float32 tolerance: |U Q| <= 1e-5 ‖U‖ (matmuls at HIGHEST precision).
        assert np.abs(u @ q).max() <= 1e-5 * np.abs(u).max()
        assert np.linalg.matrix_rank(u, tol=1e-5 * np.abs(u).max()) <= r
    # The sketch's directions (with weight) lie in the complement of Q too.
    sk = state.sketches["w"]
    weighted = np.asarray(sk.directions * sk.sigma)
    assert np.abs(q.T @ weighted).max() <= 1e-5 * np.abs(weighted).max()


def test_gradient_orthogonal_to_history_is_unchanged_by_it():
    """A gradient already orthogonal to Q gets the update it gets with an empty basis."""
    m, n = 6, 5
    q = _orthonormal(n, 2, 4)
    rng = np.random.default_rng(5)
    g = rng.normal(size=(m, n))
    g = (g - (g @ q) @ q.T).astype(np.float32)
    tx = coso(proj_rank=2, sketch_rank=3)
    params = {"w": jnp.zeros((m, n))}
    update = jax.jit(tx.update)
    out_q, _ = update({"w": g}, tx.init(params), params, bases={"w": _basis(q, n)})
    out_0, _ = update({"w": g}, tx.init(params), params, bases={"w": empty_basis(n)})
    np.testing.assert_allclose(out_q["w"], out_0["w"], rtol=1e-5, atol=1e-5)


def test_other_leaves_use_plain_inner_and_conv_is_reshaped():
    params = {"conv": jnp.zeros((3, 3, 2, 4)), "bias": jnp.zeros((4,))}
    tx = coso(proj_rank=2, sketch_rank=3)
    state = tx.init(params)
    assert state.projectors["conv"].shape == (4, 2)
    assert state.projectors["bias"] is None
    bases = coso_bases(params)
    assert bases["conv"].vectors.shape == (4, 4) and bases["bias"] is None
    adam = optax.scale_by_adam(b1=B1, b2=B2, eps=EPS)
    adam_state = adam.init(params["bias"])
    update = jax.jit(tx.update)
    for g in _grads(6, 3, (3, 3, 2, 4)):
        gb = jnp.asarray(g[0, 0, 0])
        out, state = update({"conv": jnp.asarray(g), "bias": gb}, state, params, bases=bases)
        want, adam_state = adam.update(gb, adam_state)
        np.testing.assert_allclose(out["bias"], want, rtol=1e-6)
        assert out["conv"].shape == (3, 3, 2, 4)
        flat = np.asarray(out["conv"]).reshape(18, 4)
        assert np.linalg.matrix_rank(flat, tol=1e-5) <= 2


def test_merge_sketch_follows_coso_rule():
    n = 6
    rng = np.random.default_rng(7)
    q = _orthonormal(n, 2, 8)
    u = rng.normal(size=(n, 3))
    u = np.linalg.qr(u - q @ (q.T @ u))[0]
    sigma = np.array([3.0, 2.0, 1.0])  # energy ratios 9/14, 13/14, 1
    from clax.subspace.frequent_directions import FrequentDirections

    sketch = FrequentDirections(jnp.asarray(u, jnp.float32), jnp.asarray(sigma, jnp.float32))
    merge = jax.jit(merge_sketch)
    for threshold, want in [(0.5, 0), (0.9, 1), (0.95, 2), (13 / 14, 1), (0.99, 2)]:
        # r = #{k : cumsum(σ²)/Σσ² < threshold} (strict), CoSO's update_historical_space.
        grown = merge(_basis(q, n), sketch, np.float32(threshold))
        assert int(grown.rank) == 2 + want, (threshold, int(grown.rank))
        np.testing.assert_allclose(grown.vectors[:, :2], q, atol=1e-6)
        np.testing.assert_allclose(np.abs(np.asarray(grown.vectors[:, 2:2 + want]).T @ u),
                                   np.eye(3)[:want], atol=1e-5)
        np.testing.assert_array_equal(grown.vectors[:, 2 + want:], 0.0)
        assert float(orthonormality_error(grown)) < 1e-5
    # Capacity truncation: a basis with one free column takes one direction.
    small = _basis(q, 3)
    assert int(merge(small, sketch, np.float32(0.99)).rank) == 3
    # An empty sketch (no gradient) adds nothing.
    empty = FrequentDirections(jnp.zeros((n, 3)), jnp.zeros((3,)))
    assert int(merge(_basis(q, n), empty, np.float32(0.9)).rank) == 2
    with pytest.raises(ValueError, match=r"threshold must be a scalar in \(0, 1\)"):
        merge_sketch(_basis(q, n), sketch, 1.0)


def test_task_end_merges_and_resets():
    m, n = 8, 6
    params = {"w": jnp.zeros((m, n)), "b": jnp.zeros((n,))}
    tx = coso(proj_rank=2, sketch_rank=3)
    state, bases = tx.init(params), coso_bases(params)
    grads = [{"w": jnp.asarray(g), "b": jnp.asarray(g[0])} for g in _grads(9, 3, (m, n))]
    update = jax.jit(tx.update)
    for g in grads:
        _, state = update(g, state, params, bases=bases)
    new_bases, reset = jax.jit(coso_task_end)(bases, state, threshold=0.9)
    assert jax.tree.structure(new_bases) == jax.tree.structure(bases)
    assert jax.tree.map(jnp.shape, reset) == jax.tree.map(jnp.shape, state)
    assert 0 < int(new_bases["w"].rank) <= 3
    assert float(orthonormality_error(new_bases["w"])) < 1e-5
    assert int(reset.count) == 0
    np.testing.assert_array_equal(reset.sketches["w"].sigma, 0.0)
    # The next task's first step is the first step of a fresh CoSO with the new bases:
    # the Adam moments and count start over (CoSO deletes them at a task start).
    out, _ = update(grads[0], reset, params, bases=new_bases)
    fresh, _ = update(grads[0], tx.init(params), params, bases=new_bases)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), out, fresh)


def test_no_retrace_and_refresh_by_count():
    params = {"w": jnp.zeros((5, 4))}
    tx = coso(proj_rank=2, sketch_rank=2, update_interval=3)
    state, bases = tx.init(params), coso_bases(params)
    traces = []

    @jax.jit
    def step(state, g):
        traces.append(1)
        return tx.update({"w": g}, state, params, bases=bases)

    projectors = []
    for g in _grads(10, 7, (5, 4)):
        _, state = step(state, jnp.asarray(g))
        projectors.append(np.asarray(state.projectors["w"]))
    assert len(traces) == 1
    changed = [not np.array_equal(a, b) for a, b in itertools.pairwise(projectors)]
    # Refreshes at counts 0, 3, 6: P changes entering steps 3 and 6 only.
    assert changed == [False, False, True, False, False, True]


def test_mask_and_errors():
    params = {"w": jnp.zeros((4, 3)), "b": jnp.zeros((3,))}
    tx = coso()
    state = tx.init(params)
    g = jax.tree.map(jnp.ones_like, params)
    with pytest.raises(ValueError, match="missing keyword extra arg `bases`"):
        tx.update(g, state, params)
    bad = {"w": empty_basis(4), "b": None}
    with pytest.raises(ValueError, match=r"basis at 'w' has vectors of shape \(4, 4\).*\(4, 3\)"):
        tx.update(g, state, params, bases=bad)
    with pytest.raises(ValueError, match="bases must be a tree shaped like the gradients"):
        tx.update(g, state, params, bases={"w": empty_basis(3)})
    with pytest.raises(TypeError, match=r"bases at 'w' must be a SubspaceBasis"):
        tx.update(g, state, params, bases={"w": None, "b": None})
    with pytest.raises(ValueError, match=r"coso mask selects 'b' of shape \(3,\)"):
        coso_mask(params, {"w": True, "b": True})
    assert coso_mask(params, lambda p: {"w": False, "b": False}) == {"w": False, "b": False}
    with pytest.raises(TypeError, match=r"coso mask at 'w' must be a bool, got 1 \(int\)"):
        coso_mask(params, {"w": 1, "b": False})
    for kwargs, msg in [({"proj_rank": 0}, "proj_rank"), ({"sketch_decay": 0.0}, "sketch_decay"),
                        ({"rank_rtol": 1.0}, "rank_rtol"),
                        ({"scale": float("inf")}, "scale must be a finite number")]:
        with pytest.raises(ValueError, match=msg):
            coso(**kwargs)
    for kwargs, msg in [({"update_interval": 1.5}, r"update_interval must be a positive int, "
                         r"got 1.5 \(float\)"), ({"scale": "2"}, "scale must be a finite number"),
                        ({"sketch_decay": None}, r"sketch_decay must be a number in \(0.0, 1.0\]")]:
        with pytest.raises(TypeError, match=msg):
            coso(**kwargs)
    assert isinstance(state, CoSOState)


# ------------------------------------------------- nnx.Optimizer and train_only


@pytest.mark.parametrize("jit", [False, True])
def test_through_nnx_optimizer_with_dict_bases_matches_optax_on_dicts(jit):
    # nnx.Optimizer initialises with an nnx.State of nnx.Param and updates with an
    # nnx.State of arrays; the bases (pure dicts) are matched by path. Reference: the same
    # transform through plain optax on pure dicts, step for step.
    model = make_model("mlp", input_shape=(2, 2, 1), num_classes=3, widths=(4,), seed=0)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(5, 2, 2, 1)), jnp.float32)
    y = jnp.arange(5) % 3

    def loss(model):
        return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

    tx = optax.chain(coso(proj_rank=2, sketch_rank=3), optax.sgd(0.1))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    bases = coso_bases(params)
    state = tx.init(params)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    def step(model, optimizer, bases):
        optimizer.update(model, nnx.grad(loss)(model), bases=bases)

    step = nnx.jit(step) if jit else step
    pure_loss = lambda p: loss(nnx.merge(nnx.graphdef(model), p))  # noqa: E731
    for _ in range(3):
        grads = jax.grad(pure_loss)(params)
        updates, state = tx.update(grads, state, params, bases=bases)
        params = optax.apply_updates(params, updates)
        step(model, optimizer, bases)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 nnx.to_pure_dict(nnx.state(model, nnx.Param)), params)
    # The task end reads the optimizer's state too.
    new_bases, _ = coso_task_end(bases, pure_tree(optimizer.opt_state)[0], threshold=0.9)
    want, _ = coso_task_end(bases, state[0], threshold=0.9)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
                 new_bases, want)


def test_inside_train_only_uses_full_bases_for_the_trainable_weights():
    # Bases over every weight (as the coso method's memory); train_only hands coso only
    # the trainable ones. The frozen weight gets an exact zero update and its basis is
    # neither read nor grown at the task end.
    m, n = 6, 4
    params = {"lora": jnp.zeros((m, n)), "base": jnp.zeros((m, n)), "b": jnp.zeros((n,))}
    mask = {"lora": True, "base": False, "b": True}
    q = _orthonormal(n, 1, 3)
    bases = coso_bases(params)
    bases["lora"] = _basis(q, n)
    bases["base"] = _basis(_orthonormal(n, 2, 4), n)
    tx = train_only(coso(proj_rank=2, sketch_rank=3, rank_rtol=0.0), mask)
    plain = coso(proj_rank=2, sketch_rank=3, rank_rtol=0.0)
    sub = {"lora": params["lora"], "b": params["b"]}
    sub_bases = {"lora": bases["lora"], "b": None}
    state, plain_state = tx.init(params), plain.init(sub)
    update = jax.jit(tx.update)
    for g in _grads(5, 3, (m, n)):
        grads = {"lora": jnp.asarray(g), "base": jnp.asarray(g) + 1.0, "b": jnp.asarray(g[0])}
        out, state = update(grads, state, params, bases=bases)
        want, plain_state = plain.update({"lora": grads["lora"], "b": grads["b"]},
                                         plain_state, sub, bases=sub_bases)
        np.testing.assert_allclose(out["lora"], want["lora"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(out["b"], want["b"], rtol=1e-5, atol=1e-6)
        assert np.asarray(out["base"]).tobytes() == np.zeros((m, n), np.float32).tobytes()
        # Orthogonal to the trainable weight's history, on the output side.
        assert np.abs(np.asarray(out["lora"]) @ q).max() < 1e-5
    inner = find_state(state, CoSOState)
    new_bases, _ = jax.jit(coso_task_end)(bases, inner, threshold=0.9)
    assert int(new_bases["lora"].rank) > 1  # grew from the task's sketch
    jax.tree.map(np.testing.assert_array_equal, new_bases["base"], bases["base"])
    with pytest.raises(ValueError, match="path 'lora' is in the gradients but not in bases"):
        update(grads, state, params, bases={"base": bases["base"], "b": None})
