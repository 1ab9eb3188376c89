"""PNG plots of continual-learning results.

Figures are built with ``matplotlib.figure.Figure`` and rendered by ``FigureCanvasAgg``; pyplot
is never imported, so no display or global backend selection is needed, and no figure is
registered in pyplot's global figure manager. matplotlib itself is imported lazily, on the first
plot, so importing :mod:`clax.metrics` stays cheap.

Every function validates its input, creates the parent directories of ``path``, writes the PNG
atomically (see :func:`clax.metrics.io.atomic_write_bytes`), releases the figure and returns
``path`` as a ``pathlib.Path``.

Metric direction. The matrix and curve plots take ``metric`` (its name, used in the labels) and
``higher_is_better``. Accuracies (``higher_is_better=True``) are fractions plotted in percent on
a fixed ``[0, 100]`` scale; a lower-is-better metric (a loss) is plotted in its own units on the
range of the data, with the heatmap's colour map reversed so that better is brighter in both.

Layering: this module imports :mod:`clax.metrics.continual`, :mod:`clax.metrics.curves` and
:mod:`clax.metrics.io`, never :mod:`clax.metrics.report` (which imports this one).
"""

from __future__ import annotations

import io
import math
import numbers
import pathlib
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from clax.metrics import continual
from clax.metrics.curves import normalize_curves
from clax.metrics.io import PathLike, atomic_write_bytes

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "plot_accuracy_curves",
    "plot_accuracy_matrix",
    "plot_comparison",
    "plot_curve_comparison",
]

_DPI = 120
# Metrics stored as fractions, plotted in percent (or percentage points).
_PERCENT_METRICS = {
    "acc": "ACC (%)",
    "avg_incremental_acc": "average incremental accuracy (%)",
    "bwt": "BWT (pp)",
    "fwt": "FWT (pp)",
    "forgetting": "Forgetting (pp)",
}
# Beyond this many tasks the heatmap cells are too small for readable numbers.
_MAX_ANNOTATED_TASKS = 30


def _new_figure(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: PathLike) -> pathlib.Path:
    try:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=_DPI, bbox_inches="tight", pad_inches=0.1)
        return atomic_write_bytes(path, buf.getvalue())
    finally:
        fig.clear()


def _check_title(title: Any) -> None:
    if title is not None and not isinstance(title, str):
        raise ValueError(f"title must be a str or None, got {title!r}")


def _check_boundaries(task_boundaries: Any) -> list[float]:
    if isinstance(task_boundaries, (str, bytes)) or not isinstance(task_boundaries, Iterable):
        raise ValueError(f"task_boundaries must be an iterable of steps, got {task_boundaries!r}")
    boundaries = list(task_boundaries)
    for k, s in enumerate(boundaries):
        if isinstance(s, bool) or not isinstance(s, numbers.Real) or not math.isfinite(s):
            raise ValueError(f"task_boundaries[{k}] must be a finite number, got {s!r}")
    return [float(s) for s in boundaries]


def _check_metric(metric: Any, higher_is_better: Any) -> bool:
    """``bounded`` (accuracy-like fractions) after checking ``metric`` and the direction."""
    if not isinstance(metric, str) or not metric:
        raise ValueError(f"metric must be a non-empty str, got {metric!r}")
    continual.direction(higher_is_better)
    return bool(higher_is_better)


