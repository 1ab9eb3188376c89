"""Tests for clax.subspace.representations: patch layout, columns, jitted collection."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from clax.models import make_model
from clax.subspace.representations import collect_representations, representation_matrices
from clax.core import ModelFns


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
