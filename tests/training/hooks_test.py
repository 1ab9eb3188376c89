"""Method hooks meet the loop's rules: aliasing, fixed shapes, wrappers, configs."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from clax.core import Method, chain_around
from clax.models import make_model
from clax.training import build_optimizer, train_continual
from tests.training.helpers import tiny_config, tiny_scenario


def _anchor_method(user_array=None):
    """EWC-like memory: an anchor copy of the params, set again at every task end."""

    def init_memory(params):
        memory = {"anchor": params}  # the same buffers as params: must not break donation
        if user_array is not None:
            memory["user"] = user_array
        return memory

    def consolidate(state, ctx):
        return state._replace(memory={**state.memory, "anchor": state.params})

    def loss_terms(params, ctx):
        diff = jax.tree.map(lambda p, a: jnp.sum((p - a) ** 2), params, ctx.memory["anchor"])
        return 1e-3 * sum(jax.tree.leaves(diff))

    return Method(name="anchor", init_memory=init_memory, consolidate=consolidate,
                  loss_terms=loss_terms)


@pytest.mark.parametrize("num_devices", [1, 8])
def test_memory_sharing_params_and_user_arrays_survive_donation(num_devices):
    user = jnp.arange(4.0)
    result = train_continual(tiny_config(num_devices=num_devices), scenario=tiny_scenario(),
                             method=_anchor_method(user), keep_state=True)
    np.testing.assert_array_equal(np.asarray(user), np.arange(4.0))  # not deleted
    jax.tree.map(np.testing.assert_array_equal, result.state.memory["anchor"],
                 result.state.params)


def test_consolidate_that_changes_memory_shape_is_refused():
    def grow(state, ctx):
        return state._replace(memory=jnp.zeros((ctx.task_index + 2, 3)))

    method = Method(name="grower", init_memory=lambda p: jnp.zeros((1, 3)), consolidate=grow)
    with pytest.raises(ValueError, match=r"grower.*consolidate changed state.memory"):
        train_continual(tiny_config(), scenario=tiny_scenario(), method=method)


def _scale_by_factor():
    def update(updates, state, params=None, *, factor, **extra):
        return jax.tree.map(lambda u: u * factor, updates), state

    return optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), update)


def test_wrapper_forwards_extra_args():
    calls = []

    def counting_wrapper(inner):
        def init(params):
            return inner.init(params)

        def update(updates, state, params=None, **extra):
            calls.append(sorted(extra))
            return inner.update(updates, state, params, **extra)

        return optax.GradientTransformationExtraArgs(init, update)

    method = Method(name="wrapped",
                    optimizer=chain_around(before=_scale_by_factor(), wrap=counting_wrapper),
                    extra_args=lambda ctx: {"factor": jnp.float32(1.0)})
    R = train_continual(tiny_config(), scenario=tiny_scenario(), method=method).accuracy_matrix
    assert calls and "factor" in calls[0] and R[0, 0] > 0.9


def test_wrapper_dropping_extra_args_is_refused():
    method = Method(name="bad_wrapper", optimizer=lambda tx: optax.GradientTransformation(
        tx.init, lambda u, s, p=None: tx.update(u, s, p)))
    with pytest.raises(TypeError, match="forwards \\*\\*extra_args"):
        method.optimizer(optax.sgd(0.1))


def test_multi_head_model_on_class_incremental_scenario_is_refused():
    scenario = tiny_scenario()
    model = make_model("mlp", input_shape=scenario.input_shape, num_classes=4, num_tasks=2,
                       widths=(8,), seed=0)
    with pytest.raises(ValueError, match="gives no task ids"):
        train_continual(tiny_config(), scenario=scenario, model=model)


def test_optimizer_settings_it_does_not_use_are_refused():
    c = tiny_config()
    c.optimizer.name = "adam"
    c.optimizer.momentum = 0.9
    with pytest.raises(ValueError, match="momentum=0.9 is not used by 'adam'"):
        build_optimizer(c.optimizer)


def test_unknown_train_key_is_refused():
    c = tiny_config()
    c.train.unlock()
    c.train.epocs_per_task = 3
    with pytest.raises(ValueError, match="config.train.epocs_per_task.*epochs_per_task"):
        train_continual(c, scenario=tiny_scenario())


def test_predict_hook_replaces_the_head_at_evaluation():
    """A method whose memory holds class scores: evaluation must use them, not the head."""
    scenario = tiny_scenario()
    favourite = 1  # a class of the first task only

    def predict(memory, features, task_ids):
        assert features.ndim == 2  # penultimate features, (B, D)
        return jnp.broadcast_to(memory["scores"], (features.shape[0], memory["scores"].size))

    method = Method(
        name="fixed_prediction",
        init_memory=lambda params: {"scores": jax.nn.one_hot(favourite, 4)},
        predict=predict,
    )
    result = train_continual(tiny_config(), scenario=scenario, method=method)
    for i, task in enumerate(scenario.tasks):
        expected = float(np.mean(task.y_test == favourite))
        np.testing.assert_allclose(result.accuracy_matrix[-1, i], expected, atol=1e-6)
