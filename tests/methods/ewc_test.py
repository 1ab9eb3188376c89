"""Tests for clax.methods.ewc: the ewc / online_ewc / l2 consolidation hooks and extra args."""

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import clax.methods  # noqa: F401  (registers ewc, online_ewc and l2 for make_method)
from clax.core import (
    BoundaryContext,
    Classification,
    LanguageModeling,
    ModelFns,
    TrainArrays,
    TrainState,
    make_method,
)
from clax.data.text import synthetic_token_domains
from clax.fisher import diagonal_fisher
from clax.methods import ewc_update_memory, l2_update_memory
from clax.models import make_model
from clax.transforms.ewc import init_ewc_memory

N = 40


@functools.cache
def _setup():
    model = make_model("mlp", input_shape=(4, 4, 1), num_classes=3, widths=(5,), seed=0)
    fns, params, model_state = ModelFns.split(model)
    rng = np.random.default_rng(0)
    tasks = [TrainArrays(rng.normal(size=(N, 4, 4, 1)).astype(np.float32),
                         rng.integers(0, 3, N).astype(np.int32), np.zeros(N, np.int32))
             for _ in range(2)]
    # Parameters "after" each task: perturbed copies.
    thetas = [jax.tree.map(lambda p, k=k: p + 0.1 * k, params) for k in range(2)]
    return fns, params, model_state, tasks, thetas


def _state(method, params, model_state):
    tx = method.optimizer(optax.sgd(0.1))
    return TrainState(params=params, model_state=model_state, opt_state=tx.init(params),
                      memory=method.init_memory(params), rng=jax.random.key(0),
                      step=jnp.zeros((), jnp.int32))


_CLASSIFICATION = Classification()  # one object: the Fisher's objective is a static argument


def _ctx(fns, t, data, objective=_CLASSIFICATION):
    return BoundaryContext(task_index=t, tasks=(), train=data, model=fns, objective=objective,
                           rng=jax.random.key(100 + t))


def _task_fisher(fns, params, model_state, data, t):
    # What the hook computes: the true Fisher with the second half of the boundary key.
    _, key = jax.random.split(jax.random.key(100 + t))
    return diagonal_fisher(fns, params, data, model_state=model_state, labels="true", key=key)


def _close(a, b):
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-7), a, b)


@pytest.mark.parametrize("name", ["ewc", "online_ewc"])
def test_consolidation_accumulates_task_fishers(name):
    fns, params, model_state, tasks, thetas = _setup()
    gamma = 0.5
    method = make_method(name, lam=2.0, **({"decay": gamma} if name == "online_ewc" else {}))
    state = _state(method, params, model_state)
    fishers = []
    for t in range(2):
        state = state._replace(params=thetas[t])
        state = method.consolidate(state, _ctx(fns, t, tasks[t]))
        fishers.append(_task_fisher(fns, thetas[t], model_state, tasks[t], t))
    memory = state.memory
    assert int(memory.count) == 2
    args = method.extra_args(types.SimpleNamespace(memory=memory))
    assert set(args) == {"fisher", "anchor"}
    if name == "ewc":
        # λ·S_F⊙(θ − θ̄*) equals the sum of the two per-task penalty gradients.
        _close(memory.fisher, jax.tree.map(jnp.add, *fishers))
        got = jax.tree.map(lambda f, a, p: f * (p - a), args["fisher"], args["anchor"], params)
        want = jax.tree.map(lambda f1, f2, a1, a2, p: f1 * (p - a1) + f2 * (p - a2),
                            *fishers, *thetas, params)
        _close(got, want)
    else:
        _close(memory.fisher, jax.tree.map(lambda a, b: gamma * a + b, *fishers))
        jax.tree.map(np.testing.assert_array_equal, memory.anchor, thetas[1])


