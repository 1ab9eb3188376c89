"""A checkpointable host data pipeline (on grain) for data that does not fit on the device.

When to use it: a task's training data too large to copy onto the accelerator (the default
``config.train.device_resident=True`` path puts each task's whole arrays on device), or a
tokenised corpus for a language model, possibly larger than host memory. The loop's
host-fed path (``config.train.device_resident=False``) gathers its batches with this
pipeline, ``config.train.prefetch`` batches ahead in background threads, so the host reads
the next batch while the device trains on the current one. To train `train_continual` on
data that does not fit in memory, give the scenario's tasks memory-mapped training arrays
(``NpySource(x_path, y_path).x`` / ``.y``, or ``np.load(path, mmap_mode="r")``) and set
``device_resident=False``: each step reads only its batch from disk. (`TokenSource` is for
loops that consume the pipeline directly; the loop's tasks hold ``(N, L)`` arrays.)

Sources (grain's random-access protocol, ``__len__`` and ``__getitem__``, plus a
vectorised ``gather`` that reads a whole batch in one numpy indexing operation):

* `ArraySource`: arrays in memory (or any array-likes that index like numpy arrays).
* `NpySource`: ``.npy`` files memory-mapped (``np.load(mmap_mode="r")``): a batch reads
  only its examples' pages from disk, the file never has to fit in memory.
* `TokenSource`: a packed language-modelling corpus, a flat token stream (or the
  ``(N, L + 1)`` rows of `clax.data.text.pack_tokens`), in memory or a ``.npy`` file. It
  cuts each example on the fly exactly as ``language_modeling_arrays(pack_tokens(ids, L))``
  would, with an optional loss mask (masked targets become -1: no loss).

Example ``i`` of a source is an `Examples` ``(x, y, task_ids)``: the fields of
`clax.core.TrainArrays` (the data layer does not import the core, so the pipeline has its
own tuple of the same shape; `clax.training.feed` turns each batch into a `Batch`).

`batch_iterator(source, index_batches)` yields ``source[row]`` for every row of
`index_batches` in order: the index batches of ``clax.training.feed.epoch_index_batches``,
the same rows as the device-resident path, so both paths train on identical batches and
give bit-identical results.

What survives a kill: the iterator state, ``get_state()`` (``{"next_index": k}``, the
number of batches already returned, plain JSON), and ``set_state`` resumes at exactly batch
``k`` without reading the batches before it. Since the index batches are a pure function
of (seed, task, epoch) and the state is a count of batches, (task, epoch, step within the
epoch) fully determines the pipeline's position: the loop's checkpoints record those three
and rebuild the pipeline from them (slicing the epoch's index batches at the step), with
no separate iterator state (it starts one iterator per chunk of steps, between periodic
evaluations and checkpoints, on that chunk's rows). A custom loop may save ``get_state()``.

Process sharding: in a multi-process run (JAX multi-controller, one program per host)
each process gathers only its share of every global batch, ``process_index`` of
``process_count`` equal contiguous blocks of the batch axis (rows
``[p*B/P, (p+1)*B/P)``), so every example of a step is read exactly once across the
processes. Each process then builds the global batch from the shares with
``jax.make_array_from_process_local_data(sharding, local_batch, global_shape)`` (what
``clax.training.distributed.host_to_global`` does with ``global_size``). Where the mesh
gives a process non-contiguous rows (some TPU slices), slice the rows yourself
(``index_batches[:, rows]``) and use ``process_count=1``, as the loop does.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import grain
import jax
import numpy as np

from clax._validation import check_int, check_positive_int

__all__ = [
    "ArraySource",
    "Examples",
    "NpySource",
    "TokenSource",
    "batch_dataset",
    "batch_iterator",
]

DEFAULT_PREFETCH = 2


class Examples(NamedTuple):
    """One example (no batch axis) or a batch of them: the fields of a `TrainArrays`."""

    x: Any  # model inputs: an array or a pytree of arrays
    y: Any  # targets: an array or a pytree of arrays
    task_ids: np.ndarray  # int32, the task each example came from


def _leading_size(tree: Any, what: str) -> int:
    leaves = jax.tree.leaves(tree)
    if not leaves:
        raise ValueError(f"{what} holds no arrays")
    sizes = {int(np.shape(a)[0]) if np.ndim(a) else None for a in leaves}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(f"every array of {what} must share the leading (example) axis; got "
                         f"shapes {[np.shape(a) for a in leaves]}")
    return sizes.pop()


def _first(batch: Examples) -> Examples:
    """The only example of a batch of one (the batch axis dropped)."""
    return Examples(*(jax.tree.map(lambda a: a[0], part) for part in batch))


class _RandomAccess:
    """grain's random-access protocol over a subclass's ``_n`` examples and ``gather``."""

    _n: int

    def gather(self, indices: np.ndarray) -> Examples:
        raise NotImplementedError

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, index: int) -> Examples:
        """Example `index` (grain's random-access protocol)."""
        i = int(index)
        if not -self._n <= i < self._n:
            raise IndexError(f"example {i} is out of range for a source of {self._n} examples")
        return _first(self.gather(np.asarray([i % self._n])))


class ArraySource(_RandomAccess):
    """Examples ``(x[i], y[i], task_ids[i])`` of arrays (or pytrees of arrays).

    Args:
      x: model inputs, leading axis = examples; numpy arrays, memmaps, or any array-like
        indexing like numpy (`NpySource` passes memmaps).
      y: targets, the same number of examples.
      task_ids: int task id per example, or one int for every example.
    """

    def __init__(self, x: Any, y: Any, task_ids: np.ndarray | int = 0):
        n = _leading_size(x, "x")
        if _leading_size(y, "y") != n:
            raise ValueError(f"x has {n} examples but y has {_leading_size(y, 'y')}")
        if np.ndim(task_ids) == 0:
            task_ids = check_int("task_ids", task_ids, low=0)
        elif np.shape(task_ids) != (n,):
            raise ValueError(f"task_ids must be one int or ({n},) ints (one per example of x), "
                             f"got shape {np.shape(task_ids)}")
        self.x, self.y, self.task_ids, self._n = x, y, task_ids, n

    def gather(self, indices: np.ndarray) -> Examples:
        """The examples at `indices` (1-D) as a batch: one fancy-indexing read per array."""
        def take(a):
            return np.asarray(a[indices])  # a memmap reads only these rows' pages

        ids = (np.full(len(indices), self.task_ids, np.int32) if isinstance(self.task_ids, int)
               else take(self.task_ids))
        return Examples(jax.tree.map(take, self.x), jax.tree.map(take, self.y), ids)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._n} examples)"


