"""Tests for the registered ``gpm`` method: memory layout, consolidation, protection."""

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from clax.core import (
    Batch,
    BoundaryContext,
    Classification,
    ModelFns,
    TrainState,
    current_task_data,
    make_method,
)
from clax.methods.gpm import gpm, gpm_memory, gpm_update_memory
from clax.models import make_model
from clax.models.peft import add_lora, peft_mask
from clax.params import train_only
from clax.params.paths import path_str
from clax.subspace import SubspaceBasis, orthonormality_error
from clax.training import StepFns, data_mesh
from clax.training.feed import epoch_index_batches
from tests.subspace.basis_test import update_gpm_reference
from tests.training.helpers import tiny_scenario


def bases_of(memory):
    pairs = jax.tree_util.tree_flatten_with_path(
        memory, is_leaf=lambda x: isinstance(x, SubspaceBasis))[0]
    return {path_str(p): b for p, b in pairs}


def test_memory_covers_dense_and_conv_kernels_but_not_task_heads():
    mlp = make_model("mlp", input_shape=(4, 4, 1), num_classes=4, widths=(8,), seed=0)
    _, params, _ = ModelFns.split(mlp)
    shapes = {k: b.vectors.shape for k, b in bases_of(gpm_memory(params)).items()}
    assert shapes == {"layers/0/kernel": (16, 16), "head/kernel": (8, 8)}
    cnn = jax.eval_shape(lambda: ModelFns.split(make_model(
        "cnn", input_shape=(8, 8, 1), num_classes=4, num_tasks=2, channels=(3,), hidden=6))[1])
    shapes = {k: b.vectors.shape for k, b in bases_of(gpm_memory(cnn)).items()}
    assert shapes == {"convs/0/kernel": (9, 9), "fc/kernel": (48, 48)}  # no multi-head head


def test_training_keeps_old_inputs_protected():
    """Task 0, consolidate, task 1: ΔW ⟂ basis for each kernel (SGD), 1-D params frozen."""
    scenario = tiny_scenario("permuted")
    model = make_model("mlp", input_shape=scenario.input_shape, num_classes=4, widths=(8,),
                       seed=0)
    fns, params, model_state = ModelFns.split(model)
    method = make_method("gpm", layer_thresholds=(0.9, 0.99), num_samples=512)
    steps = StepFns(fns, method, method.optimizer(optax.sgd(0.1)), data_mesh(1))
    state = steps.init_state(params, model_state, 0)

    def train(state, t):
        data = current_task_data(scenario.tasks, t)
        idx = epoch_index_batches(len(data.y), 32, seed=0, task_index=t, epoch=0)
        state, _ = steps.run_chunk(state, steps.replicate(Batch(data.x, data.y, data.task_ids)),
                                   idx, t)
        return state, data

    state, data0 = train(state, 0)
    ctx = BoundaryContext(task_index=0, tasks=scenario.tasks, train=data0, model=fns,
                          objective=steps.objective, rng=jax.random.key(0))
    state = method.consolidate(state, ctx)
    bases = jax.tree.map(np.asarray, bases_of(state.memory))  # the next chunk donates it
    # num_samples >= the task size: layer 0's representation is the whole task's inputs.
    x0 = np.asarray(data0.x, np.float64).reshape(len(data0.y), -1)
    ref, _ = update_gpm_reference(np.zeros((16, 0)), x0.T, 0.9, first=True)
    assert int(bases["layers/0/kernel"].rank) == ref.shape[1] > 0
    assert int(bases["head/kernel"].rank) > 0
    for b in bases.values():
        assert float(orthonormality_error(b)) < 1e-5

    before = jax.tree.map(np.asarray, state.params)  # the next chunk donates the state
    state, _ = train(state, 1)
    for name, b in bases.items():
        layer = name.split("/kernel")[0].split("/")
        old = before[layer[0]] if len(layer) == 1 else before[layer[0]][int(layer[1])]
        new = state.params[layer[0]] if len(layer) == 1 else state.params[layer[0]][int(layer[1])]
        delta = np.asarray(new["kernel"]) - np.asarray(old["kernel"])
        assert np.abs(delta).max() > 1e-3, f"{name} did not train"
        assert np.abs(np.asarray(b.vectors).T @ delta).max() < 1e-4, f"{name} left the complement"
        np.testing.assert_array_equal(new["bias"], old["bias"])  # 1-D: frozen after task 0


