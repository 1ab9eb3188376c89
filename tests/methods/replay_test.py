"""Replay methods: er, derpp, agem, replay_reptile against hand-written losses."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from clax.core import (
    Batch,
    BoundaryContext,
    Classification,
    DataSpec,
    LanguageModeling,
    ModelFns,
    TrainArrays,
    example_spec,
    make_method,
    masked_cross_entropy,
)
from clax.data.text import synthetic_token_domains
from clax.models import make_model
from clax.replay import reservoir_insert, stored
from clax.training import StepFns, data_mesh, default_config, train_continual
from tests.training.helpers import tiny_config, tiny_scenario

SHAPE, CLASSES, B = (4, 4, 1), 4, 4
_insert = jax.jit(reservoir_insert)


@functools.cache
def _compiled(method, hp):
    """One StepFns (one compiled step) per method setting, shared by the tests."""
    model = make_model("mlp", input_shape=SHAPE, num_classes=CLASSES, widths=(8,), seed=0)
    fns, params, model_state = ModelFns.split(model)
    m = make_method(method, **dict(hp))
    steps = StepFns(fns, m, m.optimizer(optax.sgd(1.0)), data_mesh(1))
    return fns, steps, params, model_state


def _setup(method, **hp):
    """(model fns, step fns, a fresh train state, model state); SGD with lr 1."""
    fns, steps, params, model_state = _compiled(method, tuple(sorted(hp.items())))
    return fns, steps, steps.init_state(params, model_state, 0), model_state


def _batch(seed, n=B, task=0):
    rng = np.random.default_rng(seed)
    return Batch(rng.uniform(size=(n, *SHAPE)).astype(np.float32),
                 rng.integers(0, CLASSES, n).astype(np.int32), np.full(n, task, np.int32))


def _fill(state, steps, example: Batch, copies, logits=None, extra: Batch | None = None):
    """Memory holding `copies` copies of one example (so any sample is that example)."""
    mem = state.memory  # a fresh (empty) buffer
    rep = Batch(*(np.repeat(a, copies, 0) for a in example))
    kw = {} if logits is None else {"logits": np.repeat(logits, copies, 0)}
    mem = _insert(mem, rep, jax.random.key(0), **kw)
    if extra is not None:
        mem = _insert(mem, extra, jax.random.key(1))
    return steps.place_state(state._replace(memory=mem))


def _ce(fns, model_state, params, batch):
    logits = fns.apply(params, model_state, jnp.asarray(batch.x), jnp.asarray(batch.task_ids),
                       train=True)[0]
    return masked_cross_entropy(logits, jnp.asarray(batch.y))


def _sgd(params, loss_fn, lr=1.0):
    g = jax.grad(loss_fn)(params)
    return jax.tree.map(lambda p, d: p - lr * d, params, g)


def _close(a, b, **kw):
    kw.setdefault("rtol", 1e-5)
    kw.setdefault("atol", 1e-6)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), **kw),
                 a, b)


@pytest.mark.parametrize("copies", [8, 2])
def test_er_step_is_the_concatenated_batch_step(copies):
    """(B·L_cur + m·L_mem)/(B+m), m = min(M, stored): Mammoth's concatenated batch."""
    fns, steps, state, ms = _setup("er", buffer_size=8)
    old = _batch(1, n=1)
    state = _fill(state, steps, old, copies)
    params = jax.tree.map(np.asarray, state.params)
    cur = _batch(2)
    new, _ = steps.train_step(state, steps.shard_batch(cur), 0)
    m = min(B, copies)
    concat = Batch(*(np.concatenate([a, np.repeat(b, m, 0)])
                     for a, b in zip(cur, old, strict=True)))
    _close(new.params, _sgd(params, lambda p: _ce(fns, ms, p, concat)))
    # The current batch then entered the reservoir.
    assert int(new.memory.seen) == copies + B


def test_er_with_empty_buffer_is_a_finetune_step():
    fns, steps, state, ms = _setup("er", buffer_size=8)
    params = jax.tree.map(np.asarray, state.params)
    cur = _batch(3)
    new, _ = steps.train_step(state, steps.shard_batch(cur), 0)
    _close(new.params, _sgd(params, lambda p: _ce(fns, ms, p, cur)))
    np.testing.assert_array_equal(stored(new.memory)["x"], cur.x)


