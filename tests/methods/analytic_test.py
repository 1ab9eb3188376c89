"""The registered closed-form heads ``acil``, ``ncm`` and ``lda`` in the training loop."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import clax
from clax.analytic import prototypes as protos
from clax.methods.analytic import freeze_after
from clax.models import make_model
from clax.training import ModelFns, default_config, make_method, train_continual
from tests.training.helpers import tiny_config, tiny_scenario

GAMMA, BUFFER = 1.0, 64


def _run(method, scenario=None, **hp):
    config = tiny_config()
    config.method.name = method
    config.method[method].update(hp)
    return train_continual(config, scenario=scenario or tiny_scenario(), keep_state=True)


def _features(result, x):
    state = result.state
    return np.asarray(result.model.features(state.params, state.model_state, x), np.float64)


def _all_train(scenario):
    return (np.concatenate([t.x_train for t in scenario.tasks]),
            np.concatenate([t.y_train for t in scenario.tasks]))


def _check_eval_uses_head(result, scenario, logits_fn):
    """The loop's last accuracy row equals the accuracy of the head computed here."""
    for j, task in enumerate(scenario.tasks):
        pred = np.asarray(logits_fn(_features(result, task.x_test))).argmax(1)
        assert result.accuracy_matrix[-1, j] == pytest.approx(np.mean(pred == task.y_test))


@pytest.fixture(scope="module")
def scenario():
    return tiny_scenario()


def test_registered_with_defaults():
    config = default_config()
    for name in ("acil", "ncm", "lda"):
        assert name in clax.registered_methods()
    assert config.method.acil.gamma == 0.1
    assert config.method.acil.buffer_size == 2048
    assert config.method.ncm.teen_alpha == 0.0 and config.method.ncm.teen_tau == 16.0
    assert config.method.lda.shrinkage == 1.0


@pytest.mark.parametrize("base", [optax.adam(0.1), optax.sgd(0.1, momentum=0.9)])
def test_freeze_after_zeroes_every_update_from_task_one(base):
    tx = optax.chain(optax.add_decayed_weights(0.1), base, freeze_after(1))
    params = {"w": jnp.ones(3)}
    state = tx.init(params)
    grads = {"w": jnp.array([1.0, -2.0, 3.0])}
    update = jax.jit(tx.update)
    u, state = update(grads, state, params, task_index=jnp.int32(0))
    assert np.abs(np.asarray(u["w"])).min() > 0
    for _ in range(2):  # momentum / Adam moments are non-zero, updates must still be zero
        u, state = update(grads, state, params, task_index=jnp.int32(1))
        np.testing.assert_array_equal(u["w"], 0.0)
    with pytest.raises(TypeError, match="task_index"):
        tx.update(grads, state, params)


def test_acil_backbone_frozen_and_head_is_ridge(scenario):
    result = _run("acil", scenario, gamma=GAMMA, buffer_size=BUFFER)
    # The head learned task 0 with the features the backbone had at the end of task 0 and
    # task 1 with those at the end of task 1; both equal the final features only if task 1
    # did not move the backbone, so the ridge check below also checks the freezing.
    memory = result.state.memory
    x, y = _all_train(scenario)
    h = np.maximum(_features(result, x) @ np.asarray(memory.projection, np.float64), 0)
    want = np.linalg.solve(h.T @ h + GAMMA * np.eye(BUFFER), h.T @ np.eye(4)[y])
    scale = np.abs(want).max()
    np.testing.assert_allclose(np.asarray(memory.weights) / scale, want / scale, atol=1e-4)
    np.testing.assert_array_equal(memory.class_counts, np.bincount(y, minlength=4))
    _check_eval_uses_head(result, scenario, lambda f: h_logits(f, memory))
    assert result.accuracy_matrix[-1].mean() > 0.6


def h_logits(f, memory):
    h = np.maximum(f @ np.asarray(memory.projection, np.float64), 0)
    return np.where(np.asarray(memory.class_counts) > 0, h @ np.asarray(memory.weights), -1e9)


def test_ncm_head_is_class_means_with_teen(scenario):
    teen_alpha = 0.5
    result = _run("ncm", scenario, teen_alpha=teen_alpha)
    memory = result.state.memory
    x, y = _all_train(scenario)
    f = _features(result, x)
    means = np.stack([f[y == c].mean(0) for c in range(4)])
    np.testing.assert_allclose(protos.class_means(memory["stats"]), means, rtol=1e-4,
                               atol=1e-4)
    base = np.isin(np.arange(4), scenario.tasks[0].classes)
    np.testing.assert_array_equal(memory["base"], base)
    prototypes = np.asarray(protos.teen_calibrate(jnp.asarray(means, jnp.float32),
                                                  jnp.asarray(base), jnp.asarray(~base),
                                                  alpha=teen_alpha))

    def logits(q):
        unit = prototypes / np.linalg.norm(prototypes, axis=1, keepdims=True)
        return q / np.linalg.norm(q, axis=1, keepdims=True) @ unit.T

    _check_eval_uses_head(result, scenario, logits)


def test_lda_head_is_fsa_formula(scenario):
    result = _run("lda", scenario)
    memory = result.state.memory
    x, y = _all_train(scenario)
    f = _features(result, x)
    sigma = np.cov(f, rowvar=False) + np.eye(f.shape[1])
    means = np.stack([f[y == c].mean(0) for c in range(4)])
    w = np.linalg.solve(sigma, means.T)
    b = np.sum(means.T * w, 0)
    np.testing.assert_allclose(memory["weights"], w, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(memory["bias"], b, rtol=1e-3, atol=1e-3)
    _check_eval_uses_head(result, scenario, lambda q: q @ w - 0.5 * b)


def test_bad_hyperparameters_and_models():
    with pytest.raises(ValueError, match="gamma"):
        make_method("acil", gamma=0.0)
    with pytest.raises(ValueError, match="buffer_size"):
        make_method("acil", buffer_size=-1)
    with pytest.raises(ValueError, match="teen_alpha"):
        make_method("ncm", teen_alpha=1.5)
    with pytest.raises(ValueError, match="shrinkage"):
        make_method("lda", shrinkage=0.0)
    with pytest.raises(ValueError, match="num_tasks"):
        freeze_after(0)
    model = make_model("mlp", input_shape=(4, 4, 1), num_classes=4, num_tasks=2, widths=(8,),
                       seed=0)
    _, params, _ = ModelFns.split(model)
    for name in ("acil", "ncm", "lda"):
        with pytest.raises(ValueError, match="single linear head"):
            make_method(name).init_memory(params)
