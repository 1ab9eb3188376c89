"""Run a batched function (logits, features) over many examples in fixed-size batches.

Inference over a whole data set (features for a closed-form head, logits for unlearning
metrics) slices the inputs into batches and calls a jitted function on each. A shorter last
batch would compile the function a second time, so :func:`padded_batches` pads it to the
full size (repeating its last row) and says how many rows are real; :func:`batched_apply`
runs the function on every batch, drops the padded rows and returns host arrays.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import jax
import numpy as np

from clax._validation import check_positive_int
from clax.typing import PyTree

__all__ = ["batched_apply", "padded_batches"]


def _num_rows(x: PyTree, name: str) -> int:
    leaves = jax.tree.leaves(x)
    if not leaves:
        raise ValueError(f"{name} must hold at least one array, got {x!r}")
    shapes = [np.shape(a) for a in leaves]
    if any(len(s) == 0 for s in shapes) or len({s[0] for s in shapes}) != 1:
        raise ValueError(
            f"every array of {name} must have the same leading (batch) dimension, got "
            f"shapes {shapes}")
    return shapes[0][0]


def _pad(a: np.ndarray, size: int) -> np.ndarray:
    """``a`` with its last row repeated up to ``size`` rows (finite, valid-looking inputs)."""
    if len(a) == size:
        return a
    return np.concatenate([a, np.repeat(a[-1:], size - len(a), axis=0)])


def padded_batches(x: PyTree, *, batch_size: int) -> Iterator[tuple[PyTree, int]]:
    """Yields ``(batch, num_valid)``: every batch has exactly ``batch_size`` rows.

    The last batch is padded by repeating its last row, so one compiled shape serves every
    batch; its first ``num_valid`` rows are real.

    Args:
        x: An array, or a pytree of arrays sharing the leading dimension ``n`` (numpy or
            jax arrays; slices are taken on the host).
        batch_size: Rows per batch.

    Raises:
        TypeError: ``batch_size`` is not an int.
        ValueError: ``batch_size < 1``, or the leaves of ``x`` disagree on ``n``.
    """
    batch_size = check_positive_int("batch_size", batch_size)
    n = _num_rows(x, "x")
    x = jax.tree.map(np.asarray, x)
    for start in range(0, n, batch_size):
        part = jax.tree.map(lambda a, start=start: a[start:start + batch_size], x)
        num_valid = min(batch_size, n - start)
        yield jax.tree.map(lambda a: _pad(a, batch_size), part), num_valid


def batched_apply(fn: Callable[[PyTree], PyTree], x: PyTree, *, batch_size: int) -> PyTree:
    """``fn(x)`` computed ``batch_size`` rows at a time, as host (numpy) arrays.

    Every call of ``fn`` sees exactly ``batch_size`` rows (the last batch is padded, see
    :func:`padded_batches`), so a jitted ``fn`` compiles once for any ``n``. ``fn`` must
    be row-wise: row ``i`` of its outputs depends on row ``i`` of its input only (eval-mode
    models are; train-mode BatchNorm is not). The next batch is dispatched before the
    previous result is copied to the host.

    Args:
        fn: ``batch -> outputs``: a pytree of arrays with leading dimension ``batch_size``
            (pass a ``jax.jit``-ed function; ``batched_apply`` does not jit it).
        x: An array, or a pytree of arrays sharing the leading dimension ``n``.
        batch_size: Rows per call.

    Returns:
        ``fn``'s output structure, each leaf a numpy array with leading dimension ``n``.
        For ``n == 0`` the leaves are empty, with the shapes ``fn`` would give (from
        ``jax.eval_shape``; ``fn`` is not run).

    Raises:
        TypeError: ``batch_size`` is not an int.
        ValueError: ``batch_size < 1``, the leaves of ``x`` disagree on ``n``, or an
            output of ``fn`` does not have ``batch_size`` rows.
    """
    batch_size = check_positive_int("batch_size", batch_size)
    if _num_rows(x, "x") == 0:
        spec = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct((batch_size, *np.shape(a)[1:]), np.asarray(a).dtype),
            x)
        out = jax.eval_shape(fn, spec)
        return jax.tree.map(lambda s: np.zeros((0, *s.shape[1:]), s.dtype), out)

    def to_host(out: PyTree, num_valid: int) -> PyTree:
        def take(a):
            if np.ndim(a) == 0 or np.shape(a)[0] != batch_size:
                raise ValueError(f"fn must return arrays with {batch_size} rows (one per input "
                                 f"row), got shape {np.shape(a)}")
            return np.asarray(a[:num_valid])
        return jax.tree.map(take, out)

    parts, pending = [], None
    for batch, num_valid in padded_batches(x, batch_size=batch_size):
        out = fn(batch)  # dispatched asynchronously ...
        if pending is not None:
            parts.append(to_host(*pending))  # ... while the previous result is copied
        pending = (out, num_valid)
    parts.append(to_host(*pending))
    return jax.tree.map(lambda *a: np.concatenate(a), *parts)