def test_fisher_subset_is_deterministic_and_bounded():
    fns, params, model_state, tasks, _ = _setup()
    method = make_method("ewc", fisher_max_examples=7, fisher_labels="empirical",
                         fisher_granularity="batch", fisher_batch_size=4)
    runs = [method.consolidate(_state(method, params, model_state), _ctx(fns, 0, tasks[0]))
            for _ in range(2)]
    jax.tree.map(np.testing.assert_array_equal, runs[0].memory.fisher, runs[1].memory.fisher)
    full = make_method("ewc", fisher_labels="empirical", fisher_granularity="batch",
                       fisher_batch_size=4)
    everything = full.consolidate(_state(full, params, model_state), _ctx(fns, 0, tasks[0]))
    assert any(not np.allclose(a, b) for a, b in zip(
        jax.tree.leaves(runs[0].memory.fisher), jax.tree.leaves(everything.memory.fisher),
        strict=True))


def test_l2_penalises_only_after_the_first_task():
    fns, params, model_state, tasks, thetas = _setup()
    method = make_method("l2", lam=0.5)
    state = _state(method, params, model_state)
    before = method.extra_args(types.SimpleNamespace(memory=state.memory))
    assert float(before["fisher"]) == 0.0
    state = method.consolidate(state._replace(params=thetas[1]), _ctx(fns, 0, tasks[0]))
    after = method.extra_args(types.SimpleNamespace(memory=state.memory))
    assert float(after["fisher"]) == 1.0
    jax.tree.map(np.testing.assert_array_equal, after["anchor"], thetas[1])
    tx = method.optimizer(optax.identity())  # the penalty alone
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params, **after)
    _close(updates, jax.tree.map(lambda p, a: 0.5 * (p - a), params, thetas[1]))


def test_bad_hyperparameters():
    with pytest.raises(ValueError, match="lam"):
        make_method("ewc", lam=-1.0)
    with pytest.raises(ValueError, match="decay"):
        make_method("online_ewc", decay=1.5)
    with pytest.raises(ValueError, match="fisher_labels"):
        make_method("ewc", fisher_labels="model")
    with pytest.raises(ValueError, match="fisher_granularity"):
        make_method("online_ewc", fisher_granularity="sample")
    with pytest.raises(ValueError, match="fisher_max_examples"):
        make_method("ewc", fisher_max_examples=-1)
    with pytest.raises(TypeError, match=r"lam \(λ\) must be a finite number >= 0, got '1'"):
        make_method("ewc", lam="1")
    with pytest.raises(TypeError, match=r"fisher_labels must be one of .*, got None"):
        make_method("ewc", fisher_labels=None)
    with pytest.raises(TypeError, match=r"fisher_batch_size must be a positive int, got 8.0"):
        make_method("ewc", fisher_batch_size=8.0)


@functools.cache  # one model and objective object: both are static in the Fisher's jit
def _lm_setup():
    fns, params, model_state = ModelFns.split(make_model(
        "causal_lm", input_shape=(8,), num_classes=16, dim=16, depth=1, num_heads=2, seed=0))
    task = synthetic_token_domains(num_tasks=1, vocab_size=16, seq_len=8, num_train=12,
                                   num_test=1).tasks[0]
    data = TrainArrays(task.x_train, task.y_train, np.zeros(12, np.int32))
    return fns, params, model_state, data, LanguageModeling()


@pytest.mark.parametrize("name", ["ewc", "online_ewc"])
def test_consolidation_on_a_language_model(name):
    # The run's LanguageModeling objective reaches the Fisher: token sequences (N, L) with
    # next-token targets (the last one -1, no loss), one example = one sequence.
    fns, params, model_state, data, objective = _lm_setup()
    method = make_method(name, fisher_max_examples=10, fisher_batch_size=4)
    state = method.consolidate(_state(method, params, model_state),
                               _ctx(fns, 0, data, objective=objective))
    fisher = state.memory.fisher
    assert jax.tree.structure(fisher) == jax.tree.structure(params)
    for f, p in zip(jax.tree.leaves(fisher), jax.tree.leaves(params), strict=True):
        assert f.shape == p.shape and np.all(np.isfinite(f)) and np.all(np.asarray(f) >= 0)
    # Every layer's Fisher is estimated, the embeddings and the per-token Dense layers too.
    assert float(jnp.max(fisher["embed"]["embedding"])) > 0
    assert float(jnp.max(fisher["head"]["kernel"])) > 0


