"""Reduced ResNet-18 as used by GEM, A-GEM and GPM on CIFAR-100 / miniImageNet."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from clax.models._checks import check_input_shape_arg, check_positive_int
from clax.models.base import Classifier

# PyTorch BatchNorm momentum 0.1 (weight on the new batch) equals Flax momentum 0.9 (weight on
# the running average); matching the PyTorch reference implementations of these papers.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


def _conv3x3(c_in: int, c_out: int, stride: int, rngs: nnx.Rngs) -> nnx.Conv:
    # Symmetric padding 1 (not "SAME") to match PyTorch's conv3x3 exactly at stride 2.
    return nnx.Conv(
        c_in, c_out, kernel_size=(3, 3), strides=stride, padding=1, use_bias=False, rngs=rngs
    )


def _batch_norm(features: int, rngs: nnx.Rngs) -> nnx.BatchNorm:
    return nnx.BatchNorm(features, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, rngs=rngs)


class BasicBlock(nnx.Module):
    """Two 3x3 conv + BatchNorm layers with an identity or 1x1-conv shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int, *, rngs: nnx.Rngs):
        self.conv1 = _conv3x3(c_in, c_out, stride, rngs)
        self.bn1 = _batch_norm(c_out, rngs)
        self.conv2 = _conv3x3(c_out, c_out, 1, rngs)
        self.bn2 = _batch_norm(c_out, rngs)
        if stride != 1 or c_in != c_out:
            self.shortcut_conv = nnx.Conv(
                c_in,
                c_out,
                kernel_size=(1, 1),
                strides=stride,
                padding=0,
                use_bias=False,
                rngs=rngs,
            )
            self.shortcut_bn = _batch_norm(c_out, rngs)
        else:
            self.shortcut_conv = None
            self.shortcut_bn = None

    def __call__(self, x: jax.Array) -> jax.Array:
        """Maps ``(B, H, W, C_in)`` to ``(B, H / stride, W / stride, C_out)``."""
        out = nnx.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.shortcut_conv is None else self.shortcut_bn(self.shortcut_conv(x))
        return nnx.relu(out + shortcut)


class ResNet18(Classifier):
    """CIFAR-style reduced ResNet-18 (Lopez-Paz & Ranzato, 2017; GEM/A-GEM/GPM).

    3x3 stride-1 stem with ``width`` filters, four stages of two BasicBlocks with
    ``width * (1, 2, 4, 8)`` channels (strides 1, 2, 2, 2), global average pool, head. The
    feature size is ``8 * width`` (160 for the paper's ``width=20``). Convs have no bias.

    BatchNorm (momentum 0.9, i.e. PyTorch's 0.1) starts in training mode: batch statistics
    normalise and running averages are updated, so a jitted training step must return the
    updated ``nnx.BatchStat`` state. ``model.eval()`` switches to running averages,
    ``model.train()`` back.

    Parameter paths: ``conv1/kernel``, ``bn1/scale``, ``stages/0/0/conv1/kernel``,
    ``stages/1/0/shortcut_conv/kernel``, ``stages/3/1/bn2/bias``, ``head/kernel``;
    running statistics live at e.g. ``bn1/mean`` and ``bn1/var`` (``nnx.BatchStat``).
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        *,
        num_classes: int,
        width: int = 20,
        num_tasks: int = 1,
        rngs: nnx.Rngs,
    ):
        """Builds the network.

        Args:
            input_shape: Image shape ``(H, W, C)``.
            num_classes: Logits per example.
            width: Stem filters ``nf`` (20 in the papers, 64 in the full ResNet-18).
            num_tasks: Heads; ``> 1`` gives a multi-head (task-incremental) model.
            rngs: Random streams for initialisation.

        Raises:
            ValueError: On a malformed argument.
        """
        input_shape = check_input_shape_arg(input_shape)
        num_classes = check_positive_int("num_classes", num_classes)
        num_tasks = check_positive_int("num_tasks", num_tasks)
        self.width = check_positive_int("width", width)
        c_in = input_shape[2]
        self.conv1 = _conv3x3(c_in, width, 1, rngs)
        self.bn1 = _batch_norm(width, rngs)
        stages, c_in = [], width
        for mult, stride in zip((1, 2, 4, 8), (1, 2, 2, 2), strict=True):
            c_out = width * mult
            blocks = [
                BasicBlock(c_in, c_out, stride, rngs=rngs),
                BasicBlock(c_out, c_out, 1, rngs=rngs),
            ]
            stages.append(nnx.List(blocks))
            c_in = c_out
        self.stages = nnx.List(stages)
        self._init_classifier(input_shape, num_classes, num_tasks, c_in, rngs)

    def _features(self, x: jax.Array) -> jax.Array:
        h = nnx.relu(self.bn1(self.conv1(x)))
        for stage in self.stages:
            for block in stage:
                h = block(h)
        return jnp.mean(h, axis=(1, 2))
