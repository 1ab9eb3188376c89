"""Tests for clax.fisher.estimators: diagonal Fisher against jax.vmap(jax.grad) references."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from clax.core import Batch, LanguageModeling, ModelFns, TrainArrays
from clax.data.text import synthetic_token_domains
from clax.fisher import check_fisher, diagonal_fisher, fisher_batch_update
from clax.models import make_model

N, BATCH, CHUNK, CLASSES = 21, 8, 3, 4  # ragged last batch and ragged chunks on purpose


def _data(shape, num_tasks, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N, *shape)).astype(np.float32)
    y = rng.integers(0, CLASSES, N).astype(np.int32)
    t = rng.integers(0, num_tasks, N).astype(np.int32)
    return x, y, t


@functools.cache  # model construction is slow (eager initialisers): build each one once
def _model(name):
    if name == "mlp":  # Dense identity + multi-head identity
        m = make_model("mlp", input_shape=(4, 4, 1), num_classes=CLASSES, widths=(6,),
                       num_tasks=2, seed=0)
        return ModelFns.split(m), _data((4, 4, 1), 2)
    m = make_model("cnn", input_shape=(6, 6, 2), num_classes=CLASSES, channels=(3,), hidden=5,
                   seed=0)  # conv kernel/bias through the per-module scan
    return ModelFns.split(m), _data((6, 6, 2), 1)


def _apply(fns, model_state):
    return lambda p, x, t: fns.apply(p, model_state, x, t, train=False)[0]


def _per_example_grads(apply, params, x, y, t):
    def loss(p, xi, yi, ti):
        logits = apply(p, xi[None], ti[None])
        return optax.softmax_cross_entropy_with_integer_labels(logits, yi[None])[0]

    return jax.vmap(jax.grad(loss), in_axes=(None, 0, 0, 0))(params, x, y, t)


def _assert_trees_close(a, b, rtol=2e-5):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    scale = max(float(jnp.max(jnp.abs(v))) for v in jax.tree.leaves(b))
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=rtol, atol=rtol * scale),
                 a, b)


@pytest.fixture(scope="module", params=["mlp", "cnn"])
def setup(request):
    (fns, params, model_state), data = _model(request.param)
    return request.param, fns, params, model_state, data


def test_per_example_matches_vmap_grad_both_paths(setup):
    _, fns, params, model_state, (x, y, t) = setup
    grads = _per_example_grads(_apply(fns, model_state), params, x, y, t)
    expected = jax.tree.map(lambda g: jnp.mean(g**2, axis=0), grads)
    taps = diagonal_fisher(fns, params, (x, y, t), model_state=model_state, batch_size=BATCH,
                           chunk_size=CHUNK)
    _assert_trees_close(taps, expected)
    generic = diagonal_fisher(_apply(fns, model_state), params, (x, y, t), batch_size=BATCH,
                              chunk_size=CHUNK, normalization="sum")
    _assert_trees_close(generic, jax.tree.map(lambda e: e * N, expected))
    for leaf in jax.tree.leaves(taps):
        assert leaf.dtype == jnp.float32 and np.all(np.isfinite(leaf)) and np.all(leaf >= 0)
    check_fisher(taps, params)
    # Something non-trivial was estimated in every layer of the small models.
    assert all(float(jnp.max(v)) > 0 for v in jax.tree.leaves(taps))


def test_batch_granularity_is_its_definition():
    # One model suffices: the batch path is the plain VJP of apply, whatever the layers.
    (fns, params, model_state), (x, y, t) = _model("mlp")
    apply = _apply(fns, model_state)

    def batch_loss(p, xb, yb, tb):
        logits = apply(p, xb, tb)
        return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

    squares = []
    for s in range(0, N, BATCH):  # in order, the last batch has N % BATCH = 5 examples
        g = jax.grad(batch_loss)(params, x[s:s + BATCH], y[s:s + BATCH], t[s:s + BATCH])
        squares.append(jax.tree.map(jnp.square, g))
    expected = jax.tree.map(lambda *s: sum(s) / len(s), *squares)
    got = diagonal_fisher(fns, params, (x, y, t), model_state=model_state,
                          granularity="batch", batch_size=BATCH)
    _assert_trees_close(got, expected)
    # The host loop (one call per batch) computes the same.
    host = diagonal_fisher(fns, params, (x, y, t), model_state=model_state,
                           granularity="batch", batch_size=BATCH, loop="host")
    _assert_trees_close(host, expected)
    # sum normalization = N_b x mean (same compiled function).
    got_sum = diagonal_fisher(fns, params, (x, y, t), model_state=model_state,
                              granularity="batch", batch_size=BATCH,
                              normalization="sum")
    _assert_trees_close(got_sum, jax.tree.map(lambda e: e * len(squares), expected))


def test_true_fisher_sampling_is_deterministic_given_key():
    (fns, params, model_state), (x, y, t) = _model("mlp")
    kw = {"model_state": model_state, "labels": "true", "batch_size": BATCH,
          "chunk_size": CHUNK}
    a = diagonal_fisher(fns, params, (x, y, t), key=jax.random.key(1), **kw)
    b = diagonal_fisher(fns, params, (x, y, t), key=jax.random.key(1), **kw)
    c = diagonal_fisher(fns, params, (x, y, t), key=jax.random.key(2), **kw)
    jax.tree.map(np.testing.assert_array_equal, a, b)
    assert any(not np.array_equal(u, v)
               for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(c), strict=True))
    # The labels are the categorical samples of each batch's logits with fold_in(key, b).
    logits = _apply(fns, model_state)(params, x, t)
    sampled = np.concatenate([
        np.asarray(jax.random.categorical(jax.random.fold_in(jax.random.key(1), b),
                                          logits[s:s + BATCH]))
        for b, s in enumerate(range(0, N, BATCH))])
    grads = _per_example_grads(_apply(fns, model_state), params, x, sampled, t)
    _assert_trees_close(a, jax.tree.map(lambda g: jnp.mean(g**2, axis=0), grads))


def test_bad_arguments_are_named():
    (fns, params, _), (x, y, _) = _model("mlp")
    with pytest.raises(ValueError, match="labels must be one of"):
        diagonal_fisher(fns, params, (x, y), labels="model")
    with pytest.raises(ValueError, match="granularity must be one of"):
        diagonal_fisher(fns, params, (x, y), granularity="sample")
    with pytest.raises(ValueError, match="normalization must be one of"):
        diagonal_fisher(fns, params, (x, y), normalization="max")
    with pytest.raises(ValueError, match="pass key="):
        diagonal_fisher(fns, params, (x, y), labels="true")
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        diagonal_fisher(fns, params, (x, y), batch_size=0)
    with pytest.raises(ValueError, match="y must have shape"):
        diagonal_fisher(fns, params, (x, y[:-1]))
    with pytest.raises(ValueError, match="data is empty"):
        diagonal_fisher(fns, params, (x[:0], y[:0]))


def test_check_fisher_names_the_leaf_path():
    params = {"layers": {0: {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)}}}
    good = jax.tree.map(jnp.zeros_like, params)
    check_fisher(good, params)
    with pytest.raises(ValueError, match="layers/0/bias"):
        check_fisher({"layers": {0: {"kernel": good["layers"][0]["kernel"]}}}, params)
    with pytest.raises(ValueError, match="layers/0/kernel.*shape"):
        check_fisher({"layers": {0: {"kernel": jnp.zeros((3, 2)), "bias": jnp.zeros(3)}}},
                     params)
    bad = {"layers": {0: {"kernel": jnp.zeros((2, 3)), "bias": jnp.array([0.0, -1.0, 0.0])}}}
    with pytest.raises(ValueError, match="layers/0/bias.*negative"):
        check_fisher(bad, params)
    bad["layers"][0]["bias"] = jnp.array([0.0, jnp.nan, 0.0])
    with pytest.raises(ValueError, match="layers/0/bias.*non-finite"):
        check_fisher(bad, params)


# --------------------------------------------------------------------------- language model

LM_N, LM_LEN, VOCAB = 13, 16, 16  # 13 sequences: a ragged last batch (8 + 5), ragged chunks


@functools.cache
def _lm():
    model = make_model("causal_lm", input_shape=(LM_LEN,), num_classes=VOCAB, dim=32, depth=2,
                       num_heads=2, seed=0)
    scenario = synthetic_token_domains(num_tasks=1, vocab_size=VOCAB, seq_len=LM_LEN,
                                       num_train=LM_N, num_test=1)
    task = scenario.tasks[0]
    # One objective object for every call: it is a static argument of the jitted core.
    return ModelFns.split(model), (task.x_train, task.y_train), LanguageModeling()


def _lm_per_example_grads(fns, params, model_state, objective, x, y):
    """The reference: ``g_i = ∇ per_example_loss`` of each sequence, by ``vmap(grad)``."""

    def loss(p, xi, yi):
        one = Batch(xi[None], yi[None], jnp.zeros((1,), jnp.int32))
        outputs = fns.apply(p, model_state, one.x, one.task_ids, train=False)[0]
        return objective.per_example_loss(outputs, one)[0]

    return jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0, 0)))(params, x, y)


def test_lm_per_example_matches_vmap_grad_with_masked_tokens():
    # Tolerance: both sides are float32 sums of the same per-token products in different
    # orders (the token sum A_iᵀΔ_i of the per-token Dense path, the per-module VJPs of
    # the embeddings / LayerNorms / position embedding against one autodiff backward
    # pass). Each gradient entry sums at most L·4D = 2048 products, whose rounding is
    # ~sqrt(2048)·2^-24 ≈ 3e-6 relative in typical (random-sign) accumulation; squaring
    # doubles it, and the mean over examples does not grow it. 2e-5 of the largest
    # Fisher entry leaves a margin over that (measured: <= 6e-7) while the wrong per-token
    # identity Σ_t a_t²δ_t² is off by O(1).
    (fns, params, model_state), (x, y), objective = _lm()
    masked = y.copy()
    masked[np.random.default_rng(0).random(y.shape) < 0.3] = -1  # prompt / padding tokens
    masked[4] = -1  # a sequence without counted tokens: loss 0, no gradient
    for targets in (y, masked):
        grads = _lm_per_example_grads(fns, params, model_state, objective, x, targets)
        expected = jax.tree.map(lambda g: jnp.mean(g**2, axis=0), grads)
        got = diagonal_fisher(fns, params, TrainArrays(x, targets, np.zeros(LM_N, np.int32)),
                              model_state=model_state, objective=objective,
                              batch_size=BATCH, chunk_size=CHUNK)
        _assert_trees_close(got, expected)
        check_fisher(got, params)
    # The masked tokens changed the estimate (the test is not vacuous).
    assert not np.allclose(jax.tree.leaves(got)[-1], jax.tree.leaves(
        diagonal_fisher(fns, params, (x, y), model_state=model_state, objective=objective,
                        batch_size=BATCH, chunk_size=CHUNK))[-1])


def test_lm_batch_granularity_is_its_definition():
    # F = (1/N_b) Σ_b ((1/|𝓑_b|) Σ_{i∈𝓑_b} g_i)²: every sequence of a batch weighs the same.
    (fns, params, model_state), (x, y), objective = _lm()
    grads = _lm_per_example_grads(fns, params, model_state, objective, x, y)
    squares = [jax.tree.map(lambda g, s=s: jnp.square(jnp.mean(g[s:s + BATCH], axis=0)), grads)
               for s in range(0, LM_N, BATCH)]
    expected = jax.tree.map(lambda *s: sum(s) / len(s), *squares)
    got = diagonal_fisher(fns, params, (x, y), model_state=model_state, objective=objective,
                          granularity="batch", batch_size=BATCH)
    _assert_trees_close(got, expected)


def test_lm_targets_that_do_not_fit_the_objective_are_named():
    (fns, params, model_state), (x, y), objective = _lm()
    # LM targets (N, L) with the default Classification objective (the reported bug).
    with pytest.raises(ValueError, match=r"data\.y \(shapes \[\(13, 16\)\]\) does not fit "
                                         r"Classification.*one loss per example"):
        diagonal_fisher(fns, params, (x, y), model_state=model_state)
    with pytest.raises(ValueError, match=r"data\.y \(shapes \[\(13,\)\]\) does not fit "
                                         r"LanguageModeling"):
        diagonal_fisher(fns, params, (x, y[:, 0]), model_state=model_state,
                        objective=objective)
    with pytest.raises(ValueError, match="logit_masks is only for the default objective"):
        diagonal_fisher(fns, params, (x, y), model_state=model_state, objective=objective,
                        logit_masks=np.ones((1, VOCAB), bool))
    with pytest.raises(TypeError, match="objective must implement clax.core.Objective"):
        diagonal_fisher(fns, params, (x, y), model_state=model_state, objective="lm")


def test_lm_per_example_scratch_is_not_batch_times_params():
    # A wide, short model, so that a (B, params) array would dwarf the activations: the
    # compiled per-example program's scratch must stay below half of one.
    model = make_model("causal_lm", input_shape=(4,), num_classes=VOCAB, dim=64, depth=1,
                       num_heads=2, seed=0)
    fns, params, model_state = ModelFns.split(model)
    b = 32
    num_params = sum(int(np.size(p)) for p in jax.tree.leaves(params))
    tokens = jax.ShapeDtypeStruct((b, 4), jnp.int32)
    ints = jax.ShapeDtypeStruct((b,), jnp.int32)
    acc = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, jnp.float32), params)
    compiled = fisher_batch_update.lower(
        fns, acc, params, model_state, tokens, tokens, ints,
        jax.ShapeDtypeStruct((b,), jnp.float32), jax.random.key(0), None,
        labels="empirical", granularity="example", chunk_size=4,
        objective=LanguageModeling()).compile()
    analysis = compiled.memory_analysis()
    if analysis is None:  # backends without memory analysis
        pytest.skip("no memory analysis on this backend")
    assert analysis.temp_size_in_bytes < 0.5 * b * num_params * 4
