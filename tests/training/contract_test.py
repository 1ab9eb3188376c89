"""One contract every registered method must meet.

For each name in `registered_methods()` (with default hyperparameters): it chains with SGD
and Adam and trains to finite results; its jitted step does not recompile on later calls
of the same shape; its whole train state (optimizer state and memory included)
round-trips through an orbax checkpoint; 8 simulated devices as pod meshes (data x FSDP,
data x FSDP x tensor) give the same result as one device (and `pod_hlo_test.py` checks
the compiled sharded step); and it trains parameter-efficiently (LoRA / adapters / prompts from
`clax.models.peft`, the base frozen by `clax.params.train_only`) leaving the base
bit-identical. New methods are picked up automatically.
"""

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
    make_method,
    registered_methods,
)
from clax.models import make_model
from clax.models.peft import add_adapters, add_lora, add_prompt, is_adapter_path, peft_mask
from clax.params import path_str, plain_path, train_only
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


# Pod shapes on the 8 simulated devices: (data 2 x fsdp 4) and (data 2 x fsdp 2 x tensor 2).
# `fsdp_min_size=1` so that even this tiny MLP's parameters, optimizer state and memory are
# split (the default keeps arrays under 1024 elements replicated).
# The default suite runs every method on 2x2x2 (data, FSDP and tensor at once); the
# 2x4x1 mesh for every method is in the slow suite, for a representative four by default.
POD_MESHES = {"2x4x1": (4, 1), "2x2x2": (2, 2)}
POD_DEFAULT = ("ewc", "gpm", "er", "ema")


def _pod_cases():
    for method in METHODS:
        yield pytest.param(method, "2x2x2", id=f"{method}-2x2x2")
        marks = () if method in POD_DEFAULT else (pytest.mark.slow,)
        yield pytest.param(method, "2x4x1", id=f"{method}-2x4x1", marks=marks)


@pytest.mark.parametrize(("method", "mesh"), list(_pod_cases()))
def test_pod_meshes_equal_one_device(method, mesh):
    scenario = tiny_scenario()
    runs = {}
    for name, (fsdp, tensor) in {"1": (1, 1), mesh: POD_MESHES[mesh]}.items():
        config = tiny_config(num_devices=1 if name == "1" else 8, mesh_fsdp=fsdp,
                             mesh_tensor=tensor, fsdp_min_size=1)
        config.method.name = method
        runs[name] = train_continual(config, scenario=scenario, keep_state=True)
    one = runs.pop("1")
    for name, run in runs.items():
        np.testing.assert_allclose(one.accuracy_matrix, run.accuracy_matrix,
                                   err_msg=f"{method} on mesh {name}")
        # Float32 sums in another order (sharded reductions): a few ulps per step.
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
                     one.state.params, run.state.params)
        split = [path_str(p) for p, x in jax.tree_util.tree_leaves_with_path(run.state.params)
                 if not x.sharding.is_fully_replicated]
        assert split, f"{method} on mesh {name}: no parameter is split"


# ------------------------------------------------------------------ parameter-efficient tuning
# Every method trains a LoRA'd model (and, for a subset, a TinyViT with LoRA, bottleneck
# adapters and prompt tokens) with the base frozen by `train_only(..., peft_mask(...))`.
#
# Where the freeze goes. `train_only(method.optimizer(base), mask)` ("outer", what every
# method is trained with here) freezes the whole chain: the method's transforms see only
# the trainable subtree (optax.partition hands them the adapter leaves, an
# optax.MaskedNode at each frozen one). Memory kept over every parameter (EWC's Fisher and
# anchor, GPM / CoSO bases, A-GEM's reference gradient) is read at the paths of that
# subtree, and the EMA / weight-averaging swap at task end leaves the frozen leaves as
# they are. `method.optimizer(train_only(base, mask))` ("inner") also works: the method's
# transforms then see every leaf and the base optimizer gives the frozen ones an exact
# zero update (`test_parameter_efficient_training_inner` checks a few).
INNER_METHODS = ("ewc", "gpm", "agem", "ema")
# The adapter (TinyViT) case for a representative subset, to keep the contract fast on two
# CPU cores (a TinyViT compile per method costs 3-20 s): plain training, a closed-form
# head on adapted features, a layer-input projection over adapter layers, and a parameter
# EMA swapped in at task end. Every method runs on the LoRA'd MLP.
ADAPTER_METHODS = ("finetune", "ncm", "gpm", "ema")


