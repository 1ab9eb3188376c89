"""The Method contract and registry."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from clax.training import Method, make_method, register_method, registered_methods
from clax.training.baselines import union_of_seen_tasks
from tests.training.helpers import tiny_scenario


def test_baselines_are_registered():
    assert {"finetune", "joint"} <= set(registered_methods())


def test_unknown_method_lists_choices():
    with pytest.raises(ValueError, match="valid choices: .*finetune.*joint"):
        make_method("no_such_method")


def test_unknown_hyperparameter_lists_valid_ones():
    @register_method("_test_scaled")
    def scaled(*, factor: float = 2.0) -> Method:
        return Method(name="_test_scaled", transform=optax.scale(factor))

    with pytest.raises(ValueError, match=r"unknown hyperparameter\(s\) \['fctor'\].*factor"):
        make_method("_test_scaled", fctor=3.0)
    assert make_method("_test_scaled", factor=3.0).name == "_test_scaled"


def test_optimizer_chains_transform_base_post_in_order():
    m = Method(name="m", transform=optax.scale(2.0), post_transform=optax.scale(-1.0))
    tx = m.optimizer(optax.sgd(0.5))
    g = {"w": jnp.ones(3)}
    updates, _ = tx.update(g, tx.init(g), g)
    # 1 * 2 (pre) * -0.5 (sgd) * -1 (post) = 1
    np.testing.assert_allclose(updates["w"], np.ones(3))


def test_joint_trains_on_the_union_of_seen_tasks():
    scenario = tiny_scenario()
    union = union_of_seen_tasks(scenario.tasks, 1)
    n0, n1 = (len(t.y_train) for t in scenario.tasks[:2])
    assert len(union.y) == n0 + n1
    np.testing.assert_array_equal(union.task_ids, np.r_[np.zeros(n0), np.ones(n1)])
    assert set(np.unique(union.y)) == set(scenario.tasks[0].classes) | set(
        scenario.tasks[1].classes
    )