# ------------------------------------------------------- consolidation as a plain function


@pytest.mark.parametrize("name,mode", [("ewc", "separate"), ("online_ewc", "online")])
def test_update_memory_is_the_consolidate_hook(name, mode):
    # The hook and the user-loop function are one implementation: same inputs, same memory.
    fns, params, model_state, tasks, thetas = _setup()
    method = make_method(name, lam=2.0, fisher_batch_size=16)
    state = _state(method, thetas[0], model_state)
    hooked = method.consolidate(state, _ctx(fns, 0, tasks[0])).memory
    plain = ewc_update_memory(fns, init_ewc_memory(thetas[0], mode=mode), tasks[0],
                              params=thetas[0], model_state=model_state, mode=mode,
                              fisher_batch_size=16, key=jax.random.key(100))
    jax.tree.map(np.testing.assert_array_equal, hooked, plain)
    # memory=None starts from an empty memory; (x, y) tuples and an nnx.State of the
    # parameters are accepted as well.
    model = fns.module(thetas[0], model_state)
    again = ewc_update_memory(fns, None, (tasks[0].x, tasks[0].y), mode=mode,
                              params=nnx.state(model, nnx.Param), model_state=model_state,
                              fisher_batch_size=16, key=jax.random.key(100))
    jax.tree.map(np.testing.assert_allclose, plain, again)


def test_update_memory_takes_an_nnx_module_and_copies_the_anchor():
    model = make_model("mlp", input_shape=(4, 4, 1), num_classes=3, widths=(5,), seed=0)
    _, _, _, tasks, _ = _setup()
    memory = ewc_update_memory(model, None, (tasks[0].x, tasks[0].y), mode="online")
    live = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    assert isinstance(memory.anchor, dict) and int(memory.count) == 1
    for a, p in zip(jax.tree.leaves(memory.anchor), jax.tree.leaves(live), strict=True):
        assert a is not p  # a snapshot, not the live parameters
        np.testing.assert_array_equal(a, p)
    assert all(float(jnp.max(f)) > 0 for f in jax.tree.leaves(memory.fisher))


def test_update_memory_errors():
    fns, params, model_state, tasks, _ = _setup()
    with pytest.raises(TypeError, match="with a ModelFns as model, pass params="):
        ewc_update_memory(fns, None, tasks[0])
    with pytest.raises(TypeError, match="model must be an nnx.Module or a clax.core.ModelFns"):
        ewc_update_memory(params, None, tasks[0])
    with pytest.raises(TypeError, match="data needs targets"):
        ewc_update_memory(fns, None, tasks[0].x, params=params, model_state=model_state)
    separate = ewc_update_memory(fns, None, tasks[0], params=params, model_state=model_state)
    with pytest.raises(ValueError, match='memory was made for mode="separate", not mode="online"'):
        ewc_update_memory(fns, separate, tasks[0], params=params, model_state=model_state,
                          mode="online")


def test_l2_update_memory_is_the_hook_and_copies():
    fns, params, model_state, tasks, thetas = _setup()
    method = make_method("l2")
    state = _state(method, thetas[1], model_state)
    hooked = method.consolidate(state, _ctx(fns, 0, tasks[0])).memory
    plain = l2_update_memory(thetas[1], method.init_memory(thetas[1]))
    jax.tree.map(np.testing.assert_array_equal, hooked, plain)
    model = fns.module(thetas[1], model_state)
    first = l2_update_memory(model)  # an nnx.Module, no memory yet
    assert int(first["count"]) == 1 and int(l2_update_memory(model, first)["count"]) == 2
    live = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert all(a is not p for a, p in zip(jax.tree.leaves(first["anchor"]), live, strict=True))
    jax.tree.map(np.testing.assert_array_equal, first["anchor"], thetas[1])
