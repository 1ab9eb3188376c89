"""Tests for clax.subspace.representations: patch layout, columns, jitted collection."""

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import clax.methods  # noqa: F401  (registers gpm for make_method)
from clax.core import (
    Batch,
    BoundaryContext,
    LanguageModeling,
    ModelFns,
    TrainState,
    current_task_data,
    make_method,
)
from clax.data.text import synthetic_token_domains
from clax.models import make_model
from clax.params.paths import path_str
from clax.subspace import SubspaceBasis, empty_basis, grow_basis, project_out
from clax.subspace.representations import collect_representations, representation_matrices


class ConvNet(nnx.Module):
    """A strided VALID conv, a SAME conv with bias, then a Linear: the patch cases."""

    def __init__(self, rngs):
        self.c1 = nnx.Conv(3, 4, kernel_size=(3, 2), strides=(2, 1), padding="VALID", rngs=rngs)
        self.c2 = nnx.Conv(4, 5, kernel_size=(3, 3), padding="SAME", rngs=rngs)
        self.fc = nnx.Linear(5, 2, rngs=rngs)

    def __call__(self, x, task_ids=None):
        h1 = self.c1(x)
        h2 = self.c2(h1)
        return self.fc(h2.mean(axis=(1, 2))), (h1, h2)


@nnx.jit(static_argnames="max_columns")
def forward_and_reps(model, x, key, max_columns=None):
    _, hidden = model(x)
    return hidden, representation_matrices(model, x, max_columns=max_columns, key=key)


@pytest.fixture(scope="module")
def convnet():
    return ConvNet(nnx.Rngs(0))


def test_conv_output_is_patches_times_reshaped_kernel(convnet):
    model = convnet
    x = jax.random.normal(jax.random.key(1), (2, 7, 6, 3))
    (h1, h2), reps = forward_and_reps(model, x, jax.random.key(0))
    assert set(reps) == {("c1", "kernel"), ("c2", "kernel"), ("fc", "kernel")}
    for name, out in (("c1", h1), ("c2", h2)):
        conv = getattr(model, name)
        kernel = conv.kernel[...]
        r = reps[(name, "kernel")]
        assert r.shape == (np.prod(kernel.shape[:3]), out.shape[0] * out.shape[1] * out.shape[2])
        rebuilt = r.T @ kernel.reshape(-1, kernel.shape[-1]) + conv.bias[...]
        np.testing.assert_allclose(np.asarray(rebuilt),
                                   np.asarray(out.reshape(-1, out.shape[-1])), atol=1e-5)
    # Dense: one column per example, the layer's input itself.
    np.testing.assert_allclose(np.asarray(reps[("fc", "kernel")]),
                               np.asarray(h2.mean(axis=(1, 2)).T), atol=1e-6)


def test_column_cap_keeps_a_subset_of_columns(convnet):
    model = convnet
    x = jax.random.normal(jax.random.key(1), (2, 7, 6, 3))
    full = np.asarray(forward_and_reps(model, x, jax.random.key(0))[1][("c2", "kernel")])
    capped = np.asarray(
        forward_and_reps(model, x, jax.random.key(3), max_columns=7)[1][("c2", "kernel")])
    assert capped.shape == (full.shape[0], 7)
    matches = [np.flatnonzero(np.all(np.isclose(full, c[:, None]), axis=0)) for c in capped.T]
    idx = [m[0] for m in matches if len(m)]
    assert len(idx) == 7 and len(set(idx)) == 7 and idx == sorted(idx)


