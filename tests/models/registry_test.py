"""Tests for clax.models.registry."""

import numpy as np
import pytest
from flax import nnx

from clax.models import (
    MLP,
    MODELS,
    EfficientNetLite0,
    LlamaLM,
    ResNet18,
    SmallCNN,
    TinyCausalLM,
    TinyViT,
    ViT,
    make_model,
    model_kwargs,
)
from tests.models.models_test import images


def test_registry_contents():
    assert MODELS == {"mlp": MLP, "cnn": SmallCNN, "resnet18": ResNet18, "vit": TinyViT,
                      "causal_lm": TinyCausalLM, "llama": LlamaLM, "vit_b16": ViT,
                      "efficientnet_lite0": EfficientNetLite0}


def test_model_kwargs():
    assert model_kwargs("mlp") == ("widths",)
    assert model_kwargs("cnn") == ("channels", "hidden")
    assert model_kwargs("resnet18") == ("width",)
    assert model_kwargs("vit") == ("patch_size", "dim", "depth", "num_heads", "mlp_ratio")
    assert model_kwargs("causal_lm") == ("dim", "depth", "num_heads", "mlp_ratio")


@pytest.mark.parametrize("name", [n for n in MODELS if n not in ("causal_lm", "llama")])
def test_make_model_defaults(name):
    model = nnx.eval_shape(lambda: make_model(name, input_shape=(32, 32, 3), num_classes=7))
    assert type(model) is MODELS[name]
    assert model.input_shape == (32, 32, 3) and model.num_classes == 7 and model.num_tasks == 1


def test_causal_lm_maps_tokens_to_next_token_logits_causally():
    model = make_model("causal_lm", input_shape=(6,), num_classes=11, dim=8, depth=1,
                       num_heads=2, seed=0)
    assert (model.input_shape, model.num_classes, model.num_tasks) == ((6,), 11, 1)
    tokens = np.arange(12, dtype=np.int32).reshape(2, 6) % 11
    logits = model(tokens)
    assert logits.shape == (2, 6, 11) and model(tokens[:, :4]).shape == (2, 4, 11)
    changed = tokens.copy()
    changed[:, 4] = (changed[:, 4] + 1) % 11  # a later token cannot change earlier logits
    np.testing.assert_allclose(model(changed)[:, :4], logits[:, :4], rtol=1e-6, atol=1e-6)
    assert not np.allclose(model(changed)[:, 4], logits[:, 4])
    with pytest.raises(ValueError, match="L <= max_len=6"):
        model(np.zeros((1, 7), np.int32))


def test_make_model_forwards_kwargs():
    model = nnx.eval_shape(lambda: make_model("mlp", input_shape=(8, 8, 1), num_classes=3))
    assert model.widths == (256, 256)
    small = nnx.eval_shape(
        lambda: make_model("mlp", input_shape=[8, 8, 1], num_classes=3, num_tasks=2, widths=(5,))
    )
    assert small.input_shape == (8, 8, 1) and small.widths == (5,)
    assert small.head.kernel.shape == (2, 5, 3)


def test_make_model_seed():
    x = images((8, 8, 1))
    kwargs = {"input_shape": (8, 8, 1), "num_classes": 5, "widths": (16, 8)}
    a = make_model("mlp", seed=3, **kwargs)(x)
    b = make_model("mlp", seed=3, **kwargs)(x)
    c = make_model("mlp", seed=4, **kwargs)(x)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_unknown_name_lists_choices():
    with pytest.raises(ValueError, match="resnet50") as err:
        make_model("resnet50", input_shape=(8, 8, 1), num_classes=3)
    for name in MODELS:
        assert name in str(err.value)
    with pytest.raises(ValueError, match="valid choices"):
        model_kwargs("resnet50")


def test_unknown_kwarg_lists_valid_kwargs():
    with pytest.raises(ValueError, match="depth") as err:
        make_model("mlp", input_shape=(8, 8, 1), num_classes=3, depth=3)
    assert "widths" in str(err.value)
    with pytest.raises(ValueError, match="rngs"):
        make_model("vit", input_shape=(8, 8, 1), num_classes=3, rngs=nnx.Rngs(0))


def test_bad_values_and_seed():
    with pytest.raises(ValueError, match="num_classes"):
        make_model("resnet18", input_shape=(8, 8, 1), num_classes=0)
    with pytest.raises(ValueError, match="seed"):
        make_model("mlp", input_shape=(8, 8, 1), num_classes=3, seed="0")