def test_derpp_loss_and_stored_logits():
    alpha, beta = 0.3, 0.7
    fns, steps, state, ms = _setup("derpp", alpha=alpha, beta=beta, buffer_size=8)
    old = _batch(4, n=1)
    z = np.array([[0.5, -1.0, 2.0, 0.0]], np.float32)
    state = _fill(state, steps, old, 8, logits=z)
    params = jax.tree.map(np.asarray, state.params)
    cur = _batch(5)

    def loss(p):
        out = fns.apply(p, ms, jnp.asarray(old.x), jnp.asarray(old.task_ids), train=True)[0]
        return (_ce(fns, ms, p, cur) + alpha * jnp.mean((out - z) ** 2)
                + beta * _ce(fns, ms, p, old))

    new, _ = steps.train_step(state, steps.shard_batch(cur), 0)
    _close(new.params, _sgd(params, loss))

    # Logits stored with the current batch are the model's outputs before the update.
    fresh_fns, steps2, fresh, ms2 = _setup("derpp", alpha=alpha, beta=beta, buffer_size=8)
    p0 = jax.tree.map(np.asarray, fresh.params)
    after, _ = steps2.train_step(fresh, steps2.shard_batch(cur), 0)
    want = fresh_fns.apply(p0, ms2, jnp.asarray(cur.x), jnp.asarray(cur.task_ids), train=True)[0]
    np.testing.assert_allclose(stored(after.memory)["logits"], want, rtol=1e-5, atol=1e-6)


def test_agem_projects_against_past_tasks_only():
    fns, steps, state, ms = _setup("agem", buffer_size=16, reference_size=8)
    old = _batch(6, n=1, task=0)
    current_task_examples = _batch(7, n=4, task=1)  # stored, but not past: never sampled
    state = _fill(state, steps, old, 4, extra=current_task_examples)
    params = jax.tree.map(np.asarray, state.params)
    grad = jax.jit(jax.grad(lambda p, b: _ce(fns, ms, p, b)))
    r = grad(params, old)
    def flat(t):
        return np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)])
    for seed in range(100):  # a current batch whose gradient conflicts with the reference
        cur = _batch(100 + seed, task=1)
        g = grad(params, cur)
        dot = flat(g) @ flat(r)
        if dot < 0:
            break
    assert dot < 0, "no conflicting batch found"
    want = jax.tree.map(lambda p, gg, rr: p - (gg - dot / (flat(r) @ flat(r)) * rr), params, g, r)
    copy = steps.place_state(state)  # train_step donates its input
    new, _ = steps.train_step(state, steps.shard_batch(cur), 1)
    _close(new.params, want, rtol=1e-4, atol=1e-5)
    # On task 0 nothing is past: a plain SGD step.
    new0, _ = steps.train_step(copy, steps.shard_batch(cur), 0)
    _close(new0.params, _sgd(params, lambda p: _ce(fns, ms, p, cur)))


def test_agem_rejects_task_ids_beyond_max_tasks():
    m = make_method("agem", max_tasks=2)
    tasks = tiny_scenario().tasks
    train = TrainArrays(np.zeros((1, *SHAPE), np.float32), np.zeros(1, np.int32),
                        np.full(1, 2, np.int32))
    ctx = BoundaryContext(task_index=2, tasks=tasks, train=train, model=None,
                          objective=Classification(), rng=jax.random.key(0))
    with pytest.raises(ValueError, match="max_tasks=2"):
        m.before_task(None, ctx)


def test_replay_reptile_is_er_then_interpolation():
    eps = 0.25
    _, er_steps, er_state, _ = _setup("er", buffer_size=8)
    _, rr_steps, rr_state, _ = _setup("replay_reptile", buffer_size=8, replay_fraction=0.5,
                                      reptile_every=1, meta_lr=eps)
    old = _batch(8, n=1)
    er_state = _fill(er_state, er_steps, old, 8)
    rr_state = _fill(rr_state, rr_steps, old, 8)
    params = jax.tree.map(np.asarray, er_state.params)
    cur = _batch(9)
    er_new, _ = er_steps.train_step(er_state, er_steps.shard_batch(cur), 0)
    rr_new, _ = rr_steps.train_step(rr_state, rr_steps.shard_batch(cur), 0)
    _close(rr_new.params, jax.tree.map(lambda p, q: p + eps * (q - p), params, er_new.params))


