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
    "forward_transfer",
    "summarize",
    "validate_accuracy_matrix",
    "validate_baseline",
]


def validate_accuracy_matrix(R: npt.ArrayLike, *, name: str = "R") -> np.ndarray:
    """Checks an accuracy matrix and returns it as a float64 array.

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
    try:
        arr = np.array(R, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be a numeric (T, T) array of accuracies, got {R!r}") from e
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
    if np.any(arr < 0.0) or np.any(arr > 1.0):
        bad = np.argwhere((arr < 0.0) | (arr > 1.0))[0]
        raise ValueError(
            f"{name} must hold accuracies as fractions in [0, 1] (not percentages); "
            f"{name}[{bad[0]}, {bad[1]}] = {arr[bad[0], bad[1]]}"
        )
    return arr


def validate_baseline(b: npt.ArrayLike, num_tasks: int, *, name: str = "b") -> np.ndarray:
    """Checks the random-initialization accuracy vector and returns it as a float64 array.

    Args:
        b: Array-like of shape ``(T,)``; ``b[j]`` is the accuracy of the freshly initialized model
            on task ``j``, as a fraction in ``[0, 1]``.
        num_tasks: Expected length ``T``.
        name: Argument name used in error messages.

    Returns:
        A new ``np.ndarray`` of dtype float64 and shape ``(T,)``.

    Raises:
        ValueError: If ``b`` is not numeric, not 1-D of length ``num_tasks``, non-finite, or has
            entries outside ``[0, 1]``.
    """
    try:
        arr = np.array(b, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be a numeric (T,) array of accuracies, got {b!r}") from e
    if arr.ndim != 1 or arr.shape[0] != num_tasks:
        raise ValueError(
            f"{name} must have shape ({num_tasks},) to match R's {num_tasks} tasks, "
            f"got shape {arr.shape}"
        )
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite, got {arr.tolist()}")
    if np.any(arr < 0.0) or np.any(arr > 1.0):
        raise ValueError(
            f"{name} must hold accuracies as fractions in [0, 1] (not percentages), "
            f"got {arr.tolist()}"
        )
    return arr


def _check_task_index(after_task: Any, num_tasks: int) -> int:
    if isinstance(after_task, bool) or not isinstance(after_task, numbers.Integral):
        raise ValueError(f"after_task must be an int in [0, {num_tasks}), got {after_task!r}")
    i = int(after_task)
    if not 0 <= i < num_tasks:
        raise ValueError(f"after_task must be an int in [0, {num_tasks}), got {i}")
    return i


def average_accuracy(R: npt.ArrayLike, after_task: int | None = None) -> float:
    """Average accuracy over the tasks seen so far (ACC, Lopez-Paz & Ranzato 2017).

    With ``i = after_task`` (default ``T - 1``, the end of training)::

        ACC_i = 1/(i + 1) * sum_{j=0}^{i} R[i, j]

    Only tasks already trained on (``j <= i``) are averaged. For ``i = T - 1`` this is the GEM
    ``ACC = 1/T * sum_j R[T-1, j]``.

    Args:
        R: Accuracy matrix of shape ``(T, T)`` with entries in ``[0, 1]``.
        after_task: Row ``i`` (0-based) to average; ``None`` means the last row.

    Returns:
        The average accuracy as a float in ``[0, 1]``.

    Raises:
        ValueError: If ``R`` is invalid or ``after_task`` is not an int in ``[0, T)``.
    """
    R = validate_accuracy_matrix(R)
    T = R.shape[0]
    i = T - 1 if after_task is None else _check_task_index(after_task, T)
    return float(np.mean(R[i, : i + 1]))


def backward_transfer(R: npt.ArrayLike) -> float:
    """Backward transfer (BWT, Lopez-Paz & Ranzato 2017)::

        BWT = 1/(T - 1) * sum_{j=0}^{T-2} (R[T-1, j] - R[j, j])

    The change in accuracy on each earlier task between just after learning it and the end of
    training; negative values mean forgetting. With a single task there is no earlier task and
    the sum is empty, so ``0.0`` is returned for ``T == 1`` (instead of ``0/0 = NaN``).

    Args:
        R: Accuracy matrix of shape ``(T, T)`` with entries in ``[0, 1]``.

    Returns:
        BWT as a float in ``[-1, 1]``.

    Raises:
        ValueError: If ``R`` is invalid.
    """
    R = validate_accuracy_matrix(R)
    T = R.shape[0]
    if T == 1:
        return 0.0
    j = np.arange(T - 1)
    return float(np.mean(R[T - 1, j] - R[j, j]))


def forward_transfer(R: npt.ArrayLike, b: npt.ArrayLike) -> float:
    """Forward transfer (FWT, Lopez-Paz & Ranzato 2017)::

        FWT = 1/(T - 1) * sum_{j=1}^{T-1} (R[j-1, j] - b[j])

    The accuracy on each task just before training on it, relative to a freshly initialized
    model; uses the strict upper diagonal of ``R``. Returns ``0.0`` for ``T == 1`` (empty sum).

    Args:
        R: Accuracy matrix of shape ``(T, T)`` with entries in ``[0, 1]``.
        b: Accuracies of the freshly initialized model on each task, shape ``(T,)``.

    Returns:
        FWT as a float in ``[-1, 1]``.

    Raises:
        ValueError: If ``R`` or ``b`` is invalid or ``b`` does not have length ``T``.
    """
    R = validate_accuracy_matrix(R)
    T = R.shape[0]
    b = validate_baseline(b, T)
    if T == 1:
        return 0.0
    j = np.arange(1, T)
    return float(np.mean(R[j - 1, j] - b[j]))


def average_forgetting(R: npt.ArrayLike) -> float:
    """Average forgetting at the end of training (Chaudhry et al. 2018)::

        f_j = max_{l in [j, T-2]} R[l, j] - R[T-1, j]        for j = 0, ..., T-2
        F   = 1/(T - 1) * sum_{j=0}^{T-2} f_j

    ``f_j`` is the drop from the best accuracy task ``j`` ever had while it was already learned
    (rows ``l >= j``, excluding the final row) to its final accuracy. Unlike BWT the reference is
    the maximum over those rows, not the diagonal ``R[j, j]``, so ``F >= -BWT``. ``f_j`` is not
    clipped: it is negative if the final accuracy exceeds every earlier one. The last task has
    no earlier row and is excluded. Returns ``0.0`` for ``T == 1`` (empty sum).

    Args:
        R: Accuracy matrix of shape ``(T, T)`` with entries in ``[0, 1]``.

    Returns:
        Average forgetting as a float in ``[-1, 1]``.

    Raises:
        ValueError: If ``R`` is invalid.
    """
    R = validate_accuracy_matrix(R)
    T = R.shape[0]
    if T == 1:
        return 0.0
    f = [np.max(R[j : T - 1, j]) - R[T - 1, j] for j in range(T - 1)]
    return float(np.mean(f))


def average_incremental_accuracy(R: npt.ArrayLike) -> float:
    """Average incremental accuracy (Rebuffi et al. 2017)::

        AIA = 1/T * sum_{i=0}^{T-1} ACC_i,   ACC_i = 1/(i + 1) * sum_{j=0}^{i} R[i, j]

    The mean of :func:`average_accuracy` after each task, i.e. the area under the
    seen-tasks accuracy curve.

    Args:
        R: Accuracy matrix of shape ``(T, T)`` with entries in ``[0, 1]``.

    Returns:
        AIA as a float in ``[0, 1]``.

    Raises:
        ValueError: If ``R`` is invalid.
    """
    R = validate_accuracy_matrix(R)
    T = R.shape[0]
    return float(np.mean([np.mean(R[i, : i + 1]) for i in range(T)]))


def summarize(R: npt.ArrayLike, b: npt.ArrayLike | None = None) -> dict[str, float | None]:
    """All standard metrics of an accuracy matrix.

    Args:
        R: Accuracy matrix of shape ``(T, T)`` with entries in ``[0, 1]``.
        b: Optional accuracies of the freshly initialized model, shape ``(T,)``. Forward transfer
            needs it.

    Returns:
        A dict of Python floats::

            acc                 = average_accuracy(R)          (final-row ACC)
            bwt                 = backward_transfer(R)
            fwt                 = forward_transfer(R, b), or None when b is None
            forgetting          = average_forgetting(R)
            avg_incremental_acc = average_incremental_accuracy(R)

    Raises:
        ValueError: If ``R`` or ``b`` is invalid.
    """
    R = validate_accuracy_matrix(R)
    if b is not None:
        b = validate_baseline(b, R.shape[0])
    return {
        "acc": average_accuracy(R),
        "bwt": backward_transfer(R),
        "fwt": None if b is None else forward_transfer(R, b),
        "forgetting": average_forgetting(R),
        "avg_incremental_acc": average_incremental_accuracy(R),
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
