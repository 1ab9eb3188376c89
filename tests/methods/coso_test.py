"""The registered `coso` method: task-end merge, protected subspace, frozen leaves, errors."""

import jax
import numpy as np
import optax
import pytest

from clax.core import Batch, ModelFns, make_method
from clax.methods import coso_update_memory
from clax.models import make_model
from clax.subspace.basis import orthonormality_error
from clax.training import StepFns, data_mesh
from clax.training.feed import epoch_index_batches
from clax.transforms.coso import CoSOState
from clax.transforms.ema import find_state
from tests.training.helpers import tiny_scenario


def _train_task(steps, method, state, scenario, t, n_steps=6):
    data = method.training_data(scenario.tasks, t)
    batch = steps.replicate(Batch(data.x, data.y, data.task_ids))
    idx = epoch_index_batches(len(data.y), 32, seed=0, task_index=t, epoch=0)[:n_steps]
    state, _ = steps.run_chunk(state, batch, idx, t)
    return state


def test_task_end_protects_output_subspace_and_freezes_biases():
    scenario = tiny_scenario("task_incremental")
    model = make_model("mlp", input_shape=scenario.input_shape, num_classes=scenario.num_classes,
                       widths=(16, 16), num_tasks=scenario.num_tasks, seed=0)
    fns, params, model_state = ModelFns.split(model)
    method = make_method("coso", proj_rank=4, sketch_rank=8, threshold=0.9)
    steps = StepFns(fns, method, method.optimizer(optax.sgd(0.5)), data_mesh(1))
    state = steps.init_state(params, model_state, 0)
    memory0 = state.memory
    assert memory0["head"]["kernel"] is None and memory0["layers"][0]["bias"] is None
    assert memory0["layers"][0]["kernel"].vectors.shape == (16, 16)

    state = _train_task(steps, method, state, scenario, 0)
    sketch = find_state(state.opt_state, CoSOState).sketches["layers"][1]["kernel"]
    assert float(sketch.sigma[0]) > 0
    after0 = method.consolidate(state, None)
    # The hook is the plain function (for a user's own loop): same bases, same reset state.
    bases, opt_state = coso_update_memory(state.memory, state.opt_state, threshold=0.9)
    jax.tree.map(np.testing.assert_array_equal, (bases, opt_state),
                 (after0.memory, after0.opt_state))
    assert jax.tree.structure(after0.memory) == jax.tree.structure(memory0)
    assert jax.tree.map(np.shape, after0.memory) == jax.tree.map(np.shape, memory0)
    coso_state = find_state(after0.opt_state, CoSOState)
    assert int(coso_state.count) == 0
    np.testing.assert_array_equal(coso_state.sketches["layers"][1]["kernel"].sigma, 0.0)
    for layer in (0, 1):
        basis = after0.memory["layers"][layer]["kernel"]
        assert 0 < int(basis.rank) < 16
        assert float(orthonormality_error(basis)) < 1e-5

    # The bases live in memory: re-initialising the optimizer state (the loop's
    # reset_optimizer_per_task) keeps them.
    reset = after0._replace(opt_state=steps.tx.init(after0.params))
    assert jax.tree.structure(reset.opt_state) == jax.tree.structure(after0.opt_state)
    assert reset.memory is after0.memory

    state1 = _train_task(steps, method, steps.place_state(after0), scenario, 1)
    for layer in (0, 1):
        q = np.asarray(after0.memory["layers"][layer]["kernel"].vectors)
        w0 = np.asarray(after0.params["layers"][layer]["kernel"])
        delta = np.asarray(state1.params["layers"][layer]["kernel"]) - w0
        assert np.abs(delta).max() > 1e-4  # it learned ...
        # ... only outside the protected output directions (SGD base: no momentum leak).
        assert np.abs(delta @ q).max() <= 1e-5 * np.abs(delta).max() * 16
        # Biases are frozen from the second task on; heads train.
        np.testing.assert_array_equal(state1.params["layers"][layer]["bias"],
                                      after0.params["layers"][layer]["bias"])
    assert np.abs(np.asarray(state1.params["head"]["kernel"])
                  - np.asarray(after0.params["head"]["kernel"])).max() > 1e-4


@pytest.mark.parametrize("kwargs, msg", [
    ({"threshold": 1.0}, r"threshold must be a number in \(0.0, 1.0\)"),
    ({"b2": -0.1}, "b2"),
    ({"head_pattern": "("}, "not a valid regex"),
    ({"proj_rank": 0}, "proj_rank"),
    ({"eps": -1.0}, "eps must be a finite number >= 0"),
])
def test_bad_hyperparameters(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        make_method("coso", **kwargs)


@pytest.mark.parametrize("kwargs, msg", [
    ({"freeze_other_after_first_task": 1}, r"must be a bool, got 1 \(int\)"),
    ({"threshold": "0.9"}, r"threshold must be a number in \(0.0, 1.0\), got '0.9' \(str\)"),
    ({"head_pattern": None}, "head_pattern must be a regex string"),
    ({"proj_rank": 2.0}, r"proj_rank must be a positive int, got 2.0 \(float\)"),
    ({"sketch_decay": "1"}, "sketch_decay must be a number"),
])
def test_wrong_hyperparameter_types(kwargs, msg):
    with pytest.raises(TypeError, match=msg):
        make_method("coso", **kwargs)