def test_collect_on_split_model_matches_eager_and_handles_heads():
    model = make_model("cnn", input_shape=(8, 8, 1), num_classes=4, num_tasks=2,
                       channels=(3,), hidden=6, seed=0)
    fns, params, state = ModelFns.split(model)
    x = jax.random.uniform(jax.random.key(0), (5, 8, 8, 1))
    tids = jnp.array([0, 1, 0, 1, 1], jnp.int32)
    reps = collect_representations(fns, params, state, x, tids, max_columns=None)
    model.eval()
    eager = nnx.jit(lambda m, x, t: representation_matrices(m, x, t, max_columns=None))(
        model, x, tids)
    assert set(reps) == set(eager) == {
        ("convs", 0, "kernel"), ("fc", "kernel"), ("head", "kernel")}
    for k in reps:
        np.testing.assert_allclose(np.asarray(reps[k]), np.asarray(eager[k]), atol=1e-5)
    assert reps[("convs", 0, "kernel")].shape == (9, 5 * 8 * 8)
    assert reps[("head", "kernel")].shape == (6, 5)
    no_heads = collect_representations(fns, params, state, x, tids, include_multi_head=False)
    assert ("head", "kernel") not in no_heads


def test_unsupported_conv_and_bad_cap():
    class Dilated(nnx.Module):
        def __init__(self):
            self.conv = nnx.Conv(1, 1, kernel_size=(3, 3), kernel_dilation=2, rngs=nnx.Rngs(0))

        def __call__(self, x, task_ids=None):
            return self.conv(x)

    with pytest.raises(ValueError, match="conv at conv: kernel_dilation"):
        representation_matrices(nnx.eval_shape(Dilated), jnp.zeros((1, 6, 6, 1)))
    with pytest.raises(ValueError, match="max_columns must be a positive int"):
        representation_matrices(nnx.eval_shape(lambda: ConvNet(nnx.Rngs(0))),
                                jnp.zeros((1, 7, 6, 3)), max_columns=0)


# --------------------------------------------------------------------------- token sequences

LM_N, LM_LEN, DIM = 24, 8, 16


@functools.cache
def _lm():
    fns, params, state = ModelFns.split(make_model(
        "causal_lm", input_shape=(LM_LEN,), num_classes=16, dim=DIM, depth=1, num_heads=2,
        seed=0))
    scenario = synthetic_token_domains(num_tasks=1, vocab_size=16, seq_len=LM_LEN,
                                       num_train=LM_N, num_test=1)
    return fns, params, state, scenario


def _linear_kernels(params):
    """Paths of every 2-D ``kernel`` leaf (the Linears), as tuples."""
    return {tuple(getattr(k, "key", getattr(k, "idx", None)) for k in path)
            for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
            if getattr(path[-1], "key", None) == "kernel" and np.ndim(leaf) == 2}


def test_token_linear_columns_are_the_token_inputs():
    fns, params, state, scenario = _lm()
    x = scenario.tasks[0].x_train  # token ids (N, L) int32
    reps = collect_representations(fns, params, state, x, max_columns=None)
    # Every Linear has a matrix; the embedding table and pos_embed (not Linear) have none.
    assert set(reps) == _linear_kernels(params)
    for r in reps.values():
        assert r.shape[1] == LM_N * LM_LEN  # one column per (sequence, token)
    # The output layer reads the final hidden states: its columns are those tokens, in
    # sample-major order.
    hidden = fns.module(params, state, train=False).hidden(jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(reps[("head", "kernel")]),
                               np.asarray(hidden.reshape(-1, DIM).T), atol=1e-5)
    # Capped: 50 of the token columns, sampled (as conv patches are). Columns are compared
    # as values only: a sequence's first token state depends on its token id alone, so
    # equal columns repeat across sequences.
    capped = collect_representations(fns, params, state, x, max_columns=50,
                                     key=jax.random.key(1))
    full, part = np.asarray(reps[("head", "kernel")]), np.asarray(capped[("head", "kernel")])
    assert part.shape == (DIM, 50)
    assert all(np.all(np.isclose(full, c[:, None], atol=1e-6), axis=0).any() for c in part.T)


