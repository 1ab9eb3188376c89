"""The compiled sharded step of every method, read from its HLO.

On the (data 2 x fsdp 2 x tensor 2) mesh of 8 simulated devices, for each registered method:
the jitted step has no host callbacks; its outputs keep the train state in the shardings
the rules give (optimizer state and memory stay split, nothing is silently replicated);
and the method adds no all-gather of a full parameter beyond those of the plain finetune
step (FSDP gathers each weight for its matmul; a method's own work on parameter-shaped
memory, e.g. EWC's penalty, GPM's projection, the EMA, must stay on the shards).
"""

import collections
import re

import jax
import numpy as np
import optax
import pytest

from clax.core import Batch, ModelFns, make_method, registered_methods
from clax.models import make_model
from clax.training.sharding import ShardingRules, logical_axes, make_mesh
from clax.training.steps import StepFns
from tests.training.helpers import tiny_scenario

METHODS = [m for m in registered_methods() if not m.startswith("_test")]
_CALLBACK = re.compile(r"custom_call_target=\"[^\"]*callback[^\"]*\"", re.IGNORECASE)
_GATHER = re.compile(r"= \w+\[([\d,]*)\][^ ]* all-gather(?:-start)?\(.*?op_name=\"([^\"]*)\"")
# XLA has no partitioned matrix decompositions: an SVD / eigh / QR inside a step (CoSO's
# per-step frequent-directions sketch) runs on the gathered matrix. These gathers are the
# method's own and stated in clax.training.sharding; any other is a failure.
_DECOMPOSITION = re.compile(r"/(svd|eigh|qr)\b")


def _compiled_step(method: str):
    scenario = tiny_scenario("permuted")
    # Widths chosen so no parameter shares a shape with the batch's (32, 4) logits.
    model = make_model("mlp", input_shape=scenario.input_shape,
                       num_classes=scenario.num_classes, widths=(24,), seed=0)
    fns, params, model_state = ModelFns.split(model)
    m = make_method(method)
    mesh = make_mesh(2, 2, 2)
    steps = StepFns(fns, m, m.optimizer(optax.adam(1e-2)), mesh,
                    rules=ShardingRules(fsdp_min_size=1), param_axes=logical_axes(model))
    state = steps.init_state(params, model_state, 0)
    task = scenario.tasks[0]
    batch = steps.shard_batch(Batch(task.x_train[:32], task.y_train[:32],
                                    np.zeros(32, np.int32)))
    compiled = steps.train_step.lower(state, batch, np.int32(0)).compile()
    return compiled, steps, state


def _full_param_gathers(text: str, params) -> collections.Counter:
    shapes = {tuple(np.shape(p)) for p in jax.tree.leaves(params) if np.ndim(p) >= 2}
    out = collections.Counter()
    for dims, op in _GATHER.findall(text):
        shape = tuple(int(d) for d in dims.split(",") if d)
        if shape in shapes and not _DECOMPOSITION.search(op):
            out[shape] += 1
    return out


@pytest.fixture(scope="module")
def finetune_gathers():
    compiled, _, state = _compiled_step("finetune")
    return _full_param_gathers(compiled.as_text(), state.params)


@pytest.mark.parametrize("method", METHODS)
def test_sharded_step_hlo(method, finetune_gathers):
    compiled, steps, state = _compiled_step(method)
    text = compiled.as_text()
    assert not _CALLBACK.search(text), f"{method}: host callback in the compiled step"

    out_state = compiled.output_shardings[0]
    want = steps.state_sharding
    for (path, got), expected in zip(jax.tree_util.tree_leaves_with_path(out_state),
                                     jax.tree.leaves(want), strict=True):
        assert got.is_equivalent_to(expected, len(expected.spec) or 1) or (
            got.is_fully_replicated and expected.is_fully_replicated), (
            f"{method}: state leaf {jax.tree_util.keystr(path)} comes out as {got}, "
            f"the rules give {expected}")
    split_memory = [x for x in jax.tree.leaves(want.memory) if not x.is_fully_replicated]
    memory_arrays = [x for x in jax.tree.leaves(state.memory) if np.ndim(x) >= 1
                     and np.size(x) > 1]
    if memory_arrays:
        assert split_memory, f"{method}: memory {len(memory_arrays)} arrays, none split"

    extra = _full_param_gathers(text, state.params) - finetune_gathers
    assert not extra, (f"{method}: all-gathers of full parameter shapes beyond the plain "
                       f"step's: {dict(extra)}")
