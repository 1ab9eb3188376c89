"""Classification heads: a single linear head or one linear head per task."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from clax.models._checks import check_positive_int

# Per-head LeCun-normal init: batch_axis=0 keeps the task axis out of fan-in, so every head
# starts like a standalone `nnx.Linear(D, C)`.
_multi_head_kernel_init = nnx.initializers.variance_scaling(
    1.0, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1, batch_axis=(0,)
)


class MultiHeadLinear(nnx.Module):
    """Task-incremental head: one `Linear(in_features, out_features)` per task.

    Parameters are stacked over tasks: ``kernel`` has shape ``(T, D, C)`` and ``bias`` shape
    ``(T, C)``. Example ``b`` gets ``x[b] @ kernel[task_ids[b]] + bias[task_ids[b]]``.

    Attributes:
        in_features: Input feature size ``D``.
        out_features: Number of outputs per head ``C``.
        num_tasks: Number of heads ``T``.
        kernel: ``nnx.Param`` of shape ``(T, D, C)``.
        bias: ``nnx.Param`` of shape ``(T, C)``.
    """

    def __init__(self, in_features: int, out_features: int, num_tasks: int, *, rngs: nnx.Rngs):
        """Builds the stacked heads.

        Args:
            in_features: Input feature size ``D``.
            out_features: Outputs per head ``C``.
            num_tasks: Number of heads ``T``.
            rngs: Random streams; ``rngs.params`` initialises the kernel.

        Raises:
            ValueError: If a size is not a positive int.
        """
        self.in_features = check_positive_int("in_features", in_features)
        self.out_features = check_positive_int("out_features", out_features)
        self.num_tasks = check_positive_int("num_tasks", num_tasks)
        self.kernel = nnx.Param(
            _multi_head_kernel_init(rngs.params(), (num_tasks, in_features, out_features))
        )
        self.bias = nnx.Param(jnp.zeros((num_tasks, out_features), jnp.float32))

    def __call__(self, x: jax.Array, task_ids: jax.Array | None) -> jax.Array:
        """Applies head ``task_ids[b]`` to row ``b`` of ``x``.

        Task ids outside ``[0, num_tasks)`` cannot be checked on traced values; they are
        clipped to the valid range (``jnp.take(mode="clip")``) rather than producing NaNs.

        Args:
            x: Features of shape ``(B, D)``.
            task_ids: Integer task ids of shape ``(B,)``.

        Returns:
            Logits of shape ``(B, C)``.

        Raises:
            ValueError: If ``task_ids`` is None, not integer, or not shaped ``(B,)``, or if
                ``x`` is not ``(B, D)``.
        """
        if x.ndim != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"x must have shape (B, {self.in_features}), got {tuple(x.shape)}")
        if task_ids is None:
            raise ValueError(
                f"task_ids is required for a multi-head model (num_tasks={self.num_tasks}); "
                "pass an int array of shape (B,)"
            )
        task_ids = jnp.asarray(task_ids)
        if task_ids.shape != (x.shape[0],):
            raise ValueError(
                f"task_ids must have shape ({x.shape[0]},) to match the batch, "
                f"got {tuple(task_ids.shape)}"
            )
        if not jnp.issubdtype(task_ids.dtype, jnp.integer):
            raise ValueError(f"task_ids must be an integer array, got dtype {task_ids.dtype}")
        # Gather each example's head (B, D, C); cheaper than evaluating all T heads.
        kernel = jnp.take(self.kernel[...], task_ids, axis=0, mode="clip")
        bias = jnp.take(self.bias[...], task_ids, axis=0, mode="clip")
        return jnp.einsum("bd,bdc->bc", x, kernel) + bias


def make_head(
    in_features: int, num_classes: int, num_tasks: int, *, rngs: nnx.Rngs
) -> nnx.Linear | MultiHeadLinear:
    """Returns ``nnx.Linear`` for one task, ``MultiHeadLinear`` for several."""
    num_tasks = check_positive_int("num_tasks", num_tasks)
    if num_tasks == 1:
        return nnx.Linear(in_features, num_classes, rngs=rngs)
    return MultiHeadLinear(in_features, num_classes, num_tasks, rngs=rngs)


def apply_head(
    head: nnx.Module, features: jax.Array, task_ids: jax.Array | None = None
) -> jax.Array:
    """Calls ``head`` on ``features``; ``task_ids`` is ignored by a single head."""
    if isinstance(head, MultiHeadLinear):
        return head(features, task_ids)
    return head(features)
