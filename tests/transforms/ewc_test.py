"""Tests for clax.transforms.ewc: EWC / online EWC / L2 penalty transforms and consolidation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from clax.models import make_model
from clax.params import train_only
from clax.transforms import (
    consolidate_ewc,
    ewc_penalty,
    ewc_penalty_value,
    init_ewc_memory,
    l2_penalty,
)


def _tree(seed, positive=False):
    rng = np.random.default_rng(seed)
    make = (lambda s: rng.uniform(0, 2, s)) if positive else (lambda s: rng.normal(size=s))
    return {"dense": {"kernel": jnp.asarray(make((3, 4)), jnp.float32),
                      "bias": jnp.asarray(make((4,)), jnp.float32)},
            "scale": jnp.asarray(make((2,)), jnp.float32)}


PARAMS, ANCHOR, GRADS = _tree(0), _tree(1), _tree(2)
FISHER = _tree(3, positive=True)


def _close(a, b):
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6), a, b)


def test_update_is_gradient_of_penalty():
    lam = 3.5
    tx = ewc_penalty(lam=lam)
    updates, _ = tx.update(GRADS, tx.init(PARAMS), PARAMS, fisher=FISHER, anchor=ANCHOR)
    penalty_grad = jax.grad(lambda p: ewc_penalty_value(p, FISHER, ANCHOR, lam=lam))(PARAMS)
    _close(updates, jax.tree.map(jnp.add, GRADS, penalty_grad))
    # numpy reference of the value: (λ/2) Σ F (θ − θ*)², with the ½.
    value = 0.5 * lam * sum(np.sum(np.asarray(f) * (np.asarray(p) - np.asarray(a)) ** 2)
                            for f, p, a in zip(*map(jax.tree.leaves, (FISHER, PARAMS, ANCHOR)),
                                                strict=True))
    np.testing.assert_allclose(ewc_penalty_value(PARAMS, FISHER, ANCHOR, lam=lam), value,
                               rtol=1e-5)


def test_l2_and_scalar_fisher_are_gradient_of_half_squared_distance():
    lam = 0.7
    expected = jax.grad(lambda p: 0.5 * lam * sum(
        jnp.sum((u - v) ** 2)
        for u, v in zip(jax.tree.leaves(p), jax.tree.leaves(ANCHOR), strict=True)))(PARAMS)
    zeros = jax.tree.map(jnp.zeros_like, GRADS)
    tx = l2_penalty(lam=lam)
    _close(tx.update(zeros, tx.init(PARAMS), PARAMS, anchor=ANCHOR)[0], expected)
    tx = ewc_penalty(lam=lam)
    _close(tx.update(zeros, tx.init(PARAMS), PARAMS, fisher=jnp.float32(1), anchor=ANCHOR)[0],
           expected)


def test_chained_before_sgd_under_jit_is_sgd_on_penalised_loss():
    lam, lr = 2.0, 0.1
    tx = optax.chain(ewc_penalty(lam=lam), optax.sgd(lr))
    state = tx.init(PARAMS)
    step = jax.jit(lambda g, s, p, f, a: tx.update(g, s, p, fisher=f, anchor=a, other=1))
    updates, _ = step(GRADS, state, PARAMS, FISHER, ANCHOR)
    expected = jax.tree.map(lambda g, p, f, a: -lr * (g + lam * f * (p - a)),
                            GRADS, PARAMS, FISHER, ANCHOR)
    _close(updates, expected)


def test_separate_consolidation_equals_sum_of_per_task_penalties():
    lam = 1.3
    tasks = [(_tree(10 + t, positive=True), _tree(20 + t)) for t in range(3)]
    memory = init_ewc_memory(PARAMS, mode="separate")
    for fisher, theta in tasks:
        memory = consolidate_ewc(memory, fisher, theta, mode="separate")
    assert int(memory.count) == 3
    tx = ewc_penalty(lam=lam)
    zeros = jax.tree.map(jnp.zeros_like, PARAMS)
    got, _ = tx.update(zeros, tx.init(PARAMS), PARAMS, fisher=memory.fisher,
                       anchor=memory.anchor)
    expected = jax.grad(lambda p: sum(ewc_penalty_value(p, f, a, lam=lam) for f, a in tasks))(
        PARAMS)
    _close(got, expected)
    _close(memory.fisher, jax.tree.map(lambda *f: sum(f), *[f for f, _ in tasks]))


def test_online_consolidation_decays_and_keeps_latest_anchor():
    gamma = 0.5
    memory = init_ewc_memory(PARAMS, mode="online")
    assert memory.weighted_anchor == ()
    f1, f2 = _tree(11, positive=True), _tree(12, positive=True)
    memory = consolidate_ewc(memory, f1, ANCHOR, mode="online", decay=gamma)
    memory = consolidate_ewc(memory, f2, GRADS, mode="online", decay=gamma)
    _close(memory.fisher, jax.tree.map(lambda a, b: gamma * a + b, f1, f2))
    jax.tree.map(np.testing.assert_array_equal, memory.anchor, GRADS)
    # Same structure, shapes and dtypes as the initial memory (fixed capacity).
    init = init_ewc_memory(PARAMS, mode="online")
    assert jax.tree.structure(memory) == jax.tree.structure(init)
    assert [(x.shape, x.dtype) for x in jax.tree.leaves(memory)] == \
        [(x.shape, x.dtype) for x in jax.tree.leaves(init)]


def test_bad_input_names_the_leaf_path():
    with pytest.raises(ValueError, match="lam"):
        ewc_penalty(lam=-1.0)
    with pytest.raises(ValueError, match="lam"):
        l2_penalty(lam=float("nan"))
    tx = ewc_penalty(lam=1.0)
    state = tx.init(PARAMS)
    with pytest.raises(ValueError, match="fisher= and anchor="):
        tx.update(GRADS, state, PARAMS, anchor=ANCHOR)
    missing = {"dense": FISHER["dense"]}
    with pytest.raises(ValueError, match="scale"):
        tx.update(GRADS, state, PARAMS, fisher=missing, anchor=ANCHOR)
    wrong_shape = {**FISHER, "scale": jnp.ones(3)}
    with pytest.raises(ValueError, match="scale.*shape"):
        tx.update(GRADS, state, PARAMS, fisher=wrong_shape, anchor=ANCHOR)
    negative = {**FISHER, "dense": {**FISHER["dense"], "bias": -FISHER["dense"]["bias"]}}
    with pytest.raises(ValueError, match="dense/bias.*negative"):
        tx.update(GRADS, state, PARAMS, fisher=negative, anchor=ANCHOR)
    nan = {**FISHER, "scale": jnp.array([jnp.nan, 1.0])}
    with pytest.raises(ValueError, match="scale.*non-finite"):
        tx.update(GRADS, state, PARAMS, fisher=nan, anchor=ANCHOR)
    memory = init_ewc_memory(PARAMS, mode="online")
    with pytest.raises(ValueError, match="decay"):
        consolidate_ewc(memory, FISHER, PARAMS, mode="online", decay=1.5)
    with pytest.raises(ValueError, match="dense/bias.*negative"):
        consolidate_ewc(memory, negative, PARAMS, mode="online")
    with pytest.raises(ValueError, match="mode"):
        init_ewc_memory(PARAMS, mode="sum")
    with pytest.raises(TypeError, match=r"mode must be one of \['separate', 'online'\]"):
        init_ewc_memory(PARAMS, mode=1)
    with pytest.raises(TypeError, match=r"decay \(γ\) must be a number in \[0.0, 1.0\]"):
        consolidate_ewc(memory, FISHER, PARAMS, mode="online", decay=None)
    with pytest.raises(TypeError, match="lam"):
        ewc_penalty(lam=True)
    with pytest.raises(ValueError, match="ewc_penalty needs the current parameters"):
        tx.update(GRADS, state, None, fisher=FISHER, anchor=ANCHOR)
    with pytest.raises(ValueError, match="l2_penalty needs the current parameters"):
        l2_penalty(lam=1.0).update(GRADS, state, anchor=ANCHOR)


# ------------------------------------------------------------ nnx.Optimizer (user loops)


def _nnx_setup():
    model = make_model("mlp", input_shape=(2, 2, 1), num_classes=3, widths=(4,), seed=0)
    x, y = jnp.ones((3, 2, 2, 1)), jnp.arange(3)

    def loss(model):
        return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

    return model, loss


def _step(jit):
    def step(model, optimizer, loss, **extra):
        optimizer.update(model, nnx.grad(loss)(model), **extra)

    return nnx.jit(step, static_argnames="loss") if jit else step


@pytest.mark.parametrize("form", ["dict", "state"])
@pytest.mark.parametrize("jit", [False, True])
def test_penalty_through_nnx_optimizer_matches_optax_on_dicts(form, jit):
    # nnx.Optimizer passes nnx.State params/updates; fisher/anchor given as pure dicts or
    # nnx.State (of nnx.Param copies) are matched by path. Reference: plain optax on dicts.
    model, loss = _nnx_setup()
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    anchor = jax.tree.map(lambda p: p + 0.5, params)
    fisher = jax.tree.map(lambda p: jnp.full(p.shape, 2.0), params)
    if form == "state":
        anchor_arg = nnx.state(nnx.clone(model), nnx.Param)  # nnx.Param wrappers
        nnx.replace_by_pure_dict(anchor_arg, anchor)
        fisher_arg = nnx.state(nnx.clone(model), nnx.Param)
        nnx.replace_by_pure_dict(fisher_arg, fisher)
    else:
        anchor_arg, fisher_arg = anchor, fisher
    grads = nnx.to_pure_dict(nnx.grad(loss)(model))
    tx = optax.chain(ewc_penalty(lam=0.5), optax.sgd(0.1))
    updates, _ = tx.update(grads, tx.init(params), params, fisher=fisher, anchor=anchor)
    want = optax.apply_updates(params, updates)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    _step(jit)(model, optimizer, loss, fisher=fisher_arg, anchor=anchor_arg)
    _close(nnx.to_pure_dict(nnx.state(model, nnx.Param)), want)


@pytest.mark.parametrize("jit", [False, True])
def test_an_anchor_that_is_the_live_parameters_is_refused(jit):
    model, loss = _nnx_setup()
    optimizer = nnx.Optimizer(model, optax.chain(l2_penalty(lam=1.0), optax.sgd(0.1)),
                              wrt=nnx.Param)
    with pytest.raises(ValueError, match=r"anchor is the live parameters.*jax.tree.map\("
                                         r"jnp.copy, nnx.to_pure_dict"):
        _step(jit)(model, optimizer, loss, anchor=nnx.state(model, nnx.Param))
    # The same tree passed to optax directly: the same arrays as params.
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    tx = ewc_penalty(lam=1.0)
    with pytest.raises(ValueError, match="anchor is the live parameters: anchor and params "
                                         "are the same array at 'head/bias'"):
        tx.update(params, tx.init(params), params, fisher=1.0, anchor=params)
    # A copy is fine.
    snapshot = jax.tree.map(jnp.copy, params)
    _step(jit)(model, optimizer, loss, anchor=snapshot)


def test_penalty_errors_name_the_path_not_a_treedef():
    params = {"dense": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones(4)}}
    tx = ewc_penalty(lam=1.0)
    with pytest.raises(ValueError, match="path 'dense/bias' is in params but not in anchor"):
        tx.update(params, tx.init(params), params, fisher=1.0,
                  anchor={"dense": {"kernel": jnp.zeros((3, 4))}})
    with pytest.raises(ValueError, match=r"differ at path 'dense/kernel': shape \(3, 4\) vs "
                                         r"\(4, 3\)"):
        tx.update(params, tx.init(params), params, fisher=1.0,
                  anchor={"dense": {"kernel": jnp.zeros((4, 3)), "bias": jnp.zeros(4)}})


def test_memory_of_an_nnx_state_is_pure_dicts():
    model, _ = _nnx_setup()
    state = nnx.state(model, nnx.Param)
    memory = init_ewc_memory(state)
    assert isinstance(memory.anchor, dict) and isinstance(memory.fisher, dict)
    fisher = jax.tree.map(jnp.ones_like, state)  # an nnx.State Fisher
    new = consolidate_ewc(memory, fisher, state)
    assert isinstance(new.fisher, dict) and int(new.count) == 1


# ------------------------------------------------- train_only (parameter-efficient training)


@pytest.mark.parametrize("jit", [False, True])
def test_inside_train_only_penalises_the_trainable_leaf_only(jit):
    # train_only hands ewc_penalty only the trainable leaf (MaskedNode at the frozen one);
    # the Fisher and anchor stay full-tree memory and are read at the trainable path.
    params = {"lora": jnp.array([1.0, -2.0, 0.5]), "base": jnp.array([[3.0, 4.0]])}
    grads = {"lora": jnp.array([0.1, 0.2, -0.3]), "base": jnp.array([[5.0, -6.0]])}
    fisher = {"lora": jnp.array([2.0, 0.5, 1.0]), "base": jnp.array([[7.0, 8.0]])}
    anchor = {"lora": jnp.array([0.0, -1.0, 1.5]), "base": jnp.array([[-3.0, 0.0]])}
    mask = {"lora": True, "base": False}
    lam = 0.75
    tx = train_only(ewc_penalty(lam=lam), mask)

    def update(g, p, f, a):
        return tx.update(g, tx.init(p), p, fisher=f, anchor=a)[0]

    out = (jax.jit(update) if jit else update)(grads, params, fisher, anchor)
    g, f, p, a = (np.asarray(t["lora"], np.float64) for t in (grads, fisher, params, anchor))
    np.testing.assert_allclose(out["lora"], g + lam * f * (p - a), rtol=1e-6)
    assert np.asarray(out["base"]).tobytes() == np.zeros((1, 2), np.float32).tobytes()
    # L2 (a scalar Fisher) the same way.
    tx = train_only(l2_penalty(lam=lam), mask)
    out = tx.update(grads, tx.init(params), params, anchor=anchor)[0]
    np.testing.assert_allclose(out["lora"], g + lam * (p - a), rtol=1e-6)
    np.testing.assert_array_equal(out["base"], 0.0)


def test_inside_train_only_a_trainable_leaf_without_memory_is_an_error():
    params = {"lora": jnp.ones(3), "base": jnp.ones(2)}
    tx = train_only(ewc_penalty(lam=1.0), {"lora": True, "base": False})
    only_base = {"base": jnp.ones(2)}
    with pytest.raises(ValueError, match="path 'lora' is in params but not in anchor"):
        tx.update(params, tx.init(params), params, fisher=1.0, anchor=only_base)
    full = {"lora": jnp.ones(3), "base": jnp.ones(2)}
    with pytest.raises(ValueError, match="path 'lora' is in params but not in fisher"):
        tx.update(params, tx.init(params), params, fisher=only_base, anchor=full)
    with pytest.raises(ValueError, match=r"differ at path 'lora': shape \(3,\) vs \(2,\)"):
        tx.update(params, tx.init(params), params, fisher=1.0,
                  anchor={"lora": jnp.ones(2), "base": jnp.ones(2)})
