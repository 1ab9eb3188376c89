"""Batch order and batch assembly, shared by the device-resident and host-fed paths.

The order of examples depends only on (seed, task index, epoch), so a run resumed from a
checkpoint in the middle of an epoch replays exactly the batches it would have seen. The
host-fed path gathers those same index batches with the grain pipeline of
`clax.data.pipeline` (background threads, a few batches ahead), so its batches, and the
run's results, are identical to the device-resident path's.
"""

from __future__ import annotations

from collections.abc import Iterator

import jax
import numpy as np

from clax.core import Batch, TrainArrays, num_examples
from clax.data import pipeline
from clax.typing import PyTree


def epoch_index_batches(
    num_examples: int, batch_size: int, *, seed: int, task_index: int, epoch: int
) -> np.ndarray:
    """Shuffled example indices for one epoch, shaped (steps, batch_size), int32.

    The last partial batch is dropped so every step has the same shape (one compilation).
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    steps = num_examples // batch_size
    if steps == 0:
        raise ValueError(
            f"task {task_index} has {num_examples} training examples, fewer than "
            f"batch_size={batch_size}; lower config.train.batch_size"
        )
    rng = np.random.default_rng([seed, task_index, epoch])
    order = rng.permutation(num_examples)[: steps * batch_size]
    return order.reshape(steps, batch_size).astype(np.int32)


def host_batches(data: TrainArrays | pipeline.ArraySource | pipeline.TokenSource,
                 index_batches: np.ndarray, *, prefetch: int = pipeline.DEFAULT_PREFETCH
                 ) -> Iterator[Batch]:
    """Host-fed path: yields numpy batches in the order of `index_batches`.

    The batches are gathered by `clax.data.pipeline.batch_iterator`, `prefetch` batches
    ahead in background threads, so the next batch is read (from memory, or from
    memory-mapped files: `TrainArrays` of ``np.load(mmap_mode="r")`` arrays never load
    whole) while the device trains on the current one. To start mid-epoch, pass the
    remaining rows (``index_batches[step:]``): the skipped batches are never read.

    Args:
      data: the task's arrays, or a pipeline source.
      index_batches: (steps, batch_size) example indices; in a multi-process run only the
        columns this process feeds (``index_batches[:, rows]``).
      prefetch: batches gathered ahead (0: gather in this thread, one at a time).
    """
    source = (pipeline.ArraySource(data.x, data.y, data.task_ids)
              if isinstance(data, TrainArrays) else data)
    batches = pipeline.batch_iterator(source, index_batches, prefetch=prefetch)
    try:
        for b in batches:
            yield Batch(x=b.x, y=b.y, task_ids=b.task_ids)
    finally:  # also when the consumer stops early (an error, a generator closed)
        batches.close()


def padded_eval_batches(
    x: PyTree, y: PyTree, task_ids: np.ndarray, batch_size: int
) -> tuple[Batch, np.ndarray]:
    """Pads an evaluation set (arrays or pytrees of arrays) to whole batches.

    Returns:
      (batches, valid): arrays shaped (num_batches, batch_size, ...), num_batches a power
      of two, and a bool mask of the real (non-padding) examples.
    """
    n = num_examples(y)
    # A power-of-two batch count: evaluation sets of similar size share one compilation.
    num_batches = 1 << max(0, -(-n // batch_size) - 1).bit_length()
    pad = num_batches * batch_size - n

    def fit(a):
        a = np.concatenate([a, np.zeros((pad, *a.shape[1:]), a.dtype)]) if pad else a
        return a.reshape(num_batches, batch_size, *a.shape[1:])

    valid = fit(np.ones(n, bool))
    return Batch(x=jax.tree.map(fit, x), y=jax.tree.map(fit, y), task_ids=fit(task_ids)), valid


def subsample(n: int, size: int | None, *, seed: int) -> np.ndarray:
    """A fixed, sorted subset of ``range(n)`` of at most `size` indices (all if None)."""
    if size is None or size <= 0 or size >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size, replace=False))