@pytest.mark.slow
def test_replay_reduces_forgetting_on_a_tiny_stream():
    accs = {}
    for method in ("finetune", "er"):
        config = tiny_config()
        config.method.name = method
        accs[method] = train_continual(config, scenario=tiny_scenario()).accuracy_matrix
    # Class-incremental finetuning forgets task 0; replay keeps part of it.
    assert accs["finetune"][1, 0] < 0.2
    assert accs["er"][1, 0] > accs["finetune"][1, 0] + 0.3


@pytest.mark.parametrize("method,hp,match", [
    ("er", {"buffer_size": 0}, "buffer_size must be a positive int"),
    ("er", {"replay_ratio": 0.0}, "replay_ratio"),
    ("derpp", {"alpha": -1.0}, "alpha"),
    ("agem", {"reference_size": 0}, "reference_size"),
    ("replay_reptile", {"replay_fraction": 1.0}, "replay_fraction"),
    ("replay_reptile", {"meta_lr": 1.5}, "meta_lr"),
])
def test_bad_hyperparameters(method, hp, match):
    with pytest.raises(ValueError, match=match):
        make_method(method, **hp)


def test_init_memory_needs_the_data_spec():
    with pytest.raises(ValueError, match="DataSpec"):
        make_method("er").init_memory({})


def test_in_default_config():
    c = default_config()
    assert c.method.er.buffer_size == 200 and c.method.derpp.alpha == 0.1
    assert c.method.derpp.beta == 0.5 and c.method.agem.reference_size == 256
    assert c.method.replay_reptile.meta_lr == 0.1


# ------------------------------------------------------------------ language modeling

LM_L, LM_V, LM_LR = 8, 16, 0.1
_LM = LanguageModeling()
# One compiled StepFns per method (shared by the LM tests); buffers hold every example the
# tests insert, so their contents are exactly the inserted stream.
_LM_METHODS = {"er": {"buffer_size": 64}, "derpp": {"buffer_size": 64, "alpha": 0.3,
                                                     "beta": 0.7},
               "agem": {"buffer_size": 64, "reference_size": 8}}


@functools.cache
def _lm_tasks():
    return synthetic_token_domains(num_tasks=2, vocab_size=LM_V, seq_len=LM_L, num_train=32,
                                   num_test=8).tasks


@functools.cache
def _lm_compiled(method):
    model = make_model("causal_lm", input_shape=(LM_L,), num_classes=LM_V, dim=32, depth=2,
                       num_heads=2, seed=0)
    fns, params, model_state = ModelFns.split(model)
    m = make_method(method, **_LM_METHODS[method])
    task = _lm_tasks()[0]
    train = TrainArrays(task.x_train, task.y_train, np.zeros(len(task.x_train), np.int32))
    data = DataSpec(example_spec(train), jax.ShapeDtypeStruct((LM_L, LM_V), jnp.float32))
    steps = StepFns(fns, m, m.optimizer(optax.sgd(LM_LR)), data_mesh(1), objective=_LM,
                    data=data)
    return fns, steps, params, model_state


def _lm_setup(method):
    fns, steps, params, model_state = _lm_compiled(method)
    return fns, steps, steps.init_state(params, model_state, 0), model_state


def _lm_batch(task, start, n=B):
    """Rows of a token task; the last target is -1 (no loss), which the buffer must keep."""
    t = _lm_tasks()[task]
    y = t.y_train[start:start + n].copy()
    y[:, -1] = -1
    return Batch(t.x_train[start:start + n], y, np.full(n, task, np.int32))


def _lm_loss(fns, model_state, params, batch):
    out = fns.apply(params, model_state, jnp.asarray(batch.x), jnp.asarray(batch.task_ids),
                    train=True)[0]
    return _LM.loss(out, jax.tree.map(jnp.asarray, batch))


