"""Small convolutional network for MNIST-sized (28x28) and tiny (8x8) images."""

from __future__ import annotations

from collections.abc import Sequence

import jax
from flax import nnx

from clax.models._checks import check_input_shape_arg, check_int_sequence, check_positive_int
from clax.models.base import Classifier


class SmallCNN(Classifier):
    """Per stage: 3x3 SAME conv + ReLU + 2x2 max-pool; then ``Linear(hidden)`` + ReLU; head.

    A stage pools only while both spatial dims are >= 2, so tiny inputs never shrink to
    zero (28x28 -> 14 -> 7; 8x8 -> 4 -> 2). Pooling uses VALID windows (odd sizes floor).

    Parameter paths: ``convs/0/kernel``, ``convs/1/kernel``, ``fc/kernel``, ``head/kernel``.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        *,
        num_classes: int,
        channels: Sequence[int] = (32, 64),
        hidden: int = 128,
        num_tasks: int = 1,
        rngs: nnx.Rngs,
    ):
        """Builds the CNN.

        Args:
            input_shape: Image shape ``(H, W, C)``.
            num_classes: Logits per example.
            channels: Output channels of each conv stage.
            hidden: Width of the dense layer before the head (the feature size).
            num_tasks: Heads; ``> 1`` gives a multi-head (task-incremental) model.
            rngs: Random streams for initialisation.

        Raises:
            ValueError: On a malformed argument.
        """
        input_shape = check_input_shape_arg(input_shape)
        num_classes = check_positive_int("num_classes", num_classes)
        num_tasks = check_positive_int("num_tasks", num_tasks)
        self.channels = check_int_sequence("channels", channels)
        self.hidden = check_positive_int("hidden", hidden)
        h, w, c_in = input_shape
        convs, pools = [], []
        for c_out in self.channels:
            convs.append(nnx.Conv(c_in, c_out, kernel_size=(3, 3), padding="SAME", rngs=rngs))
            pool = h >= 2 and w >= 2
            pools.append(pool)
            if pool:
                h, w = h // 2, w // 2
            c_in = c_out
        self.convs = nnx.List(convs)
        # Static per-stage decision, fixed by input_shape at construction.
        self.pools = tuple(pools)
        self.fc = nnx.Linear(h * w * c_in, self.hidden, rngs=rngs)
        self._init_classifier(input_shape, num_classes, num_tasks, self.hidden, rngs)

    def _features(self, x: jax.Array) -> jax.Array:
        h = x
        for conv, pool in zip(self.convs, self.pools, strict=True):
            h = nnx.relu(conv(h))
            if pool:
                h = nnx.max_pool(h, window_shape=(2, 2), strides=(2, 2), padding="VALID")
        h = h.reshape(h.shape[0], -1)
        return nnx.relu(self.fc(h))
