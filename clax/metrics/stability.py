"""Continual-evaluation metrics of the stability gap, from per-iteration accuracy curves.

Task-end metrics (ACC, BWT, forgetting; :mod:`clax.metrics.continual`) look at the model only
when a task has finished. Continual evaluation (De Lange, van de Ven and Tuytelaars, ICLR 2023)
evaluates every seen task every ``ρ`` training steps on a fixed subsample of its test set and
reveals the *stability gap*: a large, temporary drop of old-task accuracy right after each
task switch, invisible at task ends. This module computes the paper's metrics from those
curves (pure numpy).

Notation. The curves are points ``(step, train_task, eval_task, value)`` (the format of
:func:`clax.metrics.curves.normalize_curves`, as recorded by ``train_continual`` with
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
  identities.
* **WP^w** (windowed plasticity) has two definitions (``definition=`` of
  :func:`windowed_plasticity`):

  - ``"paper"`` (the default, summary key ``wp_<w>``): the paper's text, "WP^w is the same
    with A_j − A_i", i.e. the largest gain between any two evaluations of a window::

        WP^w = 1/|E| * sum_i max(0, max_{m < m' <= m + w - 1} A_i(m') - A_i(m))

  - ``"official"`` (summary key ``wp_official_<w>``): what the official code computes. Its
    ``WindowedPlasticityPluginMetric`` subclasses the forgetting metric and only flips the
    sign of ``delta``; the forgetting metric's shortcut "skip a start value below the running
    maximum of the window" (exact for drops) is kept, so a gain is only measured *from a
    value that is at least every earlier value of the same window*. With the deque
    ``D_e = (A_i(s), ..., A_i(e))``, ``s = max(0, e - w + 1)``, held after evaluation ``e``::

        g(D_e) = max { A_i(m') - A_i(m) : s <= m < m' <= e,  A_i(m) >= max_{s <= l < m} A_i(l) }
        WP_official^w = 1/|E| * sum_i max(0, max_e g(D_e))

    On ``A = (0.9, 0.4, 0.95)``, ``w = 3``: the paper gives ``0.95 - 0.4 = 0.55``, the official
    code ``0.95 - 0.9 = 0.05`` (0.4 is below the running maximum 0.9, so it is never a
    start). ``WP_official <= WP_paper`` always.

  WF has no such discrepancy: for drops the best start of each pair is a running maximum
  anyway, so the official deque algorithm and the formula agree exactly
  (``windowed_forgetting(..., definition="official")`` computes the deque version and equals
  the default).

min-ACC, WC-ACC and WF follow the official implementation (``mattdl/ContinualEvaluation``,
``src/eval/continual_eval_metrics.py``: ``TaskTrackingMINAccuracyPluginMetric``,
``WCACCPluginMetric``, ``WindowedForgettingPluginMetric``, ``WindowedPlasticityPluginMetric``):
per-task minima are updated at every evaluation in which the task is not the current one, a
per-task deque of the last ``w`` accuracies feeds a running maximum that starts at 0, and the
task-wise values are averaged. ``w`` counts *evaluations* (``w * ρ`` training steps); the paper
reports ``w = 10`` and ``w = 100``.

Metric direction. The curves may hold a metric for which lower is better (a loss): pass
``higher_is_better=False``. With ``s = +1`` (higher is better) or ``-1``, every metric is
computed on ``s * A`` (so "best" is always a maximum, "worst" a minimum): min-ACC and WC-ACC
are level metrics, reported back in the metric's units (``s * f(s * A)``: for a loss, min-ACC
averages each earlier task's *largest* loss), WF and WP are differences, reported as computed
on ``s * A`` (for a loss, WF is the largest *increase* of the loss within a window). Values must
be fractions in ``[0, 1]`` when higher is better and finite otherwise. The keys keep their
accuracy names (``min_acc``, ``wc_acc``, ``current_acc``, ...).

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

from clax.metrics.continual import direction
from clax.metrics.curves import normalize_curves

__all__ = [
    "DEFAULT_WINDOWS",
    "WINDOWED_DEFINITIONS",
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
# Definitions of the windowed metrics: the paper's formula, the official code's deque algorithm.
WINDOWED_DEFINITIONS = ("paper", "official")
# Rows (deque states) processed at once by the vectorized official algorithm.
_CHUNK_ROWS = 4096


@dataclasses.dataclass(frozen=True)
class EvaluationGrid:
    """Curves as a dense table: one row per evaluation, one column per task.

    Attributes:
        steps: ``(N,)`` int64, the training step of each evaluation, strictly increasing.
        train_task: ``(N,)`` int64, the task being trained at each evaluation (``k(n)``).
        accuracy: ``(N, T)`` float64 values of the metric as given (accuracy fractions, or a
            loss: the grid is not oriented); NaN where task ``j`` was not evaluated.
    """

    steps: np.ndarray
    train_task: np.ndarray
    accuracy: np.ndarray

    @property
    def num_evaluations(self) -> int:
        return int(self.steps.shape[0])

    @property
    def values(self) -> np.ndarray:
        """``accuracy`` under a metric-neutral name."""
        return self.accuracy


def evaluation_grid(
    curves: Iterable[Any] | EvaluationGrid, *, higher_is_better: bool = True
) -> EvaluationGrid:
    """Validates curve points and arranges them by evaluation step and task.

    Args:
        curves: Points ``(step, train_task, eval_task, value)`` as dicts or 4-tuples (see
            :func:`clax.metrics.curves.normalize_curves`), in any order, or an
            :class:`EvaluationGrid` (returned as is).
        higher_is_better: Only selects the validation of the values: fractions in ``[0, 1]``
            when True, finite numbers when False. The grid stores the values as given.

    Returns:
        The :class:`EvaluationGrid`; ``T`` is one more than the largest task index seen.

    Raises:
        ValueError: If a point is malformed, there are no points, the points of one step name
            different training tasks, or a task is evaluated twice at the same step.
    """
    if isinstance(curves, EvaluationGrid):
        return curves
    direction(higher_is_better)  # checks the type
    points = normalize_curves(curves, bounded=bool(higher_is_better))
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


def _running_minima(values: np.ndarray, train_task: np.ndarray) -> np.ndarray:
    """``(N, T)``: min of ``values[:, i]`` over evaluations ``<= n`` where ``i`` is learned and
    not current (NaN while there is none)."""
    num_tasks = values.shape[1]
    learned_upto = np.maximum.accumulate(train_task)
    tasks = np.arange(num_tasks)
    eligible = (
        ~np.isnan(values)
        & (tasks[None, :] != train_task[:, None])
        & (tasks[None, :] <= learned_upto[:, None])
    )
    minima = np.minimum.accumulate(np.where(eligible, values, np.inf), axis=0)
    return np.where(np.isinf(minima), np.nan, minima)


def tracking_metrics(
    curves: Iterable[Any] | EvaluationGrid, *, higher_is_better: bool = True
) -> dict[str, np.ndarray]:
    """min-ACC and WC-ACC after every evaluation (the running values of the paper's plots).

    Computed on ``s * A`` and reported back in the metric's units (``s * f(s * A)``; see the
    module docstring), so for a loss ``min_acc`` averages the earlier tasks' largest losses.

    Args:
        curves: Curve points or an :class:`EvaluationGrid`.
        higher_is_better: False for a loss-like metric.

    Returns:
        A dict of ``(N,)`` float64 arrays: ``step``, ``current_acc`` (the metric of the current
        training task), ``min_acc`` (NaN while no earlier task has an eligible evaluation) and
        ``wc_acc`` (NaN when the current task is not evaluated at that step).

    Raises:
        ValueError: If the curves are malformed (see :func:`evaluation_grid`).
    """
    s = direction(higher_is_better)
    grid = evaluation_grid(curves, higher_is_better=higher_is_better)
    oriented = s * grid.accuracy
    minima = _running_minima(oriented, grid.train_task)
    n_idx = np.arange(grid.num_evaluations)
    k = grid.train_task
    others = minima.copy()
    others[n_idx, k] = np.nan  # min-ACC excludes the current task
    have = ~np.isnan(others)
    count = have.sum(axis=1)
    total = np.where(have, others, 0.0).sum(axis=1)
    min_acc = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    current = oriented[n_idx, k]
    wc_acc = (current + total) / (1 + count)  # mean([A_k] + minima of the k - 1 others)
    return {
        "step": grid.steps.astype(np.float64),
        "current_acc": grid.accuracy[n_idx, k],
        "min_acc": s * min_acc,
        "wc_acc": s * wc_acc,
    }


def _final(value: float) -> float | None:
    return None if np.isnan(value) else float(value)


def min_accuracy(
    curves: Iterable[Any] | EvaluationGrid, *, higher_is_better: bool = True
) -> float | None:
    """min-ACC at the last evaluation (see the module docstring).

    Args:
        curves: Curve points or an :class:`EvaluationGrid`.
        higher_is_better: False for a loss-like metric: then the worst value of a task is its
            maximum, and this averages the earlier tasks' largest losses.

    Returns:
        The average over previously learned tasks of their worst value since they were
        learned (the minimum accuracy, as a fraction); None when no earlier task was evaluated
        after being learned (e.g. a single task).

    Raises:
        ValueError: If the curves are malformed.
    """
    return _final(tracking_metrics(curves, higher_is_better=higher_is_better)["min_acc"][-1])


def worst_case_accuracy(
    curves: Iterable[Any] | EvaluationGrid, *, higher_is_better: bool = True
) -> float | None:
    """WC-ACC at the last evaluation: ``1/k * A_k + (1 - 1/k) * min-ACC``.

    Args:
        curves: Curve points or an :class:`EvaluationGrid`.
        higher_is_better: False for a loss-like metric (see :func:`min_accuracy`).

    Returns:
        WC-ACC in the metric's units; equals the current task's value when there is no earlier
        task; None when the current task is not evaluated at the last step.

    Raises:
        ValueError: If the curves are malformed.
    """
    return _final(tracking_metrics(curves, higher_is_better=higher_is_better)["wc_acc"][-1])


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


def _check_definition(definition: Any) -> str:
    if definition not in WINDOWED_DEFINITIONS:
        raise ValueError(
            f"definition must be one of {WINDOWED_DEFINITIONS}, got {definition!r}"
        )
    return definition


def _paper_max_change(a: np.ndarray, w: int, gain: bool) -> float:
    """``max(0, max_{m < m' <= m + w - 1} d(a[m], a[m']))``, ``d`` the drop or the gain."""
    best = 0.0
    for lag in range(1, min(w, a.size)):
        d = a[lag:] - a[:-lag] if gain else a[:-lag] - a[lag:]
        best = max(best, float(np.max(d)))
    return best


def _official_max_change(a: np.ndarray, w: int, gain: bool) -> float:
    """The official deque algorithm (``max_consec_delta_from_window`` + running max from 0).

    For one deque ``D`` only start values that are at least every earlier value of ``D`` are
    paired with the later ones. For a fixed start of the deque its value can only grow as the
    deque grows, so the running maximum over the deque states equals the maximum over the
    windows of ``min(w, len(a))`` consecutive values (the states once the deque is full, or the
    whole sequence when it never fills); those are the rows below.
    """
    length = min(w, a.size)
    if length < 2:
        return 0.0  # a deque of one value gives 0
    rows = np.lib.stride_tricks.sliding_window_view(a, length)
    best = 0.0
    for r in range(0, rows.shape[0], _CHUNK_ROWS):
        x = rows[r : r + _CHUNK_ROWS]
        running_max = np.maximum.accumulate(x, axis=1)
        is_start = np.ones(x.shape, bool)
        is_start[:, 1:] = x[:, 1:] >= running_max[:, :-1]  # `if val < max_found_acc: continue`
        if gain:  # later[:, i] = max(x[:, i + 1:]): the best partner of start i
            later = np.maximum.accumulate(x[:, ::-1], axis=1)[:, ::-1][:, 1:]
            delta = later - x[:, :-1]
        else:
            later = np.minimum.accumulate(x[:, ::-1], axis=1)[:, ::-1][:, 1:]
            delta = x[:, :-1] - later
        delta = np.where(is_start[:, :-1], delta, -np.inf)
        best = max(best, float(np.max(delta)))
    return best


def _windowed_max_change(
    grid: EvaluationGrid, window: Any, *, gain: bool, definition: Any, sign: float
) -> float:
    w = _check_window(window, grid.num_evaluations)
    fn = _paper_max_change if _check_definition(definition) == "paper" else _official_max_change
    per_task = []
    for j in range(grid.accuracy.shape[1]):
        a = grid.accuracy[:, j]
        a = sign * a[~np.isnan(a)]  # task j's own (oriented) sequence of evaluations
        if a.size:
            per_task.append(fn(a, w, gain))
    return float(np.mean(per_task))


def windowed_forgetting(
    curves: Iterable[Any] | EvaluationGrid,
    window: int,
    *,
    definition: str = "paper",
    higher_is_better: bool = True,
) -> float:
    """WF^w: the largest drop within ``window`` consecutive evaluations, task-averaged.

    ``WF^w = 1/|E| sum_i max(0, max_{m < m' <= m + w - 1} X_i(m) - X_i(m'))`` on the oriented
    values ``X = s * A`` (module docstring). Both definitions give the same value: for drops
    the official code's running-maximum shortcut is exact.

    Args:
        curves: Curve points or an :class:`EvaluationGrid`.
        window: ``w``, a number of evaluations (``w * ρ`` training steps), ``2 <= w <= N``.
        definition: ``"paper"`` (all pairs of a window, vectorized by lag) or ``"official"``
            (the official deque algorithm); equal results.
        higher_is_better: False for a loss-like metric: then WF is the largest loss increase.

    Returns:
        WF^w, ``>= 0`` (in ``[0, 1]`` for accuracies).

    Raises:
        ValueError: If the curves are malformed, ``window`` is not an int in ``[2, N]``
            (``N`` evaluations), or ``definition`` is unknown.
    """
    s = direction(higher_is_better)
    grid = evaluation_grid(curves, higher_is_better=higher_is_better)
    return _windowed_max_change(grid, window, gain=False, definition=definition, sign=s)


def windowed_plasticity(
    curves: Iterable[Any] | EvaluationGrid,
    window: int,
    *,
    definition: str = "paper",
    higher_is_better: bool = True,
) -> float:
    """WP^w: the largest gain within ``window`` consecutive evaluations, task-averaged.

    On the oriented values ``X = s * A`` (see the module docstring for both formulas):

    * ``definition="paper"`` (default; the paper's text, De Lange et al. 2023: "WP^w is the
      same with A_j − A_i"): ``max(0, max_{m < m' <= m + w - 1} X_i(m') - X_i(m))``, the gain
      between any two evaluations of a window.
    * ``definition="official"`` (the official ``WindowedPlasticityPluginMetric``): gains are
      only measured from a start value that is at least every earlier value of the deque, so
      a gain after a dip is measured from the value before the dip. Never above the paper's.

    On ``A = (0.9, 0.4, 0.95)`` with ``w = 3``: paper 0.55, official 0.05.

    Args:
        curves: Curve points or an :class:`EvaluationGrid`.
        window: ``w``, a number of evaluations, ``2 <= w <= N``.
        definition: ``"paper"`` or ``"official"``.
        higher_is_better: False for a loss-like metric: then WP is the largest loss decrease.

    Returns:
        WP^w, ``>= 0`` (in ``[0, 1]`` for accuracies).

    Raises:
        ValueError: As :func:`windowed_forgetting`.
    """
    s = direction(higher_is_better)
    grid = evaluation_grid(curves, higher_is_better=higher_is_better)
    return _windowed_max_change(grid, window, gain=True, definition=definition, sign=s)


def stability_summary(
    curves: Iterable[Any] | EvaluationGrid,
    windows: Sequence[int] = DEFAULT_WINDOWS,
    *,
    higher_is_better: bool = True,
) -> dict[str, float | None]:
    """All stability-gap metrics of a run, for its ``metrics.json`` summary.

    Args:
        curves: Curve points or an :class:`EvaluationGrid`.
        windows: Window sizes ``w`` (evaluations) for WF^w and WP^w.
        higher_is_better: False for a loss-like metric (see the module docstring).

    Returns:
        ``{"min_acc", "wc_acc", and for each w "wf_<w>", "wp_<w>", "wp_official_<w>"}``, floats
        or None: ``wp_<w>`` is the paper's definition of WP^w, ``wp_official_<w>`` the official
        code's (:func:`windowed_plasticity`). ``wf_<w>``/``wp_<w>``/``wp_official_<w>`` are
        None when the run has fewer than ``w`` evaluations (a summary of a short run still
        succeeds; :func:`windowed_forgetting` raises instead).

    Raises:
        ValueError: If the curves are malformed or a window is not an int >= 2.
    """
    s = direction(higher_is_better)
    grid = evaluation_grid(curves, higher_is_better=higher_is_better)
    tracked = tracking_metrics(grid, higher_is_better=higher_is_better)
    out: dict[str, float | None] = {
        "min_acc": _final(tracked["min_acc"][-1]),
        "wc_acc": _final(tracked["wc_acc"][-1]),
    }
    if isinstance(windows, (str, bytes)) or not isinstance(windows, Sequence):
        raise ValueError(f"windows must be a sequence of ints, got {windows!r}")
    for window in windows:
        w = _window_size(window)
        fits = w <= grid.num_evaluations
        for key, gain, definition in (
            (f"wf_{w}", False, "paper"),
            (f"wp_{w}", True, "paper"),
            (f"wp_official_{w}", True, "official"),
        ):
            out[key] = (
                _windowed_max_change(grid, w, gain=gain, definition=definition, sign=s)
                if fits
                else None
            )
    return out
