"""Shape, multi-head, error and jit/grad tests shared by every model family.

Output shapes for every input size are checked abstractly (``nnx.eval_shape`` +
``jax.eval_shape``: exact static shapes, no compilation); numerical checks run on 8x8 inputs
with small widths to keep the suite fast on CPU.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from clax.models import (
    MLP,
    MultiHeadLinear,
    ResNet18,
    SmallCNN,
    TinyViT,
    capture_layer_inputs,
)

SMALL = {
    MLP: {"widths": (16, 8)},
    SmallCNN: {"channels": (4, 8), "hidden": 16},
    ResNet18: {"width": 4},
    TinyViT: {"dim": 16, "depth": 1, "num_heads": 2, "mlp_ratio": 2},
}
FAMILIES = list(SMALL)
FEATURE_DIM = {MLP: 8, SmallCNN: 16, ResNet18: 32, TinyViT: 16}
SHAPES = {
    MLP: [(28, 28, 1), (8, 8, 1)],
    SmallCNN: [(28, 28, 1), (8, 8, 1)],
    ResNet18: [(28, 28, 1), (8, 8, 1), (32, 32, 3)],
    TinyViT: [(28, 28, 1), (8, 8, 1), (32, 32, 3)],
}
CASES = [(cls, shape) for cls, shapes in SHAPES.items() for shape in shapes]
IDS = [f"{cls.__name__}-{'x'.join(map(str, s))}" for cls, s in CASES]
TINY = (8, 8, 1)
TASK_IDS = jnp.array([2, 0, 1], jnp.int32)  # every head used, out of order


def materialize(abstract: nnx.Module, seed: int = 0) -> nnx.Module:
    """Fills an ``nnx.eval_shape`` model with numpy-drawn values, in place.

    Eager Flax init compiles a random-number program per distinct parameter shape (seconds
    each on a small CPU); numpy keeps the suite fast. Kernels get fan-in scaling, BatchNorm
    statistics their usual zeros/ones start, everything else small non-zero values so a
    wrong bias or scale is visible.
    """
    rng = np.random.default_rng(seed)
    for path, var in nnx.iter_graph(abstract):
        if not isinstance(var, nnx.Variable):
            continue
        shape, name = var.shape, path[-1]
        if isinstance(var, nnx.BatchStat):
            value = np.zeros(shape) if name == "mean" else np.ones(shape)
        elif name == "kernel":
            value = rng.standard_normal(shape) / math.sqrt(math.prod(shape[:-1]))
        elif name == "scale":
            value = 1.0 + 0.1 * rng.standard_normal(shape)
        else:
            value = 0.1 * rng.standard_normal(shape)
        var.value = jnp.asarray(value, var.dtype)
    return abstract


def images(shape, batch=3, seed=0):
    """Random float32 images ``(batch, *shape)`` drawn with numpy (no XLA compile)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal((batch, *shape)), jnp.float32)


def _build(cls, shape, num_classes=5, num_tasks=1, seed=0):
    return cls(
        shape, num_classes=num_classes, num_tasks=num_tasks, rngs=nnx.Rngs(seed), **SMALL[cls]
    )


@functools.cache
def _tiny(cls, num_tasks):
    """Shared 8x8 model; tests must not mutate it."""
    return materialize(nnx.eval_shape(lambda: _build(cls, TINY, num_tasks=num_tasks)))


def _forward_and_features(model, x, task_ids):
    return model(x, task_ids), model.features(x)


@pytest.mark.parametrize("cls, shape", CASES, ids=IDS)
@pytest.mark.parametrize("num_tasks", [1, 3])
def test_output_shapes(cls, shape, num_tasks):
    model = nnx.eval_shape(lambda: _build(cls, shape, num_tasks=num_tasks))
    assert model.input_shape == shape
    assert model.num_classes == 5 and model.num_tasks == num_tasks
    graphdef, state = nnx.split(model)
    x = jax.ShapeDtypeStruct((3, *shape), jnp.float32)
    task_ids = jax.ShapeDtypeStruct((3,), jnp.int32) if num_tasks > 1 else None
    logits, feats = jax.eval_shape(
        lambda s, x, t: _forward_and_features(nnx.merge(graphdef, s), x, t), state, x, task_ids
    )
    assert logits.shape == (3, 5) and logits.dtype == jnp.float32
    assert feats.shape == (3, FEATURE_DIM[cls])
    if num_tasks == 1:
        assert type(model.head) is nnx.Linear
    else:
        assert isinstance(model.head, MultiHeadLinear)
        assert model.head.kernel.shape == (3, FEATURE_DIM[cls], 5)