def _load_npy(path: Any, what: str) -> np.ndarray:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{what} must be a path to a .npy file, got {path!r}")
    if not os.path.isfile(path):
        raise ValueError(f"{what} file {os.fspath(path)!r} does not exist")
    return np.load(path, mmap_mode="r")


class NpySource(ArraySource):
    """`ArraySource` over ``.npy`` files, memory-mapped: nothing is read until a batch is.

    Args:
      x: path of the inputs' ``.npy`` file, or a pytree (dict, tuple) of paths.
      y: path (or pytree of paths) of the targets.
      task_ids: a path of a ``.npy`` of int task ids per example, an array of them, or one
        int for every example.

    Write the files with ``np.save`` (or ``np.lib.format.open_memmap`` to fill one larger
    than memory chunk by chunk).
    """

    def __init__(self, x: Any, y: Any, task_ids: Any = 0):
        def load(part, tree):
            return jax.tree.map(lambda p: _load_npy(p, f"NpySource {part}"), tree)

        if isinstance(task_ids, (str, os.PathLike)):
            task_ids = _load_npy(task_ids, "NpySource task_ids")
        super().__init__(load("x", x), load("y", y), task_ids)


class TokenSource(_RandomAccess):
    """A packed causal-LM corpus: example ``i`` is ``seq_len`` inputs and their next tokens.

    ``x[i] = row[:-1]`` and ``y[i] = row[1:]`` (int32) of token row ``i`` of length
    ``seq_len + 1``: for a flat stream, ``tokens[i*seq_len : i*seq_len + seq_len + 1]``
    (consecutive rows overlap by one token, so every token after the first is a target
    once: exactly the rows of `clax.data.text.pack_tokens`); for 2-D ``(N, seq_len + 1)``
    tokens, row ``i``. Rows are cut when read, so a memmapped corpus never loads whole.

    Args:
      tokens: token ids, 1-D (a stream) or 2-D ``(N, seq_len + 1)`` (packed rows); an
        array or the path of a ``.npy`` file (memory-mapped).
      seq_len: tokens per example; with 2-D tokens, ``tokens.shape[1] - 1`` (default).
      loss_mask: bools shaped like `tokens` (array or ``.npy`` path): False marks a token
        that is not a target (padding, prompt); its target becomes -1, which
        `clax.core.LanguageModeling` skips.
      task_id: the task id of every example.
    """

    def __init__(self, tokens: Any, seq_len: int | None = None, *, loss_mask: Any = None,
                 task_id: int = 0):
        if isinstance(tokens, (str, os.PathLike)):
            tokens = _load_npy(tokens, "TokenSource tokens")
        if isinstance(loss_mask, (str, os.PathLike)):
            loss_mask = _load_npy(loss_mask, "TokenSource loss_mask")
        if np.ndim(tokens) not in (1, 2):
            raise ValueError(f"TokenSource tokens must be a 1-D stream or 2-D (N, seq_len + 1) "
                             f"rows, got shape {np.shape(tokens)}")
        if np.ndim(tokens) == 2:
            width = np.shape(tokens)[1]
            seq_len = width - 1 if seq_len is None else seq_len
            if seq_len != width - 1 or width < 2:
                raise ValueError(f"TokenSource seq_len={seq_len} does not fit rows of {width} "
                                 "tokens (seq_len + 1 each)")
            n = np.shape(tokens)[0]
            if n < 1:
                raise ValueError("TokenSource tokens holds no rows")
        else:
            if seq_len is None:
                raise ValueError("TokenSource seq_len must be given for a 1-D token stream")
            check_positive_int("seq_len", seq_len)
            n = (len(tokens) - 1) // seq_len
            if n < 1:
                raise ValueError(f"TokenSource tokens: a stream of {len(tokens)} tokens is too "
                                 f"short for one example of seq_len={seq_len} (+1 target)")
        if loss_mask is not None and np.shape(loss_mask) != np.shape(tokens):
            raise ValueError(f"TokenSource loss_mask has shape {np.shape(loss_mask)}; it must "
                             f"match tokens {np.shape(tokens)}")
        self.tokens, self.loss_mask, self.seq_len = tokens, loss_mask, int(seq_len)
        self.task_id = check_int("task_id", task_id, low=0)
        self._n = int(n)

    def _rows(self, a: Any, indices: np.ndarray) -> np.ndarray:
        if np.ndim(a) == 2:
            return np.asarray(a[indices])
        starts = np.asarray(indices, np.int64) * self.seq_len
        return np.asarray(a[starts[:, None] + np.arange(self.seq_len + 1)])

    def gather(self, indices: np.ndarray) -> Examples:
        """The examples at `indices` (1-D) as a batch of ``(B, seq_len)`` inputs and targets."""
        rows = self._rows(self.tokens, indices)
        x, y = rows[:, :-1].astype(np.int32), rows[:, 1:].astype(np.int32)
        if self.loss_mask is not None:
            y = np.where(self._rows(self.loss_mask, indices)[:, 1:].astype(bool), y, -1)
            y = y.astype(np.int32)
        return Examples(x, y, np.full(len(indices), self.task_id, np.int32))

    def __repr__(self) -> str:
        return f"TokenSource({self._n} examples of seq_len={self.seq_len})"


