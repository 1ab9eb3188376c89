"""Examples, batches and task data: what flows through the training step.

An example is any pytree; clax groups it as ``Batch(x, y, task_ids)``:

* ``x``: the model's inputs (an array or any pytree with a leading batch axis): images
  ``(B, H, W, C)``, token ids ``(B, L)``, ...
* ``y``: the targets the objective reads (an array or pytree): class ids ``(B,)`` for
  `clax.core.Classification`, next-token targets ``(B, L)`` (negative = no loss) for
  `clax.core.LanguageModeling`.
* ``task_ids``: int32 ``(B,)``, the task each example came from (heads, logit masks,
  per-task replay).

Every leaf of a batch shares the leading batch axis.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import numpy as np

from clax.typing import PyTree


class Batch(NamedTuple):
    """One training or evaluation batch (global, possibly sharded over devices)."""

    x: PyTree  # model inputs, leading batch axis
    y: PyTree  # targets read by the objective, leading batch axis
    task_ids: jax.Array  # int32 (B,), the task each example came from


class TrainArrays(NamedTuple):
    """The host arrays a task trains on; `task_ids` is per example (joint mixes tasks)."""

    x: PyTree
    y: PyTree
    task_ids: np.ndarray


class DataSpec(NamedTuple):
    """Static shapes of a run's data, for memory that stores examples (replay buffers).

    Attributes:
      example: one example (no batch axis) as a `Batch` of ``jax.ShapeDtypeStruct``.
      output: the model's output for one example (logits ``(C,)``, or ``(L, V)`` for an LM).
    """

    example: Batch
    output: jax.ShapeDtypeStruct

    @classmethod
    def for_classifier(cls, input_shape: tuple[int, ...], num_classes: int) -> DataSpec:
        """Float32 inputs of `input_shape`, an int32 class id, ``num_classes`` logits."""
        example = Batch(x=jax.ShapeDtypeStruct(tuple(input_shape), np.float32),
                        y=jax.ShapeDtypeStruct((), np.int32),
                        task_ids=jax.ShapeDtypeStruct((), np.int32))
        return cls(example, jax.ShapeDtypeStruct((int(num_classes),), np.float32))

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one example's input (``x`` must be a single array)."""
        return tuple(self.example.x.shape)

    @property
    def num_classes(self) -> int:
        """Width of the model's output (the last axis of ``output``)."""
        return int(self.output.shape[-1])


def num_examples(tree: PyTree) -> int:
    """The leading-axis size shared by every leaf of `tree` (a batch or task arrays).

    >>> num_examples({"tokens": np.zeros((5, 8)), "mask": np.ones((5, 8))})
    5
    """
    leaves = jax.tree.leaves(tree)
    if not leaves:
        raise ValueError("a batch must hold at least one array")
    n = int(np.shape(leaves[0])[0])
    for leaf in leaves:
        if not np.shape(leaf) or int(np.shape(leaf)[0]) != n:
            raise ValueError(
                f"every array of a batch must share the leading (example) axis; got shapes "
                f"{[np.shape(x) for x in leaves]}")
    return n


def take(tree: PyTree, index) -> PyTree:
    """``tree`` with every leaf indexed by ``index`` along the leading axis."""
    return jax.tree.map(lambda a: a[index], tree)


def example_spec(data: TrainArrays | Batch) -> Batch:
    """One example of `data` as a `Batch` of ``jax.ShapeDtypeStruct`` (no batch axis)."""
    return Batch(*(jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a)[1:], a.dtype), part)
                   for part in (data.x, data.y, data.task_ids)))