def _check_head_choice(model, logits, feats, task_ids):
    """Asserts ``logits`` equal head ``task_ids[b]`` applied to ``feats[b]``."""
    kernel, bias = np.asarray(model.head.kernel[...]), np.asarray(model.head.bias[...])
    feats = np.asarray(feats)
    if task_ids is None:
        expected = feats @ kernel + bias
    else:
        expected = np.stack(
            [f @ kernel[t] + bias[t] for f, t in zip(feats, task_ids.tolist(), strict=True)]
        )
        # Another head really gives different logits, so the choice is being tested.
        other = (int(task_ids[0]) + 1) % model.num_tasks
        assert not np.allclose(feats[0] @ kernel[other] + bias[other], expected[0], atol=1e-3)
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)


# ResNet18/TinyViT forwards are checked inside the (costlier) jitted gradient step below.
@pytest.mark.parametrize("cls", [MLP, SmallCNN], ids=lambda c: c.__name__)
@pytest.mark.parametrize("num_tasks", [1, 3])
def test_jit_split_merge_forward_applies_the_right_head(cls, num_tasks):
    model = _tiny(cls, num_tasks)
    x = images(TINY)
    task_ids = TASK_IDS if num_tasks > 1 else None
    graphdef, state = nnx.split(model)
    fwd = jax.jit(lambda s, x, t: _forward_and_features(nnx.merge(graphdef, s), x, t))
    logits, feats = fwd(state, x, task_ids)
    assert logits.shape == (3, 5) and feats.shape == (3, FEATURE_DIM[cls])
    _check_head_choice(model, logits, feats, task_ids)


@pytest.mark.parametrize("cls", FAMILIES, ids=lambda c: c.__name__)
def test_shape_mismatch_names_both_shapes(cls):
    model = _tiny(cls, 1)
    with pytest.raises(ValueError, match=r"\(8, 8, 1\)") as err:
        model(jnp.ones((2, 12, 12, 1)))
    assert "(2, 12, 12, 1)" in str(err.value)
    with pytest.raises(ValueError, match=r"\(2, 8, 8, 3\)"):
        model.features(jnp.ones((2, 8, 8, 3)))
    with pytest.raises(ValueError, match="x.shape"):
        model(jnp.ones((8, 8, 1)))


def test_shape_mismatch_fires_under_jit():
    graphdef, state = nnx.split(_tiny(MLP, 1))
    fwd = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
    with pytest.raises(ValueError, match=r"\(8, 8, 1\)"):
        fwd(state, jnp.ones((2, 4, 4, 1)))


@pytest.mark.parametrize("cls", FAMILIES, ids=lambda c: c.__name__)
def test_multi_head_requires_task_ids(cls):
    graphdef, state = nnx.split(_tiny(cls, 3))
    # Raised while tracing, before anything runs (eval_shape also keeps the model unmutated).
    with pytest.raises(ValueError, match="task_ids"):
        jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state, jnp.ones((2, 8, 8, 1)))


@pytest.mark.parametrize("cls", FAMILIES, ids=lambda c: c.__name__)
def test_jit_split_merge_step_gradients_are_finite(cls):
    model = _tiny(cls, 3)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    x = images(TINY, batch=4)
    y = jnp.array([0, 1, 2, 3])
    task_ids = jnp.array([0, 1, 1, 0], jnp.int32)  # head 2 unused

    @jax.jit
    def step(params, rest, x, y, task_ids):
        def loss_fn(params):
            # copy=True: fresh Variables at this trace level (BatchNorm mutates its stats).
            m = nnx.merge(graphdef, params, rest, copy=True)
            # One model(x, task_ids) call; the head's captured input is the features.
            logits, inputs = capture_layer_inputs(m, x, task_ids, layer_types=(MultiHeadLinear,))
            feats = inputs[("head",)]
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return loss, (nnx.state(m, nnx.Not(nnx.Param)), logits, feats)

        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return loss, grads, aux

    loss, grads, (new_rest, logits, feats) = step(params, rest, x, y, task_ids)
    assert logits.shape == (4, 5) and feats.shape == (4, FEATURE_DIM[cls])
    _check_head_choice(model, logits, feats, task_ids)
    assert np.isfinite(loss)
    leaves = jax.tree.leaves(grads)
    assert len(leaves) == len(jax.tree.leaves(params))
    assert all(np.all(np.isfinite(g)) for g in leaves)
    for path, g in nnx.to_flat_state(grads):
        if path[-1] == "kernel":  # every layer's kernel receives gradient signal
            assert np.any(np.asarray(g[...]) != 0), path
    # Heads 0 and 1 get gradient; the unused head 2 gets exactly none.
    head_grad = np.asarray(grads["head"]["kernel"][...])
    assert np.any(head_grad[0] != 0) and np.any(head_grad[1] != 0)
    np.testing.assert_array_equal(head_grad[2], 0.0)
    if cls is ResNet18:  # train-mode BatchNorm statistics came back updated
        assert not np.allclose(new_rest["bn1"]["mean"][...], rest["bn1"]["mean"][...])


def test_real_init_is_deterministic_given_rngs():
    x = images(TINY)
    a = _build(MLP, TINY, seed=1)
    b = _build(MLP, TINY, seed=1)
    c = _build(MLP, TINY, seed=2)
    np.testing.assert_array_equal(a(x), b(x))
    assert not np.allclose(a(x), c(x))
    np.testing.assert_array_equal(a.head.bias[...], 0.0)  # Flax default bias init