def test_consolidates_a_multi_head_cnn():
    scenario = tiny_scenario("task_incremental")
    model = make_model("cnn", input_shape=scenario.input_shape, num_classes=4, num_tasks=2,
                       channels=(4,), hidden=8, seed=0)
    fns, params, model_state = ModelFns.split(model)
    method = make_method("gpm", max_columns=256)
    # consolidate reads params, model_state and memory only: no optimizer needed.
    state = TrainState(params=params, model_state=model_state, opt_state=(),
                       memory=method.init_memory(params), rng=jax.random.key(0),
                       step=np.int32(0))
    for t in range(2):
        ctx = BoundaryContext(task_index=t, tasks=scenario.tasks,
                              train=current_task_data(scenario.tasks, t), model=fns,
                              objective=Classification(), rng=jax.random.key(t))
        new = method.consolidate(state, ctx)
        assert jax.tree.structure(new.memory) == jax.tree.structure(state.memory)
        state = new
    ranks = {k: int(b.rank) for k, b in bases_of(state.memory).items()}
    assert set(ranks) == {"convs/0/kernel", "fc/kernel"} and min(ranks.values()) > 0
    assert ranks["convs/0/kernel"] <= 9


def test_hyperparameter_errors():
    with pytest.raises(ValueError, match=r"threshold must be a number in \(0.0, 1.0\)"):
        gpm(threshold=1.0)
    with pytest.raises(ValueError, match=r"layer_thresholds\[1\] must be a number in"):
        gpm(layer_thresholds=(0.9, 0.0))
    with pytest.raises(ValueError, match=r"project must be one of \['gradient', 'update'\]"):
        gpm(project="both")
    with pytest.raises(ValueError, match="num_samples must be a positive int"):
        gpm(num_samples=0)
    with pytest.raises(ValueError, match=r"threshold_increment must be a number in \[0.0, 1.0\)"):
        gpm(threshold_increment=1.0)


def test_hyperparameter_type_errors():
    with pytest.raises(TypeError, match=r"num_samples must be a positive int, got 300.0 \(float"):
        gpm(num_samples=300.0)
    with pytest.raises(TypeError, match=r"layer_thresholds must be a sequence .*, got 0.9"):
        gpm(layer_thresholds=0.9)
    with pytest.raises(TypeError, match=r"layer_thresholds\[0\] must be a number"):
        gpm(layer_thresholds=("0.9",))
    with pytest.raises(TypeError, match="freeze_1d_after_first_task must be a bool, got 1"):
        gpm(freeze_1d_after_first_task=1)
    with pytest.raises(TypeError, match="threshold must be a number"):
        gpm(threshold=None)


def test_layer_threshold_count_and_increment_are_checked():
    from clax.methods.gpm import layer_thresholds_by_path

    paths = ["layers/0/kernel", "head/kernel"]
    assert layer_thresholds_by_path(paths, 0.97, (), 0.003, 2) == {
        "layers/0/kernel": pytest.approx(0.976), "head/kernel": pytest.approx(0.976)}
    with pytest.raises(ValueError, match="layer_thresholds has 3 values but the model has 2"):
        layer_thresholds_by_path(paths, 0.97, (0.9, 0.9, 0.9), 0.0, 0)
    with pytest.raises(ValueError, match="threshold for 'layers/0/kernel' at task 20"):
        layer_thresholds_by_path(paths, 0.97, (), 0.003, 20)


