"""One contract every registered method must meet.

For each name in `registered_methods()` (with default hyperparameters): it chains with SGD
and Adam and trains to finite results; its jitted step does not recompile on later calls
of the same shape; its whole train state (optimizer state and memory included)
round-trips through an orbax checkpoint; and 8 simulated devices give the same result as
one. New methods are picked up automatically.
"""

import jax
import numpy as np
import optax
import pytest

from clax.core import Batch, ModelFns, make_method, registered_methods
from clax.models import make_model
from clax.training import StepFns, data_mesh, train_continual
from clax.training.checkpoint import Checkpointer
from clax.training.feed import epoch_index_batches
from tests.training.helpers import tiny_config, tiny_scenario

METHODS = [m for m in registered_methods() if not m.startswith("_test")]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_trains_with_base_optimizer(method, optimizer):
    config = tiny_config()
    config.method.name = method
    config.optimizer.name = optimizer
    config.optimizer.learning_rate = 0.1 if optimizer == "sgd" else 0.01
    result = train_continual(config, scenario=tiny_scenario())
    R = result.accuracy_matrix
    assert np.isfinite(R).all()
    assert R[0, 0] > 0.6, f"{method} with {optimizer} did not learn the first task: {R}"


@pytest.mark.parametrize("method", METHODS)
def test_no_recompilation_and_checkpoint_round_trip(method, tmp_path):
    scenario = tiny_scenario("permuted")  # equal task sizes: one compiled chunk shape
    model = make_model("mlp", input_shape=scenario.input_shape,
                       num_classes=scenario.num_classes, widths=(16,), seed=0)
    fns, params, model_state = ModelFns.split(model)
    m = make_method(method)
    steps = StepFns(fns, m, m.optimizer(optax.adam(1e-2)), data_mesh(1))
    state = steps.init_state(params, model_state, 0)
    for t in range(2):
        data = m.training_data(scenario.tasks, t)
        batch = steps.replicate(Batch(data.x, data.y, data.task_ids))
        idx = epoch_index_batches(len(data.y), 32, seed=0, task_index=t, epoch=0)[:4]
        state, _ = steps.run_chunk(state, batch, idx, t)
        compiled = steps.train_chunk._cache_size()
        state, _ = steps.run_chunk(state, batch, idx[:3], t)  # shorter: same padded shape
        assert steps.train_chunk._cache_size() == compiled, "recompiled on the second call"
    if len(m.training_data(scenario.tasks, 1).y) == len(m.training_data(scenario.tasks, 0).y):
        assert steps.train_chunk._cache_size() == 1, "recompiled for a task of the same shape"

    ckpt = Checkpointer(str(tmp_path / "ckpt"))
    ckpt.save(state, {"task": 2})
    restored, meta = ckpt.restore(state)
    assert meta == {"task": 2}
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 _keyless(restored), _keyless(state))


def _is_key(x):
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _keyless(tree):
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


@pytest.mark.parametrize("method", METHODS)
def test_eight_devices_equal_one(method):
    scenario = tiny_scenario()
    runs = []
    for n in (1, 8):
        config = tiny_config(num_devices=n)
        config.method.name = method
        runs.append(train_continual(config, scenario=scenario, keep_state=True))
    np.testing.assert_allclose(runs[0].accuracy_matrix, runs[1].accuracy_matrix)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
                 runs[0].state.params, runs[1].state.params)