def test_mlp_layer_paths_and_math():
    model = _tiny(MLP, 1)
    paths = {p for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert paths == {
        (name, *idx, leaf)
        for name, idx in [("layers", (0,)), ("layers", (1,)), ("head", ())]
        for leaf in ("kernel", "bias")
    }
    assert all(type(layer) is nnx.Linear for layer in model.layers)
    x = images(TINY)
    h = x.reshape(3, -1)
    for layer in model.layers:
        h = jnp.maximum(h @ layer.kernel[...] + layer.bias[...], 0.0)
    np.testing.assert_allclose(model.features(x), h, rtol=1e-5, atol=1e-5)


def test_mlp_without_hidden_layers_is_linear_on_pixels():
    model = nnx.eval_shape(lambda: MLP(TINY, num_classes=3, widths=(), rngs=nnx.Rngs(0)))
    assert len(model.layers) == 0 and model.feature_dim == 64


def test_cnn_pools_only_while_spatial_at_least_two():
    model = nnx.eval_shape(
        lambda: SmallCNN((4, 4, 1), num_classes=2, channels=(2, 2, 2), hidden=4, rngs=nnx.Rngs(0))
    )
    assert model.pools == (True, True, False)
    assert model.fc.in_features == 2  # 1x1 spatial x 2 channels
    assert _tiny(SmallCNN, 1).fc.in_features == 2 * 2 * 8
    big = nnx.eval_shape(lambda: _build(SmallCNN, (28, 28, 1)))
    assert big.fc.in_features == 7 * 7 * 8


def test_vit_token_layout():
    model = _tiny(TinyViT, 1)
    assert model.num_patches == 4
    assert model.pos_embed.shape == (1, 5, 16) and model.cls_token.shape == (1, 1, 16)
    assert model.patch_embed.kernel.shape == (4, 4, 1, 16)


def test_resnet_reduced_layout():
    model = nnx.eval_shape(lambda: ResNet18((32, 32, 3), num_classes=10, rngs=nnx.Rngs(0)))
    assert model.feature_dim == 160  # 8 * nf with the papers' nf=20
    assert [len(stage) for stage in model.stages] == [2, 2, 2, 2]
    assert model.conv1.kernel.shape == (3, 3, 3, 20) and model.conv1.strides == 1
    assert model.conv1.bias is None
    assert model.stages[0][0].shortcut_conv is None
    assert model.stages[1][0].shortcut_conv.kernel.shape == (1, 1, 20, 40)
    n_params = sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    # GEM's reduced ResNet-18 has about 1.1M parameters.
    assert 1.0e6 < n_params < 1.2e6


@pytest.mark.parametrize(
    "cls, kwargs, arg",
    [
        (MLP, {"num_classes": 0}, "num_classes"),
        (MLP, {"num_classes": 2, "num_tasks": 0}, "num_tasks"),
        (MLP, {"num_classes": 2, "widths": (4, -1)}, "widths"),
        (SmallCNN, {"num_classes": 2, "channels": ()}, "channels"),
        (SmallCNN, {"num_classes": 2, "hidden": 0}, "hidden"),
        (ResNet18, {"num_classes": 2, "width": 0}, "width"),
        (TinyViT, {"num_classes": 2, "patch_size": 3}, "patch_size"),
        (TinyViT, {"num_classes": 2, "dim": 10, "num_heads": 4}, "num_heads"),
        (TinyViT, {"num_classes": 2, "depth": 0}, "depth"),
    ],
)
def test_constructor_rejects_bad_arguments(cls, kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        cls(TINY, rngs=nnx.Rngs(0), **kwargs)


@pytest.mark.parametrize("shape", [(8, 8), (8, 8, 1, 1), (8, 0, 1)])
def test_constructor_rejects_bad_input_shape(shape):
    with pytest.raises(ValueError, match="input_shape"):
        MLP(shape, num_classes=2, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("shape", ["881", (8, 8.0, 1), 8, (8, 8, True)])
def test_constructor_rejects_input_shape_of_the_wrong_type(shape):
    with pytest.raises(TypeError, match=r"input_shape must be three positive ints \(H, W, C\)"):
        MLP(shape, num_classes=2, rngs=nnx.Rngs(0))


@pytest.mark.parametrize(
    "cls, kwargs, match",
    [
        (MLP, {"num_classes": 2.0}, r"num_classes must be a positive int, got 2.0 \(float\)"),
        (MLP, {"num_classes": 2, "widths": (4, "8")}, "widths must be a sequence of positive ints"),
        (SmallCNN, {"num_classes": 2, "hidden": True}, "hidden must be a positive int"),
    ],
)
def test_constructor_rejects_arguments_of_the_wrong_type(cls, kwargs, match):
    with pytest.raises(TypeError, match=match):
        cls(TINY, rngs=nnx.Rngs(0), **kwargs)
