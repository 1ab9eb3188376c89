"""Tests for clax.models.capture."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from clax.models import (
    MLP,
    MultiHeadLinear,
    ResNet18,
    SmallCNN,
    TinyViT,
    capture_layer_inputs,
    conv_patches,
)
from tests.models.models_test import images, materialize

ORIGINAL_CALLS = {cls: cls.__dict__["__call__"] for cls in (nnx.Linear, nnx.Conv, MultiHeadLinear)}


def _assert_restored():
    for cls, original in ORIGINAL_CALLS.items():
        assert cls.__dict__["__call__"] is original, cls


def _make(build, seed=0):
    return materialize(nnx.eval_shape(build), seed)


def _mlp(num_tasks=1):
    return _make(
        lambda: MLP((8, 8, 1), num_classes=5, widths=(16, 8), num_tasks=num_tasks, rngs=nnx.Rngs(0))
    )


def _cnn(num_tasks=1):
    return _make(
        lambda: SmallCNN(
            (8, 8, 1),
            num_classes=5,
            channels=(4, 8),
            hidden=16,
            num_tasks=num_tasks,
            rngs=nnx.Rngs(0),
        )
    )


def _kernel_prefixes(model):
    return {
        path[:-1]
        for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))
        if path[-1] == "kernel"
    }


def test_mlp_captured_inputs_match_hand_computation():
    model = _mlp()
    x = images((8, 8, 1))
    logits, inputs = capture_layer_inputs(model, x)
    np.testing.assert_array_equal(logits, model(x))
    flat = x.reshape(3, -1)
    layer0 = model.layers[0]
    hidden0 = jnp.maximum(flat @ layer0.kernel[...] + layer0.bias[...], 0.0)
    np.testing.assert_allclose(inputs[("layers", 0)], flat, rtol=1e-6)
    np.testing.assert_allclose(inputs[("layers", 1)], hidden0, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(inputs[("head",)], model.features(x), rtol=1e-5, atol=1e-6)
    # Keys index the parameter state directly.
    params = nnx.state(model, nnx.Param)
    assert params["layers"][1]["kernel"].shape == (16, 8)
    assert list(inputs) == [("layers", 0), ("layers", 1), ("head",)]  # first-call order
    _assert_restored()


@pytest.mark.parametrize(
    "build",
    [
        lambda: MLP((8, 8, 1), num_classes=3, widths=(8,), num_tasks=2, rngs=nnx.Rngs(0)),
        lambda: SmallCNN((8, 8, 1), num_classes=3, channels=(4,), hidden=8, rngs=nnx.Rngs(0)),
        lambda: ResNet18((32, 32, 3), num_classes=3, width=4, rngs=nnx.Rngs(0)),
        lambda: TinyViT(
            (8, 8, 1), num_classes=3, dim=8, depth=2, num_heads=2, num_tasks=2, rngs=nnx.Rngs(0)
        ),
    ],
    ids=["mlp-multihead", "cnn", "resnet18", "vit-multihead"],
)
def test_keys_are_exactly_the_kernel_param_paths(build):
    # Abstract model + jax.eval_shape: exercises capture under tracing without compiling.
    model = nnx.eval_shape(build)
    graphdef, state = nnx.split(model)
    h, w, c = model.input_shape
    x = jax.ShapeDtypeStruct((3, h, w, c), jnp.float32)
    task_ids = jax.ShapeDtypeStruct((3,), jnp.int32) if model.num_tasks > 1 else None
    logits, inputs = jax.eval_shape(
        lambda s, x, t: capture_layer_inputs(nnx.merge(graphdef, s), x, t), state, x, task_ids
    )
    _assert_restored()
    assert logits.shape == (3, 3)
    assert set(inputs) == _kernel_prefixes(model)
    params = nnx.state(model, nnx.Param)
    for path, value in inputs.items():
        node = params
        for key in path:
            node = node[key]
        kernel = node["kernel"]
        assert value.shape[0] == 3
        # The input's last axis feeds the kernel's input axis: (kh, kw, C_in, C_out) for a
        # conv, (D, C) for a Linear, (T, D, C) for MultiHeadLinear.
        assert value.shape[-1] == kernel.shape[2 if kernel.ndim == 4 else -2], path


def test_capture_only_requested_types():
    model = _cnn()
    x = images((8, 8, 1))
    _, inputs = capture_layer_inputs(model, x, layer_types=(nnx.Conv,))
    assert set(inputs) == {("convs", 0), ("convs", 1)}
    np.testing.assert_array_equal(inputs[("convs", 0)], x)
    assert inputs[("convs", 1)].shape == (3, 4, 4, 4)  # after the first 2x2 pool
    _, inputs = capture_layer_inputs(model, x, layer_types=MultiHeadLinear)
    assert inputs == {}  # single-head model: nothing of that type


def test_capture_under_jit_with_split_merge():
    model = _cnn(num_tasks=3)
    x = images((8, 8, 1))
    task_ids = jnp.array([2, 0, 1], jnp.int32)
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, x, task_ids):
        return capture_layer_inputs(nnx.merge(graphdef, state), x, task_ids)

    logits, inputs = run(state, x, task_ids)
    _assert_restored()
    assert set(inputs) == {("convs", 0), ("convs", 1), ("fc",), ("head",)}
    assert all(isinstance(v, jax.Array) for v in inputs.values())
    np.testing.assert_array_equal(inputs[("convs", 0)], x)
    feats = jax.jit(lambda s, x: nnx.merge(graphdef, s).features(x))(state, x)
    np.testing.assert_allclose(inputs[("head",)], feats, rtol=1e-5, atol=1e-6)
    kernel, bias = model.head.kernel[...], model.head.bias[...]
    expected = jnp.stack([feats[b] @ kernel[t] + bias[t] for b, t in enumerate([2, 0, 1])])
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-5)


def test_capture_under_nnx_jit():
    model = _mlp()
    x = images((8, 8, 1))
    _, eager = capture_layer_inputs(model, x)
    _, jitted = nnx.jit(capture_layer_inputs)(model, x)
    _assert_restored()
    assert set(jitted) == set(eager)
    for key in eager:
        np.testing.assert_allclose(jitted[key], eager[key], rtol=1e-5, atol=1e-6)


class _Reuse(nnx.Module):
    """Calls the same Linear twice, then a subclass that defers to super().__call__."""

    class Scaled(nnx.Linear):
        def __call__(self, inputs):
            return 2.0 * super().__call__(inputs)

    def __init__(self):
        self.shared = nnx.Linear(4, 4, rngs=nnx.Rngs(0))
        self.scaled = self.Scaled(4, 2, rngs=nnx.Rngs(0))

    def __call__(self, x):
        return self.scaled(self.shared(self.shared(x)))


def test_repeated_calls_concatenate_and_subclasses_record_once():
    model = _make(_Reuse)
    x = jnp.arange(8.0).reshape(2, 4)
    out, inputs = capture_layer_inputs(model, x)
    first = model.shared(x)
    np.testing.assert_allclose(inputs[("shared",)], jnp.concatenate([x, first]), rtol=1e-6)
    assert inputs[("scaled",)].shape == (2, 4)  # once, not again via super()
    np.testing.assert_allclose(inputs[("scaled",)], model.shared(first), rtol=1e-6)
    np.testing.assert_allclose(out, model(x), rtol=1e-6)
    assert "__call__" in _Reuse.Scaled.__dict__
    _assert_restored()


def test_layers_outside_the_model_are_not_recorded():
    outside = _make(lambda: nnx.Linear(4, 4, rngs=nnx.Rngs(1)))

    class Uses(nnx.Module):
        def __init__(self):
            self.inner = nnx.Linear(4, 4, rngs=nnx.Rngs(0))

        def __call__(self, x):
            return outside(self.inner(x))

    _, inputs = capture_layer_inputs(_make(Uses), jnp.ones((2, 4)))
    assert set(inputs) == {("inner",)}


def test_originals_restored_after_exception():
    class Boom(nnx.Module):
        def __init__(self):
            self.layer = nnx.Linear(4, 4, rngs=nnx.Rngs(0))

        def __call__(self, x):
            self.layer(x)
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        capture_layer_inputs(_make(Boom), jnp.ones((2, 4)))
    _assert_restored()
    with pytest.raises(ValueError, match=r"\(8, 8, 1\)"):
        capture_layer_inputs(_mlp(), jnp.ones((2, 4, 4, 1)))
    _assert_restored()


def test_capture_rejects_bad_layer_types():
    model = _mlp()
    with pytest.raises(ValueError, match="layer_types"):
        capture_layer_inputs(model, images((8, 8, 1)), layer_types=())
    with pytest.raises(ValueError, match="layer_types"):
        capture_layer_inputs(model, images((8, 8, 1)), layer_types=(int,))


@pytest.mark.parametrize(
    "kernel_size, strides, padding",
    [
        ((3, 3), 1, "SAME"),
        ((3, 3), 2, "SAME"),
        ((3, 3), 1, "VALID"),
        ((3, 3), 2, "VALID"),
        ((3, 3), 2, 1),
        ((2, 3), 2, "SAME"),
        ((2, 3), 1, ((0, 1), (2, 0))),
    ],
)
def test_conv_patches_reconstruct_conv(kernel_size, strides, padding):
    c_in, c_out = 3, 5
    conv = _make(
        lambda: nnx.Conv(
            c_in,
            c_out,
            kernel_size=kernel_size,
            strides=strides,
            padding=padding,
            use_bias=False,
            rngs=nnx.Rngs(0),
        )
    )
    x = images((7, 6, c_in), batch=2)  # odd/even sizes exercise asymmetric SAME padding
    expected = conv(x)
    patches = conv_patches(x, kernel_size, strides=strides, padding=padding)
    assert patches.shape == (*expected.shape[:3], kernel_size[0] * kernel_size[1] * c_in)
    got = patches @ conv.kernel[...].reshape(-1, c_out)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_conv_patches_feature_order_is_kh_kw_c():
    x = jnp.arange(2 * 3 * 3 * 2, dtype=jnp.float32).reshape(2, 3, 3, 2)
    patches = conv_patches(x, 3, padding="VALID")
    assert patches.shape == (2, 1, 1, 18)
    np.testing.assert_array_equal(patches[:, 0, 0], x.reshape(2, 18))


def test_conv_patches_on_captured_strided_conv_input():
    class Net(nnx.Module):
        def __init__(self):
            self.stem = nnx.Conv(1, 3, kernel_size=(3, 3), rngs=nnx.Rngs(0))
            # ResNet-style downsampling conv: stride 2, symmetric padding 1, no bias.
            self.down = nnx.Conv(
                3, 4, kernel_size=(3, 3), strides=2, padding=1, use_bias=False, rngs=nnx.Rngs(0)
            )

        def __call__(self, x):
            return self.down(nnx.relu(self.stem(x)))

    model = _make(Net)
    out, inputs = capture_layer_inputs(model, images((8, 8, 1)))
    down_in = inputs[("down",)]
    assert down_in.shape == (3, 8, 8, 3)
    patches = conv_patches(down_in, 3, strides=2, padding=1)
    got = patches @ model.down.kernel[...].reshape(-1, 4)
    np.testing.assert_allclose(got, out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"kernel_size": 0}, "kernel_size"),
        ({"kernel_size": (3, 3, 3)}, "kernel_size"),
        ({"kernel_size": 3, "strides": 0}, "strides"),
        ({"kernel_size": 3, "padding": "FULL"}, "padding"),
        ({"kernel_size": 3, "padding": ((1, 1),)}, "padding"),
    ],
)
def test_conv_patches_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        conv_patches(jnp.ones((1, 4, 4, 1)), **kwargs)


def test_conv_patches_rejects_bad_rank():
    with pytest.raises(ValueError, match="x must"):
        conv_patches(jnp.ones((4, 4, 1)), 3)
