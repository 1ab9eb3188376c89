"""The jitted training step: equivalences, extra args, memory, no retracing."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from clax.core import Batch, Classification, Method, ModelFns, Replay, before, masked_cross_entropy
from clax.models import make_model
from clax.training import StepFns, data_mesh
from clax.training.feed import epoch_index_batches
from tests.training.helpers import tiny_dataset


def _setup(method=None, lr=0.1, num_devices=1, masks=None):
    ds = tiny_dataset()
    model = make_model("mlp", input_shape=ds.x_train.shape[1:], num_classes=ds.num_classes,
                       widths=(16,), seed=0)
    fns, params, model_state = ModelFns.split(model)
    method = method or Method(name="plain")
    steps = StepFns(fns, method, method.optimizer(optax.sgd(lr)), data_mesh(num_devices),
                    Classification(logit_masks=masks))
    data = Batch(ds.x_train, ds.y_train, np.zeros_like(ds.y_train))
    return steps, steps.init_state(params, model_state, 0), data, model


def test_scanned_chunk_equals_host_fed_steps():
    steps, state_a, data, _ = _setup()
    _, state_b, _, _ = _setup()
    idx = epoch_index_batches(len(data.y), 32, seed=0, task_index=0, epoch=0)[:6]
    state_a, m_a = steps.run_chunk(state_a, steps.replicate(data), idx, 0, capacity=8)
    losses_b = []
    for i in idx:
        batch = Batch(*(a[i] for a in data))
        state_b, m = steps.train_step(state_b, steps.shard_batch(batch), 0)
        losses_b.append(float(m.loss))
    np.testing.assert_allclose(np.asarray(m_a.loss), losses_b, rtol=1e-6, atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6),
                 state_a.params, state_b.params)
    assert int(state_a.step) == int(state_b.step) == 6


def test_one_step_matches_nnx_optimizer_reference():
    steps, state, data, model = _setup(lr=0.3)
    batch = Batch(data.x[:32], data.y[:32], data.task_ids[:32])
    state, _ = steps.train_step(state, steps.shard_batch(batch), 0)

    # Independent reference: the Flax NNX training idiom on the same initial model.
    opt = nnx.Optimizer(model, optax.sgd(0.3), wrt=nnx.Param)

    def loss_fn(m):
        logits = m(jnp.asarray(batch.x))
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch.y).mean()

    grads = nnx.grad(loss_fn)(model)
    opt.update(model, grads)
    expected = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 state.params, expected)


def test_extra_args_memory_and_no_retrace():
    traces = []

    def scale_by_factor():
        def init(params):
            del params
            return optax.EmptyState()

        def update(updates, state, params=None, *, factor, **extra):
            del params, extra
            return jax.tree.map(lambda u: u * factor, updates), state

        return optax.GradientTransformationExtraArgs(init, update)

    def extra_args(ctx):
        traces.append(1)  # runs at trace time only
        return {"factor": jnp.float32(0.0)}  # zero factor: parameters must not move

    def update_memory(memory, ctx, out):
        return memory + ctx.batch.y.shape[0]

    method = Method(name="m", optimizer=before(scale_by_factor()), extra_args=extra_args,
                    init_memory=lambda p: jnp.zeros((), jnp.int32), update_memory=update_memory)
    steps, state, data, _ = _setup(method)
    p0 = jax.tree.map(np.asarray, state.params)
    data = steps.replicate(data)
    idx = epoch_index_batches(len(data.y), 32, seed=0, task_index=0, epoch=0)
    state, _ = steps.run_chunk(state, data, idx[:4], 0)
    state, m = steps.run_chunk(state, data, idx[4:7], 1)  # shorter chunk: same capacity 4
    assert len(traces) == 1, "the chunk was retraced on its second call"
    assert steps.train_chunk._cache_size() == 1
    assert m.loss.shape == (3,)
    assert int(state.memory) == 7 * 32 and int(state.step) == 7
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state.params), p0)


def test_masked_cross_entropy_restricts_to_task_classes():
    logits = jnp.array([[2.0, 1.0, 5.0, 0.5]])
    mask = jnp.array([[True, True, False, False]])
    got = masked_cross_entropy(logits, jnp.array([0]), mask)
    want = -jax.nn.log_softmax(jnp.array([2.0, 1.0]))[0]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    grad = jax.grad(lambda z: masked_cross_entropy(z, jnp.array([0]), mask))(logits)
    assert np.isfinite(grad).all()


def test_replay_is_a_weighted_mean_over_the_concatenated_batch():
    fixed = None  # set below: examples the hook adds every step

    def replay(ctx):
        return Replay(fixed, jnp.asarray([2.0, 0.5, 0.0], jnp.float32))

    seen = {}

    def update_memory(memory, ctx, out):
        seen["logits"] = out.outputs.shape  # the current batch's logits only
        seen["grads"] = jax.tree.map(jnp.shape, out.grads)
        return memory

    method = Method(name="extra", replay=replay, update_memory=update_memory)
    steps, state, data, _ = _setup(method, lr=0.2)
    fixed = Batch(jnp.asarray(data.x[40:43]), jnp.asarray(data.y[40:43]),
                  jnp.asarray(data.task_ids[40:43]))
    batch = Batch(data.x[:8], data.y[:8], data.task_ids[:8])
    params = jax.tree.map(np.asarray, state.params)
    new, metrics = steps.train_step(state, steps.shard_batch(batch), 0)
    assert seen["logits"][0] == 8
    assert seen["grads"] == jax.tree.map(np.shape, params)

    w = np.concatenate([np.ones(8), [2.0, 0.5, 0.0]])
    x = np.concatenate([batch.x, data.x[40:43]])
    y = np.concatenate([batch.y, data.y[40:43]])

    def loss(p):
        logits = steps.model.apply(p, state.model_state, x, None, train=True)[0]
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        return jnp.sum(w * ce) / w.sum()

    grads = jax.grad(loss)(params)
    expected = jax.tree.map(lambda p, g: p - 0.2 * g, params, grads)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 new.params, expected)
    np.testing.assert_allclose(float(metrics.loss), float(loss(params)), rtol=1e-5)


def test_update_memory_sees_gradient_update_and_new_params():
    got = {}

    def update_memory(memory, ctx, out):
        got.update(grads=out.grads, updates=out.updates, params=out.params, old=ctx.params)
        return memory

    steps, state, data, _ = _setup(Method(name="m", update_memory=update_memory), lr=0.3)
    params0 = jax.tree.map(np.asarray, state.params)
    batch = Batch(data.x[:8], data.y[:8], data.task_ids[:8])

    def loss(p):
        logits = steps.model.apply(p, state.model_state, batch.x, None, train=True)[0]
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch.y).mean()

    want = jax.grad(loss)(params0)
    # Capture the traced values as outputs: wrap the hook's view in the step's own result.
    def step_and_view(state, batch):
        new, _ = steps._step(state, batch, jnp.int32(0))
        return new, got["grads"], got["updates"], got["params"]

    new, g, u, p = jax.jit(step_and_view)(state, steps.shard_batch(batch))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g, want)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, -0.3 * b, rtol=1e-6), u, want)
    jax.tree.map(np.testing.assert_array_equal, p, new.params)


def test_replay_with_wrong_shapes_is_refused():
    def replay(ctx):
        b = ctx.batch
        return Replay(Batch(b.x[:, :-1], b.y, b.task_ids), jnp.ones(b.y.shape, jnp.float32))

    steps, state, data, _ = _setup(Method(name="bad_extra", replay=replay))
    batch = Batch(data.x[:8], data.y[:8], data.task_ids[:8])
    with pytest.raises(ValueError, match="'bad_extra': replay must return"):
        steps.train_step(state, steps.shard_batch(batch), 0)
