"""Continual-learning metrics computed from the accuracy matrix.

Notation (0-based throughout). After training on tasks ``0, ..., T-1`` in order, every task's
test set is evaluated after every task, giving the accuracy matrix ``R`` of shape ``(T, T)``::

    R[i, j] = accuracy on the test set of task j after training on task i.

The lower triangle including the diagonal (``j <= i``) holds tasks already seen; the strict upper
triangle (``j > i``) holds tasks not yet trained on and is only used by forward transfer. The
vector ``b`` of shape ``(T,)`` holds the accuracy of the freshly initialized model (before any
training) on each task.

All accuracies are fractions in ``[0, 1]`` (not percentages). Every metric returns a Python
``float`` in the same units (a fraction, or a difference of fractions).

Metric direction. ``R`` may also hold a metric for which lower is better (a loss, a
perplexity): pass ``higher_is_better=False``. With the sign ``s = +1`` if higher is better and
``s = -1`` otherwise, every metric ``f`` is computed on the oriented matrix ``s * R`` (and
``s * b``), on which larger is always better, and reported as:

* *level* metrics (ACC, average incremental accuracy): ``s * f(s * R)``, i.e. back in the
  metric's own units (for a loss: the mean loss, unchanged by the two sign flips);
* *difference* metrics (BWT, FWT, forgetting): ``f(s * R)`` as is, so their sign convention
  does not depend on the metric: negative BWT and positive forgetting always mean forgetting,
  in the metric's units. For a loss ``L``: ``BWT = 1/(T-1) sum_j (L[j, j] - L[T-1, j])`` and
  ``f_j = L[T-1, j] - min_{l in [j, T-2]} L[l, j]``.

The ``[0, 1]`` range check applies only when higher is better (accuracies); a lower-is-better
matrix need only be finite (see :func:`validate_metric_matrix`). For a higher-is-better metric
outside ``[0, 1]``, pass its negation with ``higher_is_better=False``.

References:
    * ACC, BWT and FWT: D. Lopez-Paz and M. Ranzato, "Gradient Episodic Memory for Continual
      Learning", NeurIPS 2017, arXiv:1706.08840 (Section 4).
    * Forgetting: A. Chaudhry, P. K. Dokania, T. Ajanthan and P. H. S. Torr, "Riemannian Walk for
      Incremental Learning: Understanding Forgetting and Intransigence", ECCV 2018,
      arXiv:1801.10112 (Section 4).
    * Average incremental accuracy: S.-A. Rebuffi, A. Kolesnikov, G. Sperl and C. H. Lampert,
      "iCaRL: Incremental Classifier and Representation Learning", CVPR 2017, arXiv:1611.07725.
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "average_accuracy",
    "average_forgetting",
    "average_incremental_accuracy",
    "backward_transfer",
    "direction",
    "forward_transfer",
    "summarize",
    "validate_accuracy_matrix",
    "validate_baseline",
    "validate_metric_matrix",
]


def direction(higher_is_better: Any) -> float:
    """The sign ``s``: ``+1.0`` if higher is better, ``-1.0`` if lower is better.

    Raises:
        ValueError: If ``higher_is_better`` is not a bool.
    """
    if not isinstance(higher_is_better, (bool, np.bool_)):
        raise ValueError(f"higher_is_better must be a bool, got {higher_is_better!r}")
    return 1.0 if higher_is_better else -1.0


def validate_metric_matrix(
    R: npt.ArrayLike, *, bounded: bool = True, name: str = "R"
) -> np.ndarray:
    """Checks a metric matrix and returns it as a float64 array.

    Args:
        R: Array-like of shape ``(T, T)`` with ``T >= 1``; ``R[i, j]`` is the metric on task
            ``j`` after training on task ``i``.
        bounded: True: entries must be fractions in ``[0, 1]`` (accuracies). False: any finite
            number (a loss, a perplexity).
        name: Argument name used in error messages.

    Returns:
        A new ``np.ndarray`` of dtype float64 and shape ``(T, T)``.

    Raises:
        ValueError: If ``R`` is not numeric, not 2-D, not square, empty, has non-finite entries
            (NaN/inf), or (when ``bounded``) has entries outside ``[0, 1]``.
    """
    what = "accuracies" if bounded else "metric values"
    try:
        arr = np.array(R, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be a numeric (T, T) array of {what}, got {R!r}") from e
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (T, T) array, got shape {arr.shape}")
    if arr.shape[0] != arr.shape[1]:
        raise ValueError(f"{name} must be square (T, T), got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise ValueError(f"{name} must have at least one task (T >= 1), got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        bad = np.argwhere(~np.isfinite(arr))[0]
        raise ValueError(
            f"{name} must be finite (evaluate every task after every task); "
            f"{name}[{bad[0]}, {bad[1]}] = {arr[bad[0], bad[1]]}"
        )
    if bounded and (np.any(arr < 0.0) or np.any(arr > 1.0)):
        bad = np.argwhere((arr < 0.0) | (arr > 1.0))[0]
        raise ValueError(
            f"{name} must hold accuracies as fractions in [0, 1] (not percentages); "
            f"{name}[{bad[0]}, {bad[1]}] = {arr[bad[0], bad[1]]} (for a lower-is-better "
            "metric pass higher_is_better=False)"
        )
    return arr


def validate_accuracy_matrix(R: npt.ArrayLike, *, name: str = "R") -> np.ndarray:
    """Checks an accuracy matrix (fractions in ``[0, 1]``) and returns it as a float64 array.

    ``validate_metric_matrix(R, bounded=True, name=name)``.

    Args:
        R: Array-like of shape ``(T, T)`` with ``T >= 1``; ``R[i, j]`` is the accuracy on task
            ``j`` after training on task ``i``, as a fraction in ``[0, 1]``.
        name: Argument name used in error messages.

    Returns:
        A new ``np.ndarray`` of dtype float64 and shape ``(T, T)``.

    Raises:
        ValueError: If ``R`` is not numeric, not 2-D, not square, empty, has non-finite entries
            (NaN/inf), or has entries outside ``[0, 1]``.
    """
    return validate_metric_matrix(R, bounded=True, name=name)


def validate_baseline(
    b: npt.ArrayLike, num_tasks: int, *, name: str = "b", bounded: bool = True
) -> np.ndarray:
    """Checks the random-initialization vector and returns it as a float64 array.

    Args:
        b: Array-like of shape ``(T,)``; ``b[j]`` is the metric of the freshly initialized model
            on task ``j`` (an accuracy as a fraction in ``[0, 1]`` when ``bounded``).
        num_tasks: Expected length ``T``.
        name: Argument name used in error messages.
        bounded: True: entries must be fractions in ``[0, 1]``; False: any finite number.

    Returns:
        A new ``np.ndarray`` of dtype float64 and shape ``(T,)``.

    Raises:
        ValueError: If ``b`` is not numeric, not 1-D of length ``num_tasks``, non-finite, or
            (when ``bounded``) has entries outside ``[0, 1]``.
    """
    try:
        arr = np.array(b, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be a numeric (T,) array, got {b!r}") from e
    if arr.ndim != 1 or arr.shape[0] != num_tasks:
        raise ValueError(
            f"{name} must have shape ({num_tasks},) to match R's {num_tasks} tasks, "
            f"got shape {arr.shape}"
        )
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite, got {arr.tolist()}")
    if bounded and (np.any(arr < 0.0) or np.any(arr > 1.0)):
        raise ValueError(
            f"{name} must hold accuracies as fractions in [0, 1] (not percentages), "
            f"got {arr.tolist()}"
        )
    return arr


def _oriented(R: npt.ArrayLike, higher_is_better: Any) -> tuple[np.ndarray, float]:
    """``(s * R, s)`` for a validated ``R`` (bounded iff higher is better)."""
    s = direction(higher_is_better)
    return s * validate_metric_matrix(R, bounded=bool(higher_is_better)), s


def _check_task_index(after_task: Any, num_tasks: int) -> int:
    if isinstance(after_task, bool) or not isinstance(after_task, numbers.Integral):
        raise ValueError(f"after_task must be an int in [0, {num_tasks}), got {after_task!r}")
    i = int(after_task)
    if not 0 <= i < num_tasks:
        raise ValueError(f"after_task must be an int in [0, {num_tasks}), got {i}")
    return i


def _acc(X: np.ndarray, i: int) -> float:
    return float(np.mean(X[i, : i + 1]))


def _bwt(X: np.ndarray) -> float:
    T = X.shape[0]
    if T == 1:
        return 0.0
    j = np.arange(T - 1)
    return float(np.mean(X[T - 1, j] - X[j, j]))


def _fwt(X: np.ndarray, bx: np.ndarray) -> float:
    T = X.shape[0]
    if T == 1:
        return 0.0
    j = np.arange(1, T)
    return float(np.mean(X[j - 1, j] - bx[j]))


def _forgetting(X: np.ndarray) -> float:
    T = X.shape[0]
    if T == 1:
        return 0.0
    return float(np.mean([np.max(X[j : T - 1, j]) - X[T - 1, j] for j in range(T - 1)]))


def _aia(X: np.ndarray) -> float:
    return float(np.mean([np.mean(X[i, : i + 1]) for i in range(X.shape[0])]))


def average_accuracy(
    R: npt.ArrayLike, after_task: int | None = None, *, higher_is_better: bool = True
) -> float:
    """Average accuracy over the tasks seen so far (ACC, Lopez-Paz & Ranzato 2017).

    With ``i = after_task`` (default ``T - 1``, the end of training)::

        ACC_i = 1/(i + 1) * sum_{j=0}^{i} R[i, j]

    Only tasks already trained on (``j <= i``) are averaged. For ``i = T - 1`` this is the GEM
    ``ACC = 1/T * sum_j R[T-1, j]``. A level metric: for a lower-is-better ``R`` it is the same
    mean, in the metric's units (see the module docstring).

    Args:
        R: Metric matrix of shape ``(T, T)``; accuracies in ``[0, 1]`` unless
            ``higher_is_better`` is False.
        after_task: Row ``i`` (0-based) to average; ``None`` means the last row.
        higher_is_better: False for a loss-like ``R`` (lower is better).

    Returns:
        The average as a float (in ``[0, 1]`` for accuracies).

    Raises:
        ValueError: If ``R`` is invalid or ``after_task`` is not an int in ``[0, T)``.
    """
    X, s = _oriented(R, higher_is_better)
    T = X.shape[0]
    i = T - 1 if after_task is None else _check_task_index(after_task, T)
    return s * _acc(X, i)


def backward_transfer(R: npt.ArrayLike, *, higher_is_better: bool = True) -> float:
    """Backward transfer (BWT, Lopez-Paz & Ranzato 2017), on ``X = s * R``::

        BWT = 1/(T - 1) * sum_{j=0}^{T-2} (X[T-1, j] - X[j, j])

    The change in accuracy on each earlier task between just after learning it and the end of
    training; negative values mean forgetting, whatever the metric direction (for a loss:
    ``L[j, j] - L[T-1, j]``). With a single task there is no earlier task and the sum is empty,
    so ``0.0`` is returned for ``T == 1`` (instead of ``0/0 = NaN``).

    Args:
        R: Metric matrix of shape ``(T, T)``; accuracies in ``[0, 1]`` unless
            ``higher_is_better`` is False.
        higher_is_better: False for a loss-like ``R``; then ``s = -1``.

    Returns:
        BWT as a float (in ``[-1, 1]`` for accuracies).

    Raises:
        ValueError: If ``R`` is invalid.
    """
    X, _ = _oriented(R, higher_is_better)
    return _bwt(X)


def forward_transfer(
    R: npt.ArrayLike, b: npt.ArrayLike, *, higher_is_better: bool = True
) -> float:
    """Forward transfer (FWT, Lopez-Paz & Ranzato 2017), on ``X = s * R``, ``c = s * b``::

        FWT = 1/(T - 1) * sum_{j=1}^{T-1} (X[j-1, j] - c[j])

    The metric on each task just before training on it, relative to a freshly initialized
    model; uses the strict upper diagonal of ``R``. Positive values mean positive transfer,
    whatever the direction. Returns ``0.0`` for ``T == 1`` (empty sum).

    Args:
        R: Metric matrix of shape ``(T, T)``; accuracies in ``[0, 1]`` unless
            ``higher_is_better`` is False.
        b: The metric of the freshly initialized model on each task, shape ``(T,)``.
        higher_is_better: False for a loss-like ``R`` and ``b``; then ``s = -1``.

    Returns:
        FWT as a float (in ``[-1, 1]`` for accuracies).

    Raises:
        ValueError: If ``R`` or ``b`` is invalid or ``b`` does not have length ``T``.
    """
    X, s = _oriented(R, higher_is_better)
    c = s * validate_baseline(b, X.shape[0], bounded=bool(higher_is_better))
    return _fwt(X, c)


def average_forgetting(R: npt.ArrayLike, *, higher_is_better: bool = True) -> float:
    """Average forgetting at the end of training (Chaudhry et al. 2018), on ``X = s * R``::

        f_j = max_{l in [j, T-2]} X[l, j] - X[T-1, j]        for j = 0, ..., T-2
        F   = 1/(T - 1) * sum_{j=0}^{T-2} f_j

    ``f_j`` is the drop from the best value task ``j`` ever had while it was already learned
    (rows ``l >= j``, excluding the final row) to its final value; for a loss this is
    ``L[T-1, j] - min_l L[l, j]``. Unlike BWT the reference is the best over those rows, not
    the diagonal, so ``F >= -BWT``. ``f_j`` is not clipped: it is negative if the final value
    beats every earlier one. The last task has no earlier row and is excluded. Returns ``0.0``
    for ``T == 1`` (empty sum).

    Args:
        R: Metric matrix of shape ``(T, T)``; accuracies in ``[0, 1]`` unless
            ``higher_is_better`` is False.
        higher_is_better: False for a loss-like ``R``; then ``s = -1``.

    Returns:
        Average forgetting as a float (in ``[-1, 1]`` for accuracies).

    Raises:
        ValueError: If ``R`` is invalid.
    """
    X, _ = _oriented(R, higher_is_better)
    return _forgetting(X)


def average_incremental_accuracy(R: npt.ArrayLike, *, higher_is_better: bool = True) -> float:
    """Average incremental accuracy (Rebuffi et al. 2017)::

        AIA = 1/T * sum_{i=0}^{T-1} ACC_i,   ACC_i = 1/(i + 1) * sum_{j=0}^{i} R[i, j]

    The mean of :func:`average_accuracy` after each task, i.e. the area under the
    seen-tasks accuracy curve. A level metric (in the metric's units).

    Args:
        R: Metric matrix of shape ``(T, T)``; accuracies in ``[0, 1]`` unless
            ``higher_is_better`` is False.
        higher_is_better: False for a loss-like ``R``.

    Returns:
        AIA as a float (in ``[0, 1]`` for accuracies).

    Raises:
        ValueError: If ``R`` is invalid.
    """
    X, s = _oriented(R, higher_is_better)
    return s * _aia(X)


def summarize(
    R: npt.ArrayLike, b: npt.ArrayLike | None = None, *, higher_is_better: bool = True
) -> dict[str, float | None]:
    """All standard metrics of a metric matrix (accuracies by default).

    Args:
        R: Metric matrix of shape ``(T, T)``; accuracies in ``[0, 1]`` unless
            ``higher_is_better`` is False (then any finite values, e.g. losses).
        b: Optional metric of the freshly initialized model, shape ``(T,)``. Forward transfer
            needs it.
        higher_is_better: False when lower is better (a loss); see the module docstring for
            how every metric is then oriented.

    Returns:
        A dict of Python floats::

            acc                 = average_accuracy(R)          (final-row ACC)
            bwt                 = backward_transfer(R)
            fwt                 = forward_transfer(R, b), or None when b is None
            forgetting          = average_forgetting(R)
            avg_incremental_acc = average_incremental_accuracy(R)

        ``acc`` and ``avg_incremental_acc`` are in the metric's units; ``bwt``, ``fwt`` and
        ``forgetting`` are oriented (negative BWT / positive forgetting mean forgetting).

    Raises:
        ValueError: If ``R`` or ``b`` is invalid.

    Example: task 0 drops from 0.9 to 0.6 while task 1 is learned; as a loss, the same
    forgetting is a rise from 0.3 to 0.9:

    >>> s = summarize([[0.9, 0.1], [0.6, 0.8]])
    >>> round(s["acc"], 3), round(s["bwt"], 3), round(s["forgetting"], 3)
    (0.7, -0.3, 0.3)
    >>> s = summarize([[0.3, 2.0], [0.9, 0.4]], higher_is_better=False)
    >>> round(s["acc"], 3), round(s["bwt"], 3), round(s["forgetting"], 3)
    (0.65, -0.6, 0.6)
    """
    X, s = _oriented(R, higher_is_better)
    c = None if b is None else s * validate_baseline(b, X.shape[0], bounded=bool(higher_is_better))
    return {
        "acc": s * _acc(X, X.shape[0] - 1),
        "bwt": _bwt(X),
        "fwt": None if c is None else _fwt(X, c),
        "forgetting": _forgetting(X),
        "avg_incremental_acc": s * _aia(X),
    }


def pretrain_continual_summary(R: npt.ArrayLike) -> dict[str, float | None]:
    """Base-task retention and new-task accuracy of a pretrain-then-continual run.

    Task 0 is the base (pretraining, "control") task and tasks ``1..T−1`` the new ones
    (``clax.data.pretrain_continual``), as in the control / target split of LiNeS (Wang et
    al., ICLR 2025)::

        base_before    = R[0, 0]                 (base accuracy after pretraining)
        base_after     = R[T−1, 0]               (after all new tasks)
        base_retention = R[T−1, 0] / R[0, 0]     (None when R[0, 0] = 0)
        new_tasks_acc  = mean_{j>=1} R[T−1, j]

    Args:
        R: Accuracy matrix of shape ``(T, T)`` with ``T >= 2`` and entries in ``[0, 1]``.

    Returns:
        A dict of Python floats (``base_retention`` may be None).

    Raises:
        ValueError: If ``R`` is invalid or has a single task (no new tasks).
    """
    R = validate_accuracy_matrix(R)
    if R.shape[0] < 2:
        raise ValueError(
            f"R must have a base task and at least one new task (T >= 2), got shape {R.shape}"
        )
    before, after = float(R[0, 0]), float(R[-1, 0])
    return {
        "base_before": before,
        "base_after": after,
        "base_retention": after / before if before > 0 else None,
        "new_tasks_acc": float(np.mean(R[-1, 1:])),
    }
