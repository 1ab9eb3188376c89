"""The Method contract and registry."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from clax.core import (
    Method,
    after,
    around,
    before,
    chain_around,
    make_method,
    register_method,
    registered_methods,
)
from clax.methods.baselines import union_of_seen_tasks
from tests.training.helpers import tiny_scenario


def test_baselines_are_registered():
    assert {"finetune", "joint"} <= set(registered_methods())


def test_unknown_method_lists_choices():
    with pytest.raises(ValueError, match="valid choices: .*finetune.*joint"):
        make_method("no_such_method")


def test_unknown_hyperparameter_lists_valid_ones():
    @register_method("_test_scaled")
    def scaled(*, factor: float = 2.0) -> Method:
        return Method(name="_test_scaled", optimizer=before(optax.scale(factor)))

    with pytest.raises(ValueError, match=r"unknown hyperparameter\(s\) \['fctor'\].*factor"):
        make_method("_test_scaled", fctor=3.0)
    assert make_method("_test_scaled", factor=3.0).name == "_test_scaled"


def test_optimizer_chains_before_base_after_in_order():
    m = Method(name="m", optimizer=chain_around(before=optax.scale(2.0),
                                                after=optax.add_noise(0.0, 0.0, 0)))
    g = {"w": jnp.ones(3)}
    for tx, want in [
        # 1 * 2 (before) * -0.5 (sgd) = -1
        (m.optimizer(optax.sgd(0.5)), -1.0),
        # before/after alone: the transform goes on its side of the base
        (before(optax.scale(2.0))(optax.sgd(0.5)), -1.0),
        (after(optax.add_decayed_weights(0.0))(optax.sgd(0.5)), -0.5),
    ]:
        updates, _ = tx.update(g, tx.init(g), g)
        np.testing.assert_allclose(updates["w"], want * np.ones(3))
    # after() sees the update: clipping after sgd(0.5) clips -0.5, not the raw 1
    tx = after(optax.clip(0.1))(optax.sgd(0.5))
    updates, _ = tx.update(g, tx.init(g), g)
    np.testing.assert_allclose(updates["w"], -0.1 * np.ones(3))
    tx = before(optax.clip(0.1))(optax.sgd(0.5))
    updates, _ = tx.update(g, tx.init(g), g)
    np.testing.assert_allclose(updates["w"], -0.05 * np.ones(3))


def test_around_and_bad_optimizer_hooks():
    calls = []

    def wrap(tx):
        calls.append(tx)
        return tx

    Method(name="w", optimizer=around(wrap)).optimizer(optax.sgd(0.1))
    assert len(calls) == 1
    bad = Method(name="bad", optimizer=lambda tx: optax.GradientTransformation(tx.init, tx.update))
    with pytest.raises(TypeError, match="'bad': optimizer must return an "
                       "optax.GradientTransformationExtraArgs"):
        bad.optimizer(optax.sgd(0.1))
    with pytest.raises(TypeError, match="consolidate must be callable"):
        Method(name="m", consolidate=3)


def test_joint_trains_on_the_union_of_seen_tasks():
    scenario = tiny_scenario()
    union = union_of_seen_tasks(scenario.tasks, 1)
    n0, n1 = (len(t.y_train) for t in scenario.tasks[:2])
    assert len(union.y) == n0 + n1
    np.testing.assert_array_equal(union.task_ids, np.r_[np.zeros(n0), np.ones(n1)])
    assert set(np.unique(union.y)) == set(scenario.tasks[0].classes) | set(
        scenario.tasks[1].classes
    )
