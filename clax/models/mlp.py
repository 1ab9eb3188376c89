"""Multi-layer perceptron on flattened images."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import jax
from flax import nnx

from clax.models._checks import check_input_shape_arg, check_int_sequence, check_positive_int
from clax.models.base import Classifier


def _named_linear(d_in: int, d_out: int, index: int, rngs: nnx.Rngs) -> nnx.Linear:
    out_name = "mlp" if index % 2 == 0 else "embed"
    in_name = None if index == 0 else ("mlp" if out_name == "embed" else "embed")
    kernel = nnx.with_partitioning(nnx.initializers.lecun_normal(), (in_name, out_name),
                                   eager_sharding=False)
    bias = nnx.with_partitioning(nnx.initializers.zeros_init(), (out_name,),
                                 eager_sharding=False)
    return nnx.Linear(d_in, d_out, kernel_init=kernel, bias_init=bias, rngs=rngs)


class MLP(Classifier):
    """Flatten, then ``Linear + ReLU`` per entry of ``widths``, then the head.

    Parameter paths: ``layers/0/kernel``, ``layers/1/kernel``, ..., ``head/kernel``.

    Hidden kernels carry logical axis names for tensor parallelism in the Megatron layout
    (`clax.training.sharding`): layer 0 splits its outputs (``"mlp"``), layer 1 its inputs,
    and so on alternately, so consecutive layers need no gather between them. The
    flattened input and the head are unnamed (FSDP-split where they divide).
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        *,
        num_classes: int,
        widths: Sequence[int] = (256, 256),
        num_tasks: int = 1,
        rngs: nnx.Rngs,
    ):
        """Builds the MLP.

        Args:
            input_shape: Image shape ``(H, W, C)``.
            num_classes: Logits per example.
            widths: Hidden layer sizes; may be empty (a linear model on pixels).
            num_tasks: Heads; ``> 1`` gives a multi-head (task-incremental) model.
            rngs: Random streams for initialisation.

        Raises:
            ValueError: On a malformed argument.
        """
        input_shape = check_input_shape_arg(input_shape)
        num_classes = check_positive_int("num_classes", num_classes)
        num_tasks = check_positive_int("num_tasks", num_tasks)
        self.widths = check_int_sequence("widths", widths, allow_empty=True)
        sizes = (math.prod(input_shape), *self.widths)
        # nnx.List keeps integer path keys (layers/0/kernel), so depth is readable from paths.
        self.layers = nnx.List(
            [_named_linear(d_in, d_out, i, rngs)
             for i, (d_in, d_out) in enumerate(itertools.pairwise(sizes))]
        )
        self._init_classifier(input_shape, num_classes, num_tasks, sizes[-1], rngs)

    def _features(self, x: jax.Array) -> jax.Array:
        h = x.reshape(x.shape[0], -1)
        for layer in self.layers:
            h = nnx.relu(layer(h))
        return h
