"""Tests for clax.models.heads."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from clax.models import MultiHeadLinear, apply_head, make_head
from tests.models.models_test import materialize


def _head(in_features, out_features, num_tasks):
    # Numpy-filled values (non-zero biases too); real init is tested separately.
    return materialize(
        nnx.eval_shape(
            lambda: MultiHeadLinear(in_features, out_features, num_tasks, rngs=nnx.Rngs(0))
        )
    )


def test_multi_head_picks_each_examples_head():
    head = _head(6, 4, 3)
    assert np.all(np.asarray(head.bias[...]) != 0)  # a wrong bias row would show
    x = jnp.asarray(np.random.default_rng(2).standard_normal((5, 6)), jnp.float32)
    task_ids = jnp.array([2, 0, 1, 2, 0], jnp.int32)
    out = head(x, task_ids)
    kernel, bias = np.asarray(head.kernel[...]), np.asarray(head.bias[...])
    expected = np.stack(
        [np.asarray(x[b]) @ kernel[t] + bias[t] for b, t in enumerate(task_ids.tolist())]
    )
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    assert head.kernel.shape == (3, 6, 4) and head.bias.shape == (3, 4)


def test_multi_head_real_init():
    head = MultiHeadLinear(64, 8, 3, rngs=nnx.Rngs(0))
    k = np.asarray(head.kernel[...])
    assert not np.allclose(k[0], k[1])  # heads initialised independently
    np.testing.assert_array_equal(head.bias[...], 0.0)
    # LeCun-normal per head: std ~ 1/sqrt(fan_in=64), not 1/sqrt(64*3).
    assert 0.08 < k.std() < 0.16


def test_multi_head_requires_task_ids():
    head = _head(3, 2, 2)
    with pytest.raises(ValueError, match="task_ids"):
        head(jnp.ones((4, 3)), None)


@pytest.mark.parametrize(
    "task_ids, match",
    [
        (jnp.zeros((3,), jnp.int32), r"shape \(4,\)"),
        (jnp.zeros((4, 1), jnp.int32), r"shape \(4,\)"),
        (jnp.zeros((4,), jnp.float32), "integer"),
    ],
)
def test_multi_head_rejects_bad_task_ids(task_ids, match):
    head = _head(3, 2, 2)
    with pytest.raises(ValueError, match=match):
        head(jnp.ones((4, 3)), task_ids)


def test_multi_head_rejects_bad_feature_size():
    head = _head(3, 2, 2)
    with pytest.raises(ValueError, match=r"\(B, 3\)"):
        head(jnp.ones((4, 5)), jnp.zeros((4,), jnp.int32))


@pytest.mark.parametrize("arg", ["in_features", "out_features", "num_tasks"])
def test_multi_head_rejects_bad_sizes(arg):
    sizes = {"in_features": 3, "out_features": 2, "num_tasks": 2, arg: 0}
    with pytest.raises(ValueError, match=arg):
        MultiHeadLinear(**sizes, rngs=nnx.Rngs(0))


def test_make_head_and_apply_head():
    single = materialize(nnx.eval_shape(lambda: make_head(3, 2, 1, rngs=nnx.Rngs(0))))
    multi = materialize(nnx.eval_shape(lambda: make_head(3, 2, 4, rngs=nnx.Rngs(0))))
    assert type(single) is nnx.Linear
    assert isinstance(multi, MultiHeadLinear)
    x = jnp.ones((2, 3))
    # A single head ignores task ids.
    np.testing.assert_array_equal(apply_head(single, x, jnp.array([1, 0])), single(x))
    assert apply_head(multi, x, jnp.array([3, 0])).shape == (2, 2)
    with pytest.raises(ValueError, match="num_tasks"):
        make_head(3, 2, 0, rngs=nnx.Rngs(0))
