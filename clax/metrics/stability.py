"""Continual-evaluation metrics of the stability gap, from per-iteration accuracy curves.

Task-end metrics (ACC, BWT, forgetting; :mod:`clax.metrics.continual`) look at the model only
when a task has finished. Continual evaluation (De Lange, van de Ven and Tuytelaars, ICLR 2023)
evaluates every seen task every ``ρ`` training steps on a fixed subsample of its test set and
reveals the *stability gap*: a large, temporary drop of old-task accuracy right after each
task switch, invisible at task ends. This module computes the paper's metrics from those
curves (pure numpy).

Notation. The curves are points ``(step, train_task, eval_task, accuracy)`` (the format of
:func:`clax.metrics.report.normalize_curves`, as recorded by ``train_continual`` with
``config.train.eval_every_steps = ρ``). Evaluation ``n = 0, ..., N-1`` is the ``n``-th distinct
step; ``k(n)`` its training ("current") task and ``A_i(n)`` the accuracy on task ``i``'s
evaluation set there. Task ``i`` counts as learned at ``n`` when ``i <= max_{n' <= n} k(n')``
(tasks are trained in index order; a recurring task keeps its index).

* **min-ACC** (average minimum accuracy) at the last evaluation, current task ``k``::

      min-ACC = 1/|P| * sum_{i in P} min { A_i(n) : i learned at n, k(n) != i }

  over the previously learned tasks ``P`` (``i != k`` with at least one such evaluation). It
  excludes the current task; for in-order streams this is the paper's
  ``1/(k-1) sum_{i<k} min_{|T_i| < n <= t} A(E_i, f_n)``.
* **WC-ACC** (worst-case accuracy)::

      WC-ACC = 1/k * A_k(t) + (1 - 1/k) * min-ACC       (k = 1 + |P|)

  the current task's accuracy at the last evaluation weighted ``1/k``, the minima of the
  ``k - 1`` others ``1 - 1/k``. It lower-bounds the accuracy averaged over seen tasks.
* **WF^w** (windowed forgetting), averaged over every evaluated task ``i``::

      WF^w = 1/|E| * sum_i max(0, max_{m < m' <= m + w - 1} A_i(m) - A_i(m'))

  the largest drop within any ``w`` consecutive evaluations of task ``i`` (a running maximum
  over all windows, not the final window; 0 when the accuracy never drops). It needs no task
  identities. **WP^w** (windowed plasticity) is the same with ``A_i(m') - A_i(m)``: the
  largest gain.

These follow the official implementation (``mattdl/ContinualEvaluation``,
``src/eval/continual_eval_metrics.py``: ``TaskTrackingMINAccuracyPluginMetric``,
``WCACCPluginMetric``, ``WindowedForgettingPluginMetric``, ``WindowedPlasticityPluginMetric``):
per-task minima are updated at every evaluation in which the task is not the current one, a
per-task deque of the last ``w`` accuracies feeds a running maximum that starts at 0, and the
task-wise values are averaged. ``w`` counts *evaluations* (``w * ρ`` training steps); the paper
reports ``w = 10`` and ``w = 100``.

Reference:
    M. De Lange, G. M. van de Ven and T. Tuytelaars, "Continual evaluation for lifelong
    learning: Identifying the stability gap", ICLR 2023, arXiv:2205.13452.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from clax.metrics.report import normalize_curves

__all__ = [
    "DEFAULT_WINDOWS",
    "EvaluationGrid",
    "evaluation_grid",
    "min_accuracy",
    "stability_summary",
    "tracking_metrics",
    "windowed_forgetting",
    "windowed_plasticity",
    "worst_case_accuracy",
]

# The windows of the paper (in evaluations).
DEFAULT_WINDOWS = (10, 100)


@dataclasses.dataclass(frozen=True)
class EvaluationGrid:
    """Accuracy curves as a dense table: one row per evaluation, one column per task.

    Attributes:
        steps: ``(N,)`` int64, the training step of each evaluation, strictly increasing.
        train_task: ``(N,)`` int64, the task being trained at each evaluation (``k(n)``).
        accuracy: ``(N, T)`` float64 fractions; NaN where task ``j`` was not evaluated.
    """

    steps: np.ndarray
    train_task: np.ndarray
    accuracy: np.ndarray

    @property
    def num_evaluations(self) -> int:
        return int(self.steps.shape[0])


def evaluation_grid(curves: Iterable[Any] | EvaluationGrid) -> EvaluationGrid:
    """Validates accuracy-curve points and arranges them by evaluation step and task.

    Args:
        curves: Points ``(step, train_task, eval_task, accuracy)`` as dicts or 4-tuples (see
            :func:`clax.metrics.report.normalize_curves`), in any order, or an
            :class:`EvaluationGrid` (returned as is).

    Returns:
        The :class:`EvaluationGrid`; ``T`` is one more than the largest task index seen.

    Raises:
        ValueError: If a point is malformed, there are no points, the points of one step name
            different training tasks, or a task is evaluated twice at the same step.
    """
    if isinstance(curves, EvaluationGrid):
        return curves
    points = normalize_curves(curves)
    if not points:
        raise ValueError("curves must contain at least one evaluation point")
    steps = sorted({p[0] for p in points})
    row = {s: n for n, s in enumerate(steps)}
    num_tasks = 1 + max(max(p[1], p[2]) for p in points)
    acc = np.full((len(steps), num_tasks), np.nan)
    train = np.full(len(steps), -1, np.int64)
    for step, train_task, eval_task, a in points:
        n = row[step]
        if train[n] not in (-1, train_task):
            raise ValueError(
                f"curves name two training tasks ({train[n]} and {train_task}) at step {step}; "
                "every evaluation has one current task"
            )
        if not np.isnan(acc[n, eval_task]):
            raise ValueError(f"task {eval_task} is evaluated twice at step {step}")
        train[n] = train_task
        acc[n, eval_task] = a
    return EvaluationGrid(steps=np.asarray(steps, np.int64), train_task=train, accuracy=acc)


def _running_minima(grid: EvaluationGrid) -> np.ndarray:
    """``(N, T)``: min of ``A_i`` over evaluations ``<= n`` where ``i`` is learned, not current."""
    num_tasks = grid.accuracy.shape[1]
    learned_upto = np.maximum.accumulate(grid.train_task)
    tasks = np.arange(num_tasks)
    eligible = (
        ~np.isnan(grid.accuracy)
        & (tasks[None, :] != grid.train_task[:, None])
        & (tasks[None, :] <= learned_upto[:, None])
    )
    values = np.where(eligible, grid.accuracy, np.inf)
    minima = np.minimum.accumulate(values, axis=0)
    return np.where(np.isinf(minima), np.nan, minima)


def tracking_metrics(curves: Iterable[Any] | EvaluationGrid) -> dict[str, np.ndarray]:
    """min-ACC and WC-ACC after every evaluation (the running values of the paper's plots).

    Args:
        curves: Accuracy-curve points or an :class:`EvaluationGrid`.

    Returns:
        A dict of ``(N,)`` float64 arrays: ``step``, ``current_acc`` (accuracy of the current
        training task), ``min_acc`` (NaN while no earlier task has an eligible evaluation) and
        ``wc_acc`` (NaN when the current task is not evaluated at that step).

    Raises:
        ValueError: If the curves are malformed (see :func:`evaluation_grid`).
    """
    grid = evaluation_grid(curves)
    minima = _running_minima(grid)
    n_idx = np.arange(grid.num_evaluations)
    k = grid.train_task
    others = minima.copy()
    others[n_idx, k] = np.nan  # min-ACC excludes the current task
    have = ~np.isnan(others)
    count = have.sum(axis=1)
    total = np.where(have, others, 0.0).sum(axis=1)
    min_acc = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    current = grid.accuracy[n_idx, k]
    wc_acc = (current + total) / (1 + count)  # mean([A_k] + minima of the k - 1 others)
    return {
        "step": grid.steps.astype(np.float64),
        "current_acc": current,
        "min_acc": min_acc,
        "wc_acc": wc_acc,
    }


def _final(value: float) -> float | None:
    return None if np.isnan(value) else float(value)


def min_accuracy(curves: Iterable[Any] | EvaluationGrid) -> float | None:
    """min-ACC at the last evaluation (see the module docstring).

    Args:
        curves: Accuracy-curve points or an :class:`EvaluationGrid`.

    Returns:
        The average over previously learned tasks of their minimum accuracy since they were
        learned, as a fraction; None when no earlier task was evaluated after being learned
        (e.g. a single task).

    Raises:
        ValueError: If the curves are malformed.
    """
    return _final(tracking_metrics(curves)["min_acc"][-1])


def worst_case_accuracy(curves: Iterable[Any] | EvaluationGrid) -> float | None:
    """WC-ACC at the last evaluation: ``1/k * A_k + (1 - 1/k) * min-ACC``.

    Args:
        curves: Accuracy-curve points or an :class:`EvaluationGrid`.

    Returns:
        WC-ACC as a fraction; equals the current task's accuracy when there is no earlier task;
        None when the current task is not evaluated at the last step.

    Raises:
        ValueError: If the curves are malformed.
    """
    return _final(tracking_metrics(curves)["wc_acc"][-1])


def _window_size(window: Any) -> int:
    if isinstance(window, bool) or not isinstance(window, numbers.Integral):
        raise ValueError(f"window must be an int (a number of evaluations), got {window!r}")
    w = int(window)
    if w < 2:
        raise ValueError(f"window must be >= 2 evaluations (a drop needs two), got {w}")
    return w


def _check_window(window: Any, num_evaluations: int) -> int:
    w = _window_size(window)
    if w > num_evaluations:
        raise ValueError(
            f"window={w} is larger than the {num_evaluations} evaluations in the curves; "
            "use a smaller window or evaluate more often (smaller eval_every_steps)"
        )
    return w


def _windowed_max_change(grid: EvaluationGrid, window: Any, sign: float) -> float:
    w = _check_window(window, grid.num_evaluations)
    per_task = []
    for j in range(grid.accuracy.shape[1]):
        a = grid.accuracy[:, j]
        a = a[~np.isnan(a)]  # task j's own sequence of evaluations (its deque)
        if a.size == 0:
            continue
        best = 0.0  # the official running maximum starts at 0
        for lag in range(1, min(w, a.size)):
            best = max(best, float(np.max(sign * (a[:-lag] - a[lag:]))))
        per_task.append(best)
    return float(np.mean(per_task))


def windowed_forgetting(curves: Iterable[Any] | EvaluationGrid, window: int) -> float:
    """WF^w: the largest accuracy drop within ``window`` consecutive evaluations, task-averaged.

    Args:
        curves: Accuracy-curve points or an :class:`EvaluationGrid`.
        window: ``w``, a number of evaluations (``w * ρ`` training steps), ``2 <= w <= N``.

    Returns:
        WF^w as a fraction in ``[0, 1]``.

    Raises:
        ValueError: If the curves are malformed, or ``window`` is not an int in ``[2, N]``
            (``N`` evaluations).
    """
    return _windowed_max_change(evaluation_grid(curves), window, 1.0)


def windowed_plasticity(curves: Iterable[Any] | EvaluationGrid, window: int) -> float:
    """WP^w: the largest accuracy gain within ``window`` consecutive evaluations, task-averaged.

    Args:
        curves: Accuracy-curve points or an :class:`EvaluationGrid`.
        window: ``w``, a number of evaluations, ``2 <= w <= N``.

    Returns:
        WP^w as a fraction in ``[0, 1]``.

    Raises:
        ValueError: As :func:`windowed_forgetting`.
    """
    return _windowed_max_change(evaluation_grid(curves), window, -1.0)


def stability_summary(
    curves: Iterable[Any] | EvaluationGrid, windows: Sequence[int] = DEFAULT_WINDOWS
) -> dict[str, float | None]:
    """All stability-gap metrics of a run, for its ``metrics.json`` summary.

    Args:
        curves: Accuracy-curve points or an :class:`EvaluationGrid`.
        windows: Window sizes ``w`` (evaluations) for WF^w and WP^w.

    Returns:
        ``{"min_acc", "wc_acc", "wf_<w>", "wp_<w>" for each w}``, fractions or None.
        ``wf_<w>``/``wp_<w>`` are None when the run has fewer than ``w`` evaluations (a summary
        of a short run still succeeds; :func:`windowed_forgetting` raises instead).

    Raises:
        ValueError: If the curves are malformed or a window is not an int >= 2.
    """
    grid = evaluation_grid(curves)
    tracked = tracking_metrics(grid)
    out: dict[str, float | None] = {
        "min_acc": _final(tracked["min_acc"][-1]),
        "wc_acc": _final(tracked["wc_acc"][-1]),
    }
    if isinstance(windows, (str, bytes)) or not isinstance(windows, Sequence):
        raise ValueError(f"windows must be a sequence of ints, got {windows!r}")
    for window in windows:
        w = _window_size(window)
        fits = w <= grid.num_evaluations
        out[f"wf_{w}"] = windowed_forgetting(grid, w) if fits else None
        out[f"wp_{w}"] = windowed_plasticity(grid, w) if fits else None
    return out