def plot_accuracy_matrix(
    R: npt.ArrayLike,
    path: PathLike,
    *,
    title: str | None = None,
    task_labels: Sequence[str] | None = None,
    metric: str = "accuracy",
    higher_is_better: bool = True,
) -> pathlib.Path:
    """Heatmap of the metric matrix, each cell annotated (accuracies as ``100 * R[i, j]`` %).

    Row ``i`` is "after task i" (the model after training on task ``i``), column ``j`` is
    "task j" (the evaluated task). For accuracies the colour scale is fixed to ``[0, 100]`` %
    so plots of different runs are comparable; a lower-is-better metric is shown in its own
    units on the range of ``R`` with the colour map reversed (better is brighter). Cells are
    annotated for ``T <= 30``.

    Args:
        R: Metric matrix of shape ``(T, T)``: fractions in ``[0, 1]`` when
            ``higher_is_better``, any finite values otherwise.
        path: Output PNG file; parent directories are created.
        title: Optional figure title.
        task_labels: Optional ``T`` task names used instead of ``"task j"``; rows are labelled
            ``"after <label>"``.
        metric: Name of the metric, for the colour-bar label.
        higher_is_better: False for a loss-like metric.

    Returns:
        ``path`` as a ``pathlib.Path``.

    Raises:
        ValueError: If ``R`` is invalid, ``title`` is not a str, ``task_labels`` is not a
            sequence of ``T`` strings, or ``metric`` is not a non-empty str.
    """
    bounded = _check_metric(metric, higher_is_better)
    R = continual.validate_metric_matrix(R, bounded=bounded)
    T = R.shape[0]
    _check_title(title)
    if task_labels is None:
        labels = [f"task {j}" for j in range(T)]
    else:
        if (
            isinstance(task_labels, str)
            or not isinstance(task_labels, Sequence)
            or len(task_labels) != T
            or not all(isinstance(s, str) for s in task_labels)
        ):
            raise ValueError(f"task_labels must be a sequence of {T} str, got {task_labels!r}")
        labels = list(task_labels)

    if bounded:
        shown, vmin, vmax, cmap, label = 100.0 * R, 0.0, 100.0, "viridis", f"{metric} (%)"
    else:
        lo, hi = float(np.min(R)), float(np.max(R))
        pad = 0.5 if hi == lo else 0.0
        shown, vmin, vmax, cmap, label = R, lo - pad, hi + pad, "viridis_r", metric
    side = min(max(4.0, 0.6 * T + 2.0), 20.0)
    fig = _new_figure(side + 1.2, side)
    ax = fig.add_subplot()
    im = ax.imshow(shown, vmin=vmin, vmax=vmax, cmap=cmap, aspect="equal")
    fig.colorbar(im, ax=ax, label=label, shrink=0.8)
    if T > 5:
        ax.set_xticks(range(T), labels=labels, rotation=45, ha="right")
    else:
        ax.set_xticks(range(T), labels=labels)
    ax.set_yticks(range(T), labels=[f"after {s}" for s in labels])
    ax.set_xlabel("evaluated task")
    ax.set_ylabel("trained up to")
    if T <= _MAX_ANNOTATED_TASKS:
        fontsize = max(5.0, min(10.0, 100.0 / T))
        for i in range(T):
            for j in range(T):
                v = shown[i, j]
                # Brightness of the cell in [0, 1] (viridis is bright at its top end).
                level = (v - vmin) / (vmax - vmin)
                bright = level > 0.6 if bounded else level < 0.4
                ax.text(
                    j,
                    i,
                    f"{v:.1f}" if bounded else f"{v:.3g}",
                    ha="center",
                    va="center",
                    fontsize=fontsize,
                    color="black" if bright else "white",
                )
    if title:
        ax.set_title(title)
    return _save(fig, path)


def plot_accuracy_curves(
    curves: Iterable[Any],
    path: PathLike,
    *,
    task_boundaries: Iterable[float] = (),
    title: str | None = None,
    metric: str = "accuracy",
    higher_is_better: bool = True,
) -> pathlib.Path:
    """The metric against training step, one line per evaluated task.

    Accuracies (``higher_is_better``) are plotted in percent on ``[0, 100]``; a lower-is-better
    metric in its own units. The y-label is the metric's name. Vertical dashed lines mark
    ``task_boundaries``, the steps at which each new task started.

    Args:
        curves: Points as dicts or 4-tuples ``(step, train_task, eval_task, value)``; see
            :func:`clax.metrics.curves.normalize_curves`. Must be non-empty.
        path: Output PNG file; parent directories are created.
        task_boundaries: Steps where a new task started.
        title: Optional figure title.
        metric: Name of the metric (points naming another metric are rejected).
        higher_is_better: False for a loss-like metric (values need only be finite).

    Returns:
        ``path`` as a ``pathlib.Path``.

    Raises:
        ValueError: If ``curves`` is empty or malformed, a boundary is not a finite number,
            ``title`` is not a str, or ``metric`` is not a non-empty str.
    """
    bounded = _check_metric(metric, higher_is_better)
    points = normalize_curves(curves, bounded=bounded, metric=metric)
    if not points:
        raise ValueError("curves must contain at least one point")
    _check_title(title)
    boundaries = _check_boundaries(task_boundaries)

    by_task: dict[int, list[tuple[int, float]]] = {}
    for step, _, eval_task, value in points:
        by_task.setdefault(eval_task, []).append((step, value))

    scale = 100.0 if bounded else 1.0
    fig = _new_figure(8.0, 4.5)
    ax = fig.add_subplot()
    marker = "." if max(len(v) for v in by_task.values()) <= 50 else None
    for eval_task in sorted(by_task):
        series = sorted(by_task[eval_task])
        steps = np.array([s for s, _ in series])
        values = scale * np.array([v for _, v in series])
        ax.plot(steps, values, label=f"task {eval_task}", marker=marker)
    for s in boundaries:
        ax.axvline(float(s), color="gray", linestyle="--", linewidth=1.0, alpha=0.8)
    if bounded:
        ax.set_ylim(-2.0, 102.0)
    ax.set_xlabel("training step")
    ax.set_ylabel(f"{metric} (%)" if bounded else metric)
    ax.grid(True, alpha=0.3)
    ax.legend(title="evaluated", fontsize="small", ncols=max(1, math.ceil(len(by_task) / 10)))
    if title:
        ax.set_title(title)
    return _save(fig, path)


