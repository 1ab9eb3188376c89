"""The `Unlearner` contract, its registry and the registered unlearners (no driver)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import clax.methods  # noqa: F401  (registers the unlearners)
from clax.core import (
    Batch,
    Classification,
    LanguageModeling,
    Unlearner,
    UnlearnStepContext,
    make_unlearner,
    register_unlearner,
    registered_unlearners,
    unlearner_hyperparameters,
)
from clax.unlearning import gradient_ascent_loss, npo_loss, retain_loss

D, C, B = 5, 3, 8


def _batch(seed, n=B):
    rng = np.random.default_rng(seed)
    return Batch(x=jnp.asarray(rng.normal(size=(n, D)), jnp.float32),
                 y=jnp.asarray(rng.integers(0, C, n), jnp.int32),
                 task_ids=jnp.zeros((n,), jnp.int32))


def _params(seed):
    rng = np.random.default_rng(seed)
    return {"w": jnp.asarray(rng.normal(size=(D, C)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=(C,)), jnp.float32)}


def _ctx(reference, objective=None):
    return UnlearnStepContext(
        reference=reference, model_state={}, memory=(), rng=jax.random.key(0),
        step=jnp.zeros((), jnp.int32), objective=objective or Classification(),
        apply=lambda p, x, t: x @ p["w"] + p["b"])


def _logits(p, batch):
    return batch.x @ p["w"] + p["b"]


def test_registry_lists_the_unlearners_and_checks_names():
    assert {"ga", "npo", "ssd", "acu"} <= set(registered_unlearners())
    assert unlearner_hyperparameters("npo")["beta"] == 0.1
    assert unlearner_hyperparameters("ga")["gu"] is False
    with pytest.raises(ValueError, match="unknown unlearner 'gaa'; valid choices: .*ga"):
        make_unlearner("gaa")
    with pytest.raises(ValueError, match=r"unknown hyperparameter\(s\) \['bet'\]; valid: "):
        make_unlearner("npo", bet=1.0)
    with pytest.raises(ValueError, match="already registered"):
        register_unlearner("ga")(lambda: None)


def test_contract_needs_exactly_one_procedure():
    loss = lambda params, forget, retain, ctx: 0.0  # noqa: E731
    edit = lambda state, ctx: (state, {})  # noqa: E731
    assert Unlearner(name="x", loss=loss).is_gradient
    assert not Unlearner(name="x", edit=edit).is_gradient
    with pytest.raises(ValueError, match="exactly one of loss"):
        Unlearner(name="x", loss=loss, edit=edit)
    with pytest.raises(ValueError, match="exactly one of loss"):
        Unlearner(name="x")
    with pytest.raises(ValueError, match="belong to a gradient procedure"):
        Unlearner(name="x", edit=edit, extra_args=lambda *a: {})
    with pytest.raises(TypeError, match="loss must be callable"):
        Unlearner(name="x", loss=3)


def test_losses_match_the_classifier_building_blocks():
    params, reference = _params(0), _params(1)
    forget, retain = _batch(2), _batch(3)
    ctx = _ctx(reference)
    ga = make_unlearner("ga").loss(params, forget, retain, ctx)
    np.testing.assert_allclose(ga, gradient_ascent_loss(_logits(params, forget), forget.y),
                               rtol=1e-6)
    graddiff = make_unlearner("ga", forget_weight=2.0, retain_weight=0.5).loss(
        params, forget, retain, ctx)
    np.testing.assert_allclose(
        graddiff, 2.0 * gradient_ascent_loss(_logits(params, forget), forget.y)
        + 0.5 * retain_loss(_logits(params, retain), retain.y), rtol=1e-6)
    npo = make_unlearner("npo", beta=0.3).loss(params, forget, retain, ctx)
    np.testing.assert_allclose(
        npo, npo_loss(_logits(params, forget), _logits(reference, forget), forget.y, beta=0.3),
        rtol=1e-6)
    # At θ = θ_ref NPO is (2/β)·log 2 and its gradient is GA's (MODELS §16).
    at_ref = make_unlearner("npo", beta=0.3)
    np.testing.assert_allclose(at_ref.loss(reference, forget, retain, _ctx(reference)),
                               2 / 0.3 * np.log(2), rtol=1e-6)
    g_npo = jax.grad(at_ref.loss)(reference, forget, retain, _ctx(reference))
    g_ga = jax.grad(make_unlearner("ga").loss)(reference, forget, retain, _ctx(reference))
    for a, b in zip(jax.tree.leaves(g_npo), jax.tree.leaves(g_ga), strict=False):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_losses_are_objective_agnostic():
    # A "language model": logits (B, L, V) from token embeddings, next-token targets.
    rng = np.random.default_rng(0)
    table = {"e": jnp.asarray(rng.normal(size=(7, 7)), jnp.float32)}
    x = jnp.asarray(rng.integers(0, 7, (4, 6)), jnp.int32)
    y = x.at[:, -1].set(-1)  # the last position has no target
    batch = Batch(x=x, y=y, task_ids=jnp.zeros((4,), jnp.int32))
    ctx = UnlearnStepContext(reference=table, model_state={}, memory=(),
                             rng=jax.random.key(0), step=jnp.zeros((), jnp.int32),
                             objective=LanguageModeling(), apply=lambda p, x, t: p["e"][x])
    ga = make_unlearner("ga").loss(table, batch, batch, ctx)
    np.testing.assert_allclose(-ga, LanguageModeling().per_example_loss(table["e"][x], batch)
                               .mean(), rtol=1e-6)
    assert np.isfinite(make_unlearner("npo").loss(table, batch, batch, ctx))


@pytest.mark.parametrize("subspace", ["mean", "span"])
def test_gu_forget_step_is_orthogonal_to_the_retain_gradients(subspace):
    params = _params(0)
    forget, retain = _batch(2), _batch(3)
    ctx = _ctx(params)
    u = make_unlearner("ga", gu=True, gu_subspace=subspace, gu_k=4, gu_geometry="euclidean",
                       retain_weight=0.0)
    tx = u.optimizer(optax.sgd(1.0))
    grads = jax.grad(u.loss)(params, forget, retain, ctx)
    extra = u.extra_args(params, forget, retain, ctx)
    updates, _ = tx.update(grads, tx.init(params), params, **extra)
    flat = lambda t: jnp.concatenate([a.reshape(-1) for a in jax.tree.leaves(t)])  # noqa: E731
    retain_grads = extra["retain_grads"]
    if subspace == "mean":
        np.testing.assert_allclose(flat(retain_grads), flat(jax.grad(ctx.loss)(params, retain)),
                                   rtol=1e-5)
        rows = flat(retain_grads)[None]
    else:
        assert jax.tree.leaves(retain_grads)[0].shape[0] == 4
        rows = jnp.concatenate([a.reshape(4, -1) for a in jax.tree.leaves(retain_grads)], 1)
    assert float(jnp.linalg.norm(flat(updates))) > 1e-3
    np.testing.assert_allclose(rows @ flat(updates), 0.0, atol=1e-4)


def test_gu_span_needs_enough_retain_examples():
    u = make_unlearner("npo", gu=True, gu_subspace="span", gu_k=16)
    with pytest.raises(ValueError, match="gu_k=16 per-example retain gradients need a retain "
                                         "batch of at least 16"):
        u.extra_args(_params(0), _batch(1), _batch(2), _ctx(_params(0)))


@pytest.mark.parametrize("name, kwargs, message", [
    ("ga", {"gu_subspace": "rank"}, r"gu_subspace must be one of \['mean', 'span'\], got 'rank'"),
    ("ga", {"retain_weight": -1.0}, "retain_weight must be a finite number >= 0, got -1.0"),
    ("ga", {"gu": 1}, r"gu must be a bool, got 1 \(int\)"),
    ("npo", {"beta": 0.0}, "beta must be a finite number > 0, got 0.0"),
    ("ssd", {"alpha": -1.0}, "alpha must be a finite number > 0, got -1.0"),
    ("ssd", {"fisher_granularity": "layer"}, "fisher_granularity must be one of"),
    ("ssd", {"search_target": 0.01, "search_alphas": ()}, "search_alphas must hold"),
    ("acu", {"batch_size": 0}, "batch_size must be a positive int, got 0"),
])
def test_bad_hyperparameters_give_one_line(name, kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message) as e:
        make_unlearner(name, **kwargs)
    assert "\n" not in str(e.value)