def _gather_any(source: Any, indices: np.ndarray) -> Examples:
    """A batch of any random-access source: its `gather`, else its examples stacked."""
    gather = getattr(source, "gather", None)
    if gather is not None:
        return Examples(*gather(indices))
    examples = [Examples(*source[int(i)]) for i in indices]
    return Examples(*(jax.tree.map(lambda *a: np.stack(a), *part)
                      for part in zip(*examples, strict=True)))


class _GatherRow:
    """grain map: batch number -> the examples of that row of the (local) index batches.

    A picklable callable (not a lambda), so the dataset could also run in grain's worker
    processes (``mp_prefetch``).
    """

    def __init__(self, source: Any, index_batches: np.ndarray):
        self.source, self.index_batches = source, index_batches

    def __call__(self, k: int) -> Examples:
        return _gather_any(self.source, self.index_batches[k])


def _checked_share(source: Any, index_batches: Any, process_index: int,
                   process_count: int) -> np.ndarray:
    """This process's contiguous columns of `index_batches`, after checking everything."""
    process_count = check_positive_int("process_count", process_count)
    process_index = check_int("process_index", process_index, low=0, high=process_count - 1)
    idx = np.asarray(index_batches)
    if idx.ndim != 2 or not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(f"index_batches must be (steps, batch_size) ints, got shape "
                         f"{idx.shape} {idx.dtype}")
    batch_size = idx.shape[1]
    if batch_size % process_count:
        raise ValueError(f"index_batches has batch size {batch_size}, not divisible by "
                         f"process_count={process_count} (each process reads B/P rows)")
    n = len(source)
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        bad = int(idx.max()) if idx.max() >= n else int(idx.min())
        raise ValueError(f"index_batches holds example index {bad} but the source has {n} "
                         f"examples (valid indices: 0 to {n - 1})")
    share = batch_size // process_count
    return np.ascontiguousarray(idx[:, process_index * share:(process_index + 1) * share])