def plot_comparison(
    runs: Sequence[Mapping[str, Any]],
    path: PathLike,
    *,
    metric: str = "acc",
) -> pathlib.Path:
    """Grouped bar chart of one metric: a group per benchmark, a bar per method.

    Uses the same dicts as :func:`clax.metrics.report.results_table` (keys ``benchmark``,
    ``method`` and ``metric``). Groups and bars keep the order of first appearance. Fraction
    metrics (``acc``, ``avg_incremental_acc``, ``bwt``, ``fwt``, ``forgetting``) are plotted as
    ``100 * value`` (percent / percentage points); any other numeric key (e.g.
    ``train_time_s``) is plotted as is. Runs whose value is ``None`` or missing get no bar.

    Args:
        runs: Sequence of mappings, at most one per (benchmark, method) pair.
        path: Output PNG file; parent directories are created.
        metric: Key of the value to plot.

    Returns:
        ``path`` as a ``pathlib.Path``.

    Raises:
        ValueError: If ``runs`` is empty or not a sequence of mappings, a run lacks
            ``benchmark``/``method``, a (benchmark, method) pair repeats, a value is not a
            finite number, or no run has a value for ``metric``.
    """
    if not isinstance(metric, str) or not metric:
        raise ValueError(f"metric must be a non-empty str, got {metric!r}")
    if not isinstance(runs, Sequence) or isinstance(runs, (str, bytes)) or not runs:
        raise ValueError(f"runs must be a non-empty sequence of mappings, got {runs!r}")
    scale = 100.0 if metric in _PERCENT_METRICS else 1.0
    benchmarks: list[str] = []
    methods: list[str] = []
    values: dict[tuple[str, str], float] = {}
    for k, run in enumerate(runs):
        if not isinstance(run, Mapping):
            raise ValueError(f"runs[{k}] must be a mapping, got {run!r}")
        if run.get("benchmark") is None or run.get("method") is None:
            raise ValueError(f"runs[{k}] must have 'benchmark' and 'method', got {dict(run)!r}")
        bench, method = str(run["benchmark"]), str(run["method"])
        if (bench, method) in values:
            raise ValueError(
                f"runs has more than one entry for benchmark={bench!r}, method={method!r}; "
                "aggregate seeds before plotting"
            )
        if bench not in benchmarks:
            benchmarks.append(bench)
        if method not in methods:
            methods.append(method)
        v = run.get(metric)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
            raise ValueError(f"runs[{k}][{metric!r}] must be a finite number or None, got {v!r}")
        values[(bench, method)] = scale * float(v)
    if not values:
        raise ValueError(f"no run has a value for metric {metric!r}")

    n_b, n_m = len(benchmarks), len(methods)
    width = 0.8 / n_m
    fig = _new_figure(min(max(5.0, 1.0 + n_b * (0.5 + 0.35 * n_m)), 24.0), 4.5)
    ax = fig.add_subplot()
    for m, method in enumerate(methods):
        xs, ys = [], []
        for g, bench in enumerate(benchmarks):
            if (bench, method) in values:
                xs.append(g - 0.4 + width * (m + 0.5))
                ys.append(values[(bench, method)])
        bars = ax.bar(xs, ys, width=width, label=method)
        ax.bar_label(bars, fmt="%.1f", fontsize="x-small", padding=1)
    ax.set_xticks(range(n_b), labels=benchmarks)
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xlabel("benchmark")
    ax.set_ylabel(_PERCENT_METRICS.get(metric, metric))
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(title="method", fontsize="small")
    return _save(fig, path)