@pytest.mark.parametrize("method", sorted(_LM_METHODS))
def test_replay_methods_train_a_causal_lm_and_store_token_sequences(method):
    fns, steps, state, ms = _lm_setup(method)
    layout = jax.tree.map(lambda a: (a.shape, a.dtype), (state.memory.x, state.memory.y))
    assert layout == (((64, LM_L), jnp.int32), ((64, LM_L), jnp.int32))
    p0 = jax.tree.map(np.asarray, state.params)
    inserted, losses = [], []
    for task in (0, 1):
        for i in range(3):
            b = _lm_batch(task, 4 * i)
            state, m = steps.train_step(state, steps.shard_batch(b), task)
            inserted.append(b)
            losses.append(float(m.loss))
    assert np.all(np.isfinite(losses)), losses
    got = stored(state.memory)
    assert int(state.memory.size) == 6 * B
    # Under capacity both reservoir and per-task CBRS fill the slots in stream order.
    for field in ("x", "y", "task_ids"):
        want = np.concatenate([getattr(b, field) for b in inserted])
        np.testing.assert_array_equal(got[field], want)
    assert got["x"].dtype == np.int32 and (got["y"][:, -1] == -1).all()
    if method == "derpp":
        # The outputs stored with the first batch are the model's (L, V) logits before
        # the first update.
        apply = jax.jit(lambda p, x, t: fns.apply(p, ms, x, t, train=True)[0])
        want = apply(p0, inserted[0].x, inserted[0].task_ids)
        assert got["logits"].shape == (6 * B, LM_L, LM_V)
        np.testing.assert_allclose(got["logits"][:B], want, rtol=1e-5, atol=1e-5)


def test_er_lm_step_is_the_token_weighted_concatenated_batch_step():
    fns, steps, state, ms = _lm_setup("er")
    old = _lm_batch(0, 0, n=1)
    state = _fill(state, steps, old, 8)
    params = jax.tree.map(np.asarray, state.params)
    cur = _lm_batch(1, 0)
    new, _ = steps.train_step(state, steps.shard_batch(cur), 1)
    # M = B = 4 draws of the one stored example, each weighing 1: the LM loss pooled over
    # the tokens of [current; 4 copies].
    concat = Batch(*(np.concatenate([a, np.repeat(b, B, 0)])
                     for a, b in zip(cur, old, strict=True)))
    _close(new.params, _sgd(params, jax.jit(lambda p: _lm_loss(fns, ms, p, concat)), LM_LR),
           atol=1e-5)


def test_derpp_lm_mse_is_the_mean_over_sequence_logits():
    alpha, beta = _LM_METHODS["derpp"]["alpha"], _LM_METHODS["derpp"]["beta"]
    fns, steps, state, ms = _lm_setup("derpp")
    old = _lm_batch(0, 0, n=1)
    z = np.random.default_rng(0).normal(size=(1, LM_L, LM_V)).astype(np.float32)
    state = _fill(state, steps, old, 8, logits=z)
    params = jax.tree.map(np.asarray, state.params)
    cur = _lm_batch(1, 0)

    def loss(p):
        out = fns.apply(p, ms, jnp.asarray(old.x), jnp.asarray(old.task_ids), train=True)[0]
        # F.mse_loss over the (m, L, V) entries; every draw is the one stored example.
        return (_lm_loss(fns, ms, p, cur) + alpha * jnp.mean((out - z) ** 2)
                + beta * _lm_loss(fns, ms, p, old))

    new, _ = steps.train_step(state, steps.shard_batch(cur), 1)
    _close(new.params, _sgd(params, jax.jit(loss), LM_LR), atol=1e-5)


def test_agem_lm_reference_gradient_is_the_lm_loss_gradient():
    fns, steps, state, ms = _lm_setup("agem")
    old = _lm_batch(0, 0, n=1)
    state = _fill(state, steps, old, 4, extra=_lm_batch(1, 8))  # task-1 rows: not past
    params = jax.tree.map(np.asarray, state.params)
    cur = _lm_batch(1, 0)
    grad = jax.jit(jax.grad(lambda p, b: _lm_loss(fns, ms, p, b)))
    g, r = grad(params, cur), grad(params, old)
    def flat(t):
        return np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)])
    dot = flat(g) @ flat(r)
    # A-GEM: g - min(0, <g, r>)/<r, r> r, then SGD.
    coef = min(dot, 0.0) / (flat(r) @ flat(r))
    want = jax.tree.map(lambda p, gg, rr: p - LM_LR * (gg - coef * rr), params, g, r)
    new, _ = steps.train_step(state, steps.shard_batch(cur), 1)
    _close(new.params, want, rtol=1e-4, atol=1e-5)