def batch_dataset(source: Any, index_batches: Any, *, process_index: int = 0,
                  process_count: int = 1) -> grain.MapDataset:
    """A grain `MapDataset` whose element ``k`` is this process's share of batch ``k``.

    Element ``k`` gathers ``source[index_batches[k, rows]]`` with ``rows`` this process's
    contiguous block of the batch axis (all of it in one process). Random access: slicing
    (``ds[start:]``) skips batches without reading them. See `batch_iterator` for the
    arguments.
    """
    local = _checked_share(source, index_batches, process_index, process_count)
    return grain.MapDataset.range(len(local)).map(_GatherRow(source, local))


def batch_iterator(source: Any, index_batches: Any, *, process_index: int = 0,
                   process_count: int = 1, prefetch: int = DEFAULT_PREFETCH,
                   num_threads: int | None = None) -> grain.DatasetIterator:
    """Iterates over the batches of `index_batches` in order, gathering ahead in threads.

    Args:
      source: a random-access source (`ArraySource`, `NpySource`, `TokenSource`, or any
        object with ``__len__`` and ``__getitem__`` returning ``(x, y, task_ids)``).
      index_batches: ``(steps, batch_size)`` example indices, one row per batch (the
        global batches, e.g. ``clax.training.feed.epoch_index_batches``).
      process_index: this process's index in a multi-process run.
      process_count: the number of processes; each reads ``batch_size / process_count``
        rows of every batch, block ``process_index`` of the batch axis.
      prefetch: batches gathered ahead of the consumer (0: gather in the calling thread).
      num_threads: threads gathering batches (default: `prefetch`); gathering is numpy
        indexing, which releases the GIL on numeric arrays, so threads overlap the reads
        (of memmapped pages especially) with each other and with the training loop.

    Returns:
      A grain `DatasetIterator` of `Examples` batches (numpy arrays, leading axis the
      process's share of the batch), deterministic whatever the threads. ``get_state()``
      is ``{"next_index": k}`` (JSON), ``k`` the batches returned so far; ``set_state``
      before iterating resumes at batch ``k`` without reading the earlier ones. Call
      ``close()`` to stop its threads (`clax.training.feed.host_batches` does).

    Raises:
      ValueError: an index outside the source, a batch size not divisible by
        `process_count`, a malformed argument (each naming the argument).
    """
    prefetch = check_int("prefetch", prefetch, low=0)
    num_threads = prefetch if num_threads is None else check_int("num_threads", num_threads,
                                                                 low=0)
    ds = batch_dataset(source, index_batches, process_index=process_index,
                       process_count=process_count)
    options = grain.ReadOptions(num_threads=num_threads if prefetch else 0,
                                prefetch_buffer_size=prefetch if num_threads else 0)
    return iter(ds.to_iter_dataset(options))