def _peft_model(kind, scenario):
    if kind == "lora_mlp":
        model = make_model("mlp", input_shape=scenario.input_shape,
                           num_classes=scenario.num_classes, widths=(16,), seed=0)
        add_lora(model, rank=4, targets=r"layers/\d+", rngs=nnx.Rngs(1))
    else:  # LoRA on attention, an adapter in every block, prompt tokens
        model = make_model("vit", input_shape=scenario.input_shape,
                           num_classes=scenario.num_classes, seed=0, patch_size=2, dim=16,
                           depth=1, num_heads=2, mlp_ratio=2)
        add_lora(model, rank=2, targets=r"blocks/\d+/attn/(query|value)", rngs=nnx.Rngs(1))
        add_adapters(model, bottleneck=4, rngs=nnx.Rngs(2))
        add_prompt(model, length=2, rngs=nnx.Rngs(3))
    return model


def _train_peft(method, kind, composition):
    """Two tasks through StepFns with the method's hooks; returns (before, after, mask)."""
    scenario = tiny_scenario("permuted")  # equal task sizes: one compiled chunk shape
    fns, params, model_state = ModelFns.split(_peft_model(kind, scenario))
    mask = peft_mask(params, train=("^head/",))  # adapters + the classifier
    m = make_method(method)
    base = optax.adam(1e-2)
    tx = (train_only(m.optimizer(base), mask) if composition == "outer"
          else m.optimizer(train_only(base, mask)))
    steps = StepFns(fns, m, tx, data_mesh(1))
    state = steps.init_state(params, model_state, 0)
    before = jax.tree.map(np.array, state.params)
    objective = Classification()
    for t in range(2):
        data = m.training_data(scenario.tasks, t)
        ctx = BoundaryContext(task_index=t, tasks=scenario.tasks, train=data, model=fns,
                              objective=objective, rng=jax.random.key(t))
        if m.before_task is not None:
            state = steps.place_state(m.before_task(state, ctx))
        batch = steps.replicate(Batch(data.x, data.y, data.task_ids))
        idx = epoch_index_batches(len(data.y), 32, seed=0, task_index=t, epoch=0)[:4]
        state, metrics = steps.run_chunk(state, batch, idx, t)
        assert np.isfinite(np.asarray(metrics.loss)).all(), f"{method}: loss {metrics.loss}"
        compiled = steps.train_chunk._cache_size()
        state, metrics = steps.run_chunk(state, batch, idx[:3], t)
        assert np.isfinite(np.asarray(metrics.loss)).all(), f"{method}: loss {metrics.loss}"
        assert steps.train_chunk._cache_size() == compiled, "recompiled on the second call"
        if m.consolidate is not None:
            state = steps.place_state(m.consolidate(state, ctx))
    return before, jax.tree.map(np.array, state.params), mask


def _check_frozen_base(method, before, after, mask):
    flags = {plain_path(p): f for p, f in jax.tree_util.tree_leaves_with_path(mask)}
    old = {plain_path(p): v for p, v in jax.tree_util.tree_leaves_with_path(before)}
    new = {plain_path(p): v for p, v in jax.tree_util.tree_leaves_with_path(after)}
    assert set(flags) == set(old) == set(new)
    moved = [path_str(p) for p in old if not flags[p] and old[p].tobytes() != new[p].tobytes()]
    assert not moved, f"{method}: frozen base parameters changed: {moved}"
    adapters = [p for p in old if is_adapter_path(p)]
    still = [path_str(p) for p in adapters if np.array_equal(old[p], new[p])]
    assert adapters and not still, f"{method}: adapter parameters did not train: {still}"


@pytest.mark.parametrize("method", METHODS)
def test_parameter_efficient_training(method):
    before, after, mask = _train_peft(method, "lora_mlp", "outer")
    _check_frozen_base(method, before, after, mask)


@pytest.mark.parametrize("method", [m for m in METHODS if m in INNER_METHODS])
def test_parameter_efficient_training_inner(method):
    # The method's transforms on the full tree, the freeze inside: the frozen leaves must
    # stay bit-identical through the method's own edits too (the EMA of a constant
    # parameter is exact, so the task-end swap does not move it).
    before, after, mask = _train_peft(method, "lora_mlp", "inner")
    _check_frozen_base(method, before, after, mask)


@pytest.mark.parametrize("method", [m for m in METHODS if m in ADAPTER_METHODS])
def test_parameter_efficient_training_with_adapters(method):
    before, after, mask = _train_peft(method, "adapted_vit", "outer")
    _check_frozen_base(method, before, after, mask)
    assert any("mlp_adapter" in path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(
        after)) and "prompt" in after