def test_gpm_basis_of_token_inputs_bounds_the_change_on_old_tokens():
    # GPM's first-task rule keeps the r leading left singular vectors of R with captured
    # energy Σ_{j<r} S_j²/‖R‖² < ε (strict). A kernel update projected off that basis moves
    # the layer's outputs on the old token inputs by ‖Rᵀ(I − MMᵀ)ΔW‖_F <= S_r ‖ΔW‖_2: at most
    # the largest singular value the basis left out.
    fns, params, state, scenario = _lm()
    reps = collect_representations(fns, params, state, scenario.tasks[0].x_train,
                                   max_columns=None)
    eps = 0.97
    rng = np.random.default_rng(0)
    for path, r in reps.items():
        r = np.asarray(r, np.float64)
        basis = grow_basis(empty_basis(r.shape[0]), r, eps, first=True)
        rank = int(basis.rank)
        s = np.linalg.svd(r, compute_uv=False)
        energy = np.cumsum(s**2) / np.sum(s**2)
        assert rank > 0, path
        assert energy[rank - 1] < eps + 1e-5 and (rank == len(s) or energy[rank] >= eps - 1e-5)
        delta = rng.normal(size=(r.shape[0], 5)).astype(np.float32)
        moved = np.linalg.norm(r.T @ np.asarray(project_out(basis, delta), np.float64))
        left_out = s[rank] if rank < len(s) else 0.0
        # 1e-3 relative slack + an absolute term: float32 SVD and projection rounding.
        bound = left_out * np.linalg.norm(delta, 2)
        assert moved <= 1.001 * bound + 1e-4 * s[0] * np.linalg.norm(delta, 2), path
        assert moved < np.linalg.norm(r.T @ delta)  # and the projection did something


def test_gpm_step_on_a_language_model_runs_and_keeps_shapes():
    # GPM on token sequences: consolidation reads the tokens the model sees (no labels),
    # the next step projects every Linear kernel and freezes 1-D parameters, while the
    # embedding table and pos_embed (no basis: not Linear kernels) train freely.
    fns, params, state, scenario = _lm()
    objective = LanguageModeling()
    method = make_method("gpm", num_samples=16, max_columns=64)
    tx = method.optimizer(optax.sgd(0.1))
    train_state = TrainState(params=params, model_state=state, opt_state=tx.init(params),
                             memory=method.init_memory(params), rng=jax.random.key(0),
                             step=jnp.zeros((), jnp.int32))
    data = current_task_data(scenario.tasks, 0)
    ctx = BoundaryContext(task_index=0, tasks=scenario.tasks, train=data, model=fns,
                          objective=objective, rng=jax.random.key(1))
    new = method.consolidate(train_state, ctx)
    assert jax.tree.structure(new.memory) == jax.tree.structure(train_state.memory)
    bases = {path_str(p): b for p, b in jax.tree_util.tree_flatten_with_path(
        new.memory, is_leaf=lambda b: isinstance(b, SubspaceBasis))[0]}
    assert set(bases) == {path_str(k) for k in _linear_kernels(params)}
    assert "embed/embedding" not in bases and "pos_embed" not in bases
    assert all(int(b.rank) > 0 for b in bases.values())

    batch = Batch(*(jnp.asarray(a[:8]) for a in data))

    def loss(p):
        outputs = fns.apply(p, state, batch.x, batch.task_ids, train=False)[0]
        return objective.loss(outputs, batch)

    grads = jax.grad(loss)(params)
    updates, _ = tx.update(grads, new.opt_state, params, **method.extra_args(
        types.SimpleNamespace(memory=new.memory)))
    assert jax.tree.structure(updates) == jax.tree.structure(params)
    flat = {path_str(p): u for p, u in jax.tree_util.tree_flatten_with_path(updates)[0]}
    shapes = {path_str(p): np.shape(v) for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    for path, u in flat.items():
        assert u.shape == shapes[path] and np.all(np.isfinite(u)), path
        if path in bases:  # Linear kernels: the update is orthogonal to the basis
            m = np.asarray(bases[path].vectors)
            assert np.abs(m.T @ np.asarray(u)).max() < 1e-5 * max(np.abs(u).max(), 1e-12) + 1e-7
        elif np.ndim(u) == 1:  # biases, LayerNorms: frozen after the first task
            np.testing.assert_array_equal(u, 0.0)
    assert np.abs(flat["embed/embedding"]).max() > 0 and np.abs(flat["pos_embed"]).max() > 0