def test_update_memory_is_the_consolidate_hook_and_takes_a_module():
    # One implementation: the hook on a TrainState and the plain function on an nnx.Module
    # with bare input arrays give the same bases.
    scenario = tiny_scenario("permuted")
    model = make_model("mlp", input_shape=scenario.input_shape, num_classes=4, widths=(8,),
                       seed=0)
    fns, params, model_state = ModelFns.split(model)
    method = make_method("gpm", layer_thresholds=(0.9, 0.99), num_samples=20)
    state = TrainState(params=params, model_state=model_state, opt_state=(),
                       memory=method.init_memory(params), rng=jax.random.key(0),
                       step=np.int32(0))
    data = current_task_data(scenario.tasks, 0)
    ctx = BoundaryContext(task_index=0, tasks=scenario.tasks, train=data, model=fns,
                          objective=Classification(), rng=jax.random.key(3))
    hooked = method.consolidate(state, ctx).memory
    plain = gpm_update_memory(model, None, data.x, task_index=0, layer_thresholds=(0.9, 0.99),
                              num_samples=20, key=jax.random.key(3))
    assert jax.tree.structure(plain) == jax.tree.structure(hooked)
    jax.tree.map(np.testing.assert_array_equal, plain, hooked)
    assert min(int(b.rank) for b in bases_of(plain).values()) > 0
    # The next task grows the same bases (incremental rule); shapes stay fixed.
    grown = gpm_update_memory(fns, plain, (data.x, data.y), task_index=1, params=params,
                              model_state=model_state, layer_thresholds=(0.9, 0.99),
                              num_samples=20)
    assert jax.tree.structure(grown) == jax.tree.structure(plain)
    with pytest.raises(TypeError, match="with a ModelFns as model, pass params="):
        gpm_update_memory(fns, plain, data.x, task_index=1)
    with pytest.raises(ValueError, match="task_index must be a non-negative int"):
        gpm_update_memory(model, plain, data.x, task_index=-1)


def test_lora_training_inside_train_only_projects_the_adapter_kernels():
    """Outer composition train_only(gpm.optimizer(sgd), peft_mask): the bases (memory over
    every kernel, frozen base kernels included) project the LoRA factors' and the head's
    updates in task 1; the frozen kernels' bases are not used and the base stays put."""
    scenario = tiny_scenario("permuted")
    model = make_model("mlp", input_shape=scenario.input_shape, num_classes=4, widths=(8,),
                       seed=0)
    add_lora(model, rank=2, targets=r"layers/\d+", rngs=nnx.Rngs(1))
    fns, params, model_state = ModelFns.split(model)
    mask = peft_mask(params, train=("^head/",))
    method = make_method("gpm", num_samples=512)
    tx = train_only(method.optimizer(optax.sgd(0.1)), mask)
    steps = StepFns(fns, method, tx, data_mesh(1))
    state = steps.init_state(params, model_state, 0)

    def train(state, t):
        data = current_task_data(scenario.tasks, t)
        idx = epoch_index_batches(len(data.y), 32, seed=0, task_index=t, epoch=0)
        state, _ = steps.run_chunk(state, steps.replicate(Batch(data.x, data.y, data.task_ids)),
                                   idx, t)
        return state, data

    state, data0 = train(state, 0)
    ctx = BoundaryContext(task_index=0, tasks=scenario.tasks, train=data0, model=fns,
                          objective=steps.objective, rng=jax.random.key(0))
    state = method.consolidate(state, ctx)
    bases = jax.tree.map(np.asarray, bases_of(state.memory))
    assert set(bases) == {"layers/0/base/kernel", "layers/0/lora_a/kernel",
                          "layers/0/lora_b/kernel", "head/kernel"}
    before = {path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(
        state.params)}
    state, _ = train(state, 1)
    after = {path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(
        state.params)}
    flags = {path_str(p): f for p, f in jax.tree_util.tree_leaves_with_path(mask)}
    for name in before:
        delta = after[name] - before[name]
        if not flags[name]:
            assert before[name].tobytes() == after[name].tobytes(), f"{name} moved"
        elif name in bases:
            b = bases[name]
            assert int(b.rank) > 0 and np.abs(delta).max() > 1e-4, f"{name} did not train"
            assert np.abs(b.vectors.T @ delta).max() < 1e-4, f"{name} left the complement"
        else:  # the head's bias: 1-D, frozen by GPM after task 0
            np.testing.assert_array_equal(delta, 0.0)