def plot_curve_comparison(
    panels: Mapping[str, Mapping[str, tuple[npt.ArrayLike, npt.ArrayLike]]],
    path: PathLike,
    *,
    task_boundaries: Iterable[float] = (),
    title: str | None = None,
    xlabel: str = "training step",
    metric: str = "accuracy",
    higher_is_better: bool = True,
) -> pathlib.Path:
    """Side-by-side panels of per-step curves, one line per run (e.g. per method).

    The stability-gap figures of a benchmark: e.g. a panel ``"task 0"`` with the accuracy of
    the first task of every method against the training step, and a panel ``"WC-ACC"``.
    Accuracies are fractions, plotted in percent; a lower-is-better metric is plotted in its
    own units. Vertical dashed lines mark ``task_boundaries``. NaN values (undefined points,
    e.g. min-ACC before a second task) are left as gaps.

    Args:
        panels: Panel title -> {line label -> (steps, values)}, in display order; ``steps`` and
            ``values`` are 1-D of equal length, ``values`` fractions in ``[0, 1]`` or NaN.
        path: Output PNG file; parent directories are created.
        task_boundaries: Steps where a new task started.
        title: Optional figure title.
        xlabel: Label of the horizontal axis (e.g. when steps are rescaled per task).
        metric: Name of the metric, for the vertical axis label.
        higher_is_better: False for a loss-like metric (values need only be finite or NaN).

    Returns:
        ``path`` as a ``pathlib.Path``.

    Raises:
        ValueError: If ``panels`` is empty, a panel has no lines, a line's arrays are not 1-D
            of equal length or hold values outside ``[0, 1]`` (accuracies) or infinite ones, a
            boundary is not finite, or ``title`` or ``metric`` is not a str.
    """
    bounded = _check_metric(metric, higher_is_better)
    _check_title(title)
    boundaries = _check_boundaries(task_boundaries)
    if not isinstance(panels, Mapping) or not panels:
        raise ValueError(f"panels must be a non-empty mapping of panel -> lines, got {panels!r}")
    checked: list[tuple[str, list[tuple[str, np.ndarray, np.ndarray]]]] = []
    for name, lines in panels.items():
        if not isinstance(lines, Mapping) or not lines:
            raise ValueError(f"panels[{name!r}] must be a non-empty mapping of label -> "
                             f"(steps, values), got {lines!r}")
        out = []
        for label, line in lines.items():
            try:
                steps, values = line
                steps = np.asarray(steps, np.float64)
                values = np.asarray(values, np.float64)
            except (TypeError, ValueError) as e:
                raise ValueError(
                    f"panels[{name!r}][{label!r}] must be a (steps, values) pair of numbers"
                ) from e
            if steps.ndim != 1 or steps.shape != values.shape:
                raise ValueError(
                    f"panels[{name!r}][{label!r}]: steps and values must be 1-D of equal "
                    f"length, got shapes {steps.shape} and {values.shape}"
                )
            finite = values[~np.isnan(values)]
            if not np.all(np.isfinite(finite)):
                raise ValueError(
                    f"panels[{name!r}][{label!r}]: values must be finite or NaN (gaps)"
                )
            if bounded and (np.any(finite < 0.0) or np.any(finite > 1.0)):
                raise ValueError(
                    f"panels[{name!r}][{label!r}]: values must be fractions in [0, 1] "
                    "(not percentages)"
                )
            out.append((str(label), steps, values))
        checked.append((str(name), out))

    from matplotlib import colormaps

    scale = 100.0 if bounded else 1.0
    labels = list(dict.fromkeys(label for _, lines in checked for label, _, _ in lines))
    cmap = colormaps["tab10" if len(labels) <= 10 else "tab20"]
    colors = {label: cmap(i % cmap.N) for i, label in enumerate(labels)}  # same in every panel
    n = len(checked)
    fig = _new_figure(min(4.5 * n + 1.0, 24.0), 4.0)
    axes = fig.subplots(1, n, squeeze=False, sharey=True)[0]
    for ax, (name, lines) in zip(axes, checked, strict=False):
        for label, steps, values in lines:
            ax.plot(steps, scale * values, label=label, linewidth=1.2, color=colors[label])
        for b in boundaries:
            ax.axvline(b, color="gray", linestyle="--", linewidth=1.0, alpha=0.8)
        ax.set_title(name)
        ax.set_xlabel(xlabel)
        if bounded:
            ax.set_ylim(-2.0, 102.0)
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel(f"{metric} (%)" if bounded else metric)
    handles = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=False):
            handles.setdefault(label, handle)
    fig.legend(handles.values(), handles.keys(), loc="outside right center", fontsize="small")
    if title:
        fig.suptitle(title)
    return _save(fig, path)
