"""Writing and reading run results, and markdown tables for comparing runs.

A run directory written by :func:`write_run_results` holds::

    accuracy_matrix.csv   after_task,task_0,...,task_{T-1}; one row per training task
    curves.csv            step,train_task,eval_task,accuracy (header only if no curves)
    curves.json           the curves by evaluation, task boundaries, running min-ACC and
                          WC-ACC (only when curves were given)
    accuracy_matrix.png   heatmap of R (see clax.metrics.plots)
    accuracy_curves.png   accuracy vs step, task boundaries marked (only when curves were given)
    metrics.json          summary (task-end and stability-gap metrics), matrix, b, extra;
                          written last

Every file is written atomically (a temporary file in the same directory, then ``os.replace``),
and ``metrics.json`` is written after everything else, so its presence means the run directory is
complete and a crash never leaves a half-written file under a final name.

Metric direction. A run may measure another metric than accuracy, e.g. a loss, for which lower
is better: ``write_run_results(..., metric="loss", higher_is_better=False)``. Its files are then
``loss_matrix.csv``, ``loss_matrix.png`` and ``loss_curves.png`` (see :func:`metric_files`), the
value column of ``curves.csv`` is ``value`` instead of ``accuracy``, and every summary metric
follows the rule of :mod:`clax.metrics.continual`: computed on ``s * R`` (``s = -1`` when lower
is better), level metrics (``acc``, ``avg_incremental_acc``, ``min_acc``, ``wc_acc``) in the
metric's units, differences (``bwt``, ``fwt``, ``forgetting``, ``wf_*``, ``wp_*``) oriented so
that negative BWT and positive forgetting mean forgetting. Values must be fractions in ``[0, 1]``
when higher is better and finite otherwise. The summary keys keep their accuracy names.

Layering (no import cycle, no function-level imports): :mod:`~clax.metrics.curves` and
:mod:`~clax.metrics.io` import no other metrics module; :mod:`~clax.metrics.continual` none;
:mod:`~clax.metrics.stability` imports continual and curves; :mod:`~clax.metrics.plots`
imports continual, curves and io; this module imports all of them. ``normalize_curves``,
``CURVE_FIELDS``, ``atomic_write_bytes`` and ``atomic_write_text`` are re-exported here.
"""

from __future__ import annotations

import csv
import io
import json
import numbers
import os
import pathlib
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from clax.metrics import continual, plots, stability
from clax.metrics.curves import CURVE_FIELDS, normalize_curves
from clax.metrics.curves import as_int as _as_int
from clax.metrics.curves import task_boundaries as _task_boundaries
from clax.metrics.io import PathLike, atomic_write_bytes, atomic_write_text

__all__ = [
    "ACCURACY_CURVES_PNG",
    "ACCURACY_MATRIX_CSV",
    "ACCURACY_MATRIX_PNG",
    "CURVES_CSV",
    "CURVES_JSON",
    "CURVE_FIELDS",
    "METRICS_JSON",
    "MetricFiles",
    "RESULTS_COLUMNS",
    "STABILITY_COLUMNS",
    "atomic_write_bytes",
    "atomic_write_text",
    "markdown_table",
    "metric_files",
    "normalize_curves",
    "read_run_curves",
    "read_run_results",
    "results_table",
    "run_summary",
    "stability_table",
    "write_run_results",
]

METRICS_JSON = "metrics.json"
ACCURACY_MATRIX_CSV = "accuracy_matrix.csv"
CURVES_CSV = "curves.csv"
CURVES_JSON = "curves.json"
ACCURACY_MATRIX_PNG = "accuracy_matrix.png"
ACCURACY_CURVES_PNG = "accuracy_curves.png"

_MISSING = "–"  # en dash, shown for None / missing cells

# The value column of curves.csv for a metric other than accuracy.
_VALUE_FIELD = "value"
_METRIC_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


class MetricFiles(NamedTuple):
    """File names of a run directory that depend on the metric (see :func:`metric_files`)."""

    matrix_csv: str
    matrix_png: str
    curves_png: str


def metric_files(metric: str = "accuracy") -> MetricFiles:
    """File names of the metric matrix and plots of a run measuring ``metric``.

    ``accuracy_matrix.csv``, ``accuracy_matrix.png`` and ``accuracy_curves.png`` for
    ``metric="accuracy"``, else ``<metric>_matrix.csv``, ``<metric>_matrix.png`` and
    ``<metric>_curves.png``.

    Raises:
        ValueError: If ``metric`` is not a non-empty name of letters, digits, ``_``, ``.`` and
            ``-`` (starting with a letter or digit).
    """
    if not isinstance(metric, str) or not _METRIC_NAME.fullmatch(metric):
        raise ValueError(
            "metric must be a name of letters, digits, '_', '.' and '-' (used in file names), "
            f"got {metric!r}"
        )
    return MetricFiles(f"{metric}_matrix.csv", f"{metric}_matrix.png", f"{metric}_curves.png")


def _check_direction(metric: str, higher_is_better: Any) -> bool:
    continual.direction(higher_is_better)
    if metric == "accuracy" and not higher_is_better:
        raise ValueError("metric='accuracy' is higher-is-better; got higher_is_better=False")
    return bool(higher_is_better)


# --------------------------------------------------------------------------------------------
# Run results.
# --------------------------------------------------------------------------------------------


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serializable")


def _csv_text(rows: Iterable[Sequence[Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerows(rows)
    return buf.getvalue()


def run_summary(
    R: npt.ArrayLike,
    b: npt.ArrayLike | None = None,
    curves: Iterable[Any] = (),
    *,
    higher_is_better: bool = True,
) -> dict[str, float | None]:
    """Task-end metrics of ``R`` plus, when there are curves, the stability-gap metrics.

    Args:
        R: Metric matrix of shape ``(T, T)``: accuracy fractions in ``[0, 1]``, or any finite
            values when ``higher_is_better`` is False.
        b: Optional metric of the freshly initialized model, shape ``(T,)``.
        curves: Curve points of the same metric (see :func:`normalize_curves`); may be empty.
        higher_is_better: False for a loss-like metric (see the module docstring).

    Returns:
        :func:`clax.metrics.continual.summarize` of ``(R, b)``, updated with
        :func:`clax.metrics.stability.stability_summary` of the curves (``min_acc``,
        ``wc_acc``, ``wf_10``, ``wp_10``, ``wp_official_10``, ``wf_100``, ...) when there is
        at least one point.

    Raises:
        ValueError: On invalid ``R``, ``b`` or ``curves``.
    """
    summary = continual.summarize(R, b, higher_is_better=higher_is_better)
    points = normalize_curves(curves, bounded=bool(higher_is_better))
    if points:
        summary.update(stability.stability_summary(points, higher_is_better=higher_is_better))
    return summary


def _check_boundaries(task_boundaries: Any) -> list[int] | None:
    if task_boundaries is None:
        return None
    if isinstance(task_boundaries, (str, bytes, Mapping)):
        raise ValueError(f"task_boundaries must be a sequence of steps, got {task_boundaries!r}")
    return [_as_int(s, f"task_boundaries[{k}]", minimum=0)
            for k, s in enumerate(task_boundaries)]


def _curves_document(
    points, boundaries: list[int], metric: str, higher_is_better: bool
) -> dict[str, Any]:
    """curves.json: one row per evaluation (null where a task was not evaluated)."""
    grid = stability.evaluation_grid(points, higher_is_better=higher_is_better)
    tracked = stability.tracking_metrics(grid, higher_is_better=higher_is_better)

    def nullable(a):
        return [None if np.isnan(v) else float(v) for v in a]

    return {
        "metric": metric,
        "higher_is_better": higher_is_better,
        "task_boundaries": boundaries,
        "steps": grid.steps.tolist(),
        "train_task": grid.train_task.tolist(),
        "accuracy" if metric == "accuracy" else "values": [nullable(row) for row in grid.values],
        "min_acc": nullable(tracked["min_acc"]),
        "wc_acc": nullable(tracked["wc_acc"]),
    }


def write_run_results(
    workdir: PathLike,
    *,
    name: str,
    R: npt.ArrayLike,
    b: npt.ArrayLike | None = None,
    curves: Iterable[Any] = (),
    extra: Mapping[str, Any] | None = None,
    task_boundaries: Iterable[int] | None = None,
    metric: str = "accuracy",
    higher_is_better: bool = True,
) -> dict[str, float | None]:
    """Writes the results of one continual-learning run to ``workdir``.

    Files (see the module docstring; names from :func:`metric_files`): ``<metric>_matrix.csv``,
    ``curves.csv``, ``<metric>_matrix.png``, ``curves.json`` and ``<metric>_curves.png`` (only
    if ``curves`` is non-empty) and finally ``metrics.json``::

        {"name": name, "num_tasks": T, "metric": metric, "higher_is_better": higher_is_better,
         "summary": run_summary(R, b, curves, higher_is_better=higher_is_better),
         "accuracy_matrix": R as nested lists (only when metric == "accuracy"),
         "metric_matrix": R as nested lists, "b": b as a list or null, "extra": extra or {}}

    ``curves.json`` holds ``metric``, ``higher_is_better``, ``task_boundaries``, ``steps`` and
    ``train_task`` (one entry per evaluation), ``accuracy`` (``values`` for another metric:
    per evaluation, a list over tasks with null where a task was not evaluated) and the running
    ``min_acc`` / ``wc_acc`` (see :func:`clax.metrics.stability.tracking_metrics`).

    All inputs are validated and serialized before anything is written; each file is written
    atomically and ``metrics.json`` last.

    Args:
        workdir: Run directory; created if missing.
        name: Name of the run (e.g. ``"ewc/split_mnist/seed0"``).
        R: Metric matrix of shape ``(T, T)``: accuracy fractions in ``[0, 1]``, or any finite
            values when ``higher_is_better`` is False.
        b: Optional metric of the freshly initialized model, shape ``(T,)``.
        curves: Curve points of the same metric, dicts or 4-tuples ``(step, train_task,
            eval_task, value)``; see :func:`normalize_curves`. Points naming another metric
            are rejected.
        extra: Optional JSON-serializable mapping with string keys (train time, config name...).
            numpy scalars/arrays and paths are converted.
        task_boundaries: Steps at which tasks 1, 2, ... started (marked on the curves plot).
            None: the first evaluated step of each training task after the first.
        metric: Name of the metric in ``R`` and the curves, used in file names, titles and
            labels (letters, digits, ``_``, ``.``, ``-``).
        higher_is_better: False for a loss-like metric; must be True for ``"accuracy"``.

    Returns:
        The summary dict from :func:`run_summary`.

    Raises:
        ValueError: On invalid ``name``, ``R``, ``b``, ``curves``, ``extra``,
            ``task_boundaries``, ``metric`` or ``higher_is_better``.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty str, got {name!r}")
    files = metric_files(metric)
    bounded = _check_direction(metric, higher_is_better)
    R = continual.validate_metric_matrix(R, bounded=bounded)
    T = R.shape[0]
    b_arr = None if b is None else continual.validate_baseline(b, T, bounded=bounded)
    points = normalize_curves(curves, bounded=bounded, metric=metric)
    if extra is None:
        extra = {}
    if not isinstance(extra, Mapping) or not all(isinstance(k, str) for k in extra):
        raise ValueError(f"extra must be a mapping with str keys or None, got {extra!r}")

    boundaries = _check_boundaries(task_boundaries)
    if boundaries is None:
        boundaries = _task_boundaries(points)
    summary = run_summary(R, b_arr, points, higher_is_better=bounded)
    payload: dict[str, Any] = {
        "name": name,
        "num_tasks": T,
        "metric": metric,
        "higher_is_better": bounded,
        "summary": summary,
    }
    if metric == "accuracy":
        payload["accuracy_matrix"] = R.tolist()
    payload.update({
        "metric_matrix": R.tolist(),
        "b": None if b_arr is None else b_arr.tolist(),
        "extra": dict(extra),
    })
    try:
        metrics_text = json.dumps(payload, indent=2, default=_json_default) + "\n"
    except (TypeError, ValueError) as e:
        raise ValueError(f"extra must be JSON serializable: {e}") from e

    header = ["after_task"] + [f"task_{j}" for j in range(T)]
    matrix_csv = _csv_text([header] + [[i] + [repr(float(v)) for v in R[i]] for i in range(T)])
    fields = list(CURVE_FIELDS[:3]) + [CURVE_FIELDS[3] if metric == "accuracy" else _VALUE_FIELD]
    curves_csv = _csv_text([fields] + [[s, tr, ev, repr(v)] for s, tr, ev, v in points])
    curves_json = (
        json.dumps(_curves_document(points, boundaries, metric, bounded)) + "\n"
        if points else None
    )

    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(workdir / files.matrix_csv, matrix_csv)
    atomic_write_text(workdir / CURVES_CSV, curves_csv)
    plots.plot_accuracy_matrix(R, workdir / files.matrix_png, title=name, metric=metric,
                               higher_is_better=bounded)
    if points:
        atomic_write_text(workdir / CURVES_JSON, curves_json)
        plots.plot_accuracy_curves(
            points,
            workdir / files.curves_png,
            task_boundaries=boundaries,
            title=name,
            metric=metric,
            higher_is_better=bounded,
        )
    atomic_write_text(workdir / METRICS_JSON, metrics_text)
    return summary


def _run_direction(workdir: pathlib.Path) -> tuple[str | None, bool | None]:
    """``(metric, higher_is_better)`` from ``metrics.json``, ``(None, None)`` if unknown."""
    try:
        data = json.loads((workdir / METRICS_JSON).read_text(encoding="utf-8"))
        metric, hib = data.get("metric", "accuracy"), data.get("higher_is_better", True)
    except (OSError, ValueError, AttributeError):
        return None, None
    if not isinstance(metric, str) or not isinstance(hib, bool):
        return None, None
    return metric, hib


def read_run_curves(workdir: PathLike) -> dict[str, Any] | None:
    """Reads the curves of a run directory.

    Args:
        workdir: Run directory written by :func:`write_run_results`.

    Returns:
        None when the run has no curves; otherwise ``{"points": [(step, train_task,
        eval_task, value), ...], "task_boundaries": [...], "metric": name,
        "higher_is_better": bool}``, from ``curves.json`` when present, else from
        ``curves.csv`` (boundaries then derived from the points). Files written before the
        metric was recorded are accuracy runs. For a ``curves.csv`` with a ``value`` column
        the metric and its direction come from ``metrics.json``; without it they are None and
        the values are only checked to be finite.

    Raises:
        ValueError: If a curves file is malformed.
    """
    workdir = pathlib.Path(workdir)
    path = workdir / CURVES_JSON
    if path.is_file():
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            metric = doc.get("metric", "accuracy")
            hib = doc.get("higher_is_better", True)
            rows = doc["accuracy"] if "accuracy" in doc else doc["values"]
            points = [
                (step, train_task, j, v)
                for step, train_task, row in zip(doc["steps"], doc["train_task"], rows,
                                                 strict=False)
                for j, v in enumerate(row)
                if v is not None
            ]
            boundaries = list(doc["task_boundaries"])
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{path} is not a curves document: {e}") from e
        if not isinstance(hib, bool):
            raise ValueError(f"{path}: higher_is_better must be a bool, got {hib!r}")
        return {"points": normalize_curves(points, bounded=hib), "task_boundaries": boundaries,
                "metric": metric, "higher_is_better": hib}
    path = workdir / CURVES_CSV
    if not path.is_file():
        return None
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        fieldnames = reader.fieldnames or []
    if CURVE_FIELDS[3] in fieldnames:
        column, metric, hib = CURVE_FIELDS[3], "accuracy", True
    else:
        column = _VALUE_FIELD
        metric, hib = _run_direction(workdir)
    try:
        points = normalize_curves(
            [(int(r["step"]), int(r["train_task"]), int(r["eval_task"]), float(r[column]))
             for r in rows],
            bounded=bool(hib),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path} is not a curves file: {e}") from e
    if not points:
        return None
    return {"points": points, "task_boundaries": _task_boundaries(points), "metric": metric,
            "higher_is_better": hib}


def read_run_results(workdir: PathLike) -> dict[str, Any]:
    """Reads ``workdir/metrics.json`` written by :func:`write_run_results`.

    Documents written before the metric was recorded are accuracy runs: ``metric``,
    ``higher_is_better`` and ``metric_matrix`` (a copy of ``accuracy_matrix``) are filled in.

    Args:
        workdir: Run directory.

    Returns:
        The JSON document as a dict with keys ``name``, ``num_tasks``, ``metric``,
        ``higher_is_better``, ``summary``, ``metric_matrix`` (nested lists),
        ``accuracy_matrix`` (accuracy runs only), ``b`` (list or None) and ``extra``.

    Raises:
        FileNotFoundError: If ``workdir/metrics.json`` does not exist.
        ValueError: If the file is not a valid run-results document.
    """
    path = pathlib.Path(workdir) / METRICS_JSON
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    required = ("name", "num_tasks", "summary", "b", "extra")
    if (
        not isinstance(data, dict)
        or any(k not in data for k in required)
        or not ("accuracy_matrix" in data or "metric_matrix" in data)
    ):
        raise ValueError(
            f"{path} is not a run-results document; expected keys {required} and "
            "'metric_matrix' or 'accuracy_matrix'"
        )
    data.setdefault("metric", "accuracy")
    data.setdefault("higher_is_better", True)
    data.setdefault("metric_matrix", data.get("accuracy_matrix"))
    return data


# --------------------------------------------------------------------------------------------
# Markdown tables.
# --------------------------------------------------------------------------------------------


def _normalize_columns(columns: Any) -> list[tuple[str, str]]:
    if isinstance(columns, (str, bytes)) or not isinstance(columns, Sequence) or not columns:
        raise ValueError(
            "columns must be a non-empty sequence of keys or (key, header) pairs, "
            f"got {columns!r}"
        )
    out = []
    for c in columns:
        if isinstance(c, str):
            out.append((c, c))
        elif (
            isinstance(c, tuple)
            and len(c) == 2
            and isinstance(c[0], str)
            and isinstance(c[1], str)
        ):
            out.append((c[0], c[1]))
        else:
            raise ValueError(
                f"each column must be a str key or a (key, header) str pair, got {c!r}"
            )
    return out


def _cell(value: Any, floatfmt: str) -> str:
    if value is None:
        text = _MISSING
    elif isinstance(value, (bool, np.bool_)):
        text = str(bool(value))
    elif isinstance(value, numbers.Integral):
        text = str(int(value))
    elif isinstance(value, numbers.Real):
        text = format(float(value), floatfmt)
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def markdown_table(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[tuple[str, str]] | Sequence[str],
    *,
    floatfmt: str = ".3f",
) -> str:
    """Formats rows as a GitHub-flavoured markdown table.

    Cells: ``None`` or a missing key -> ``"–"``; ints and bools -> ``str``; other real numbers
    -> ``format(x, floatfmt)``; anything else -> ``str``. ``|`` is escaped and newlines become
    spaces. No scaling (e.g. to percentages) is applied. The result has no trailing newline::

        | a | b |
        | --- | --- |
        | 1 | 0.500 |

    Args:
        rows: Sequence of mappings, one per table row.
        columns: Keys to show, each either a key (also used as the header) or a
            ``(key, header)`` pair.
        floatfmt: Format spec for floats, e.g. ``".3f"``.

    Returns:
        The table as a string.

    Raises:
        ValueError: If ``rows`` is not a sequence of mappings, ``columns`` is malformed, or
            ``floatfmt`` is not a valid float format spec.
    """
    cols = _normalize_columns(columns)
    if not isinstance(rows, Sequence) or isinstance(rows, (str, bytes)):
        raise ValueError(f"rows must be a sequence of mappings, got {type(rows)}")
    try:
        format(0.5, floatfmt)
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"floatfmt must be a float format spec like '.3f', got {floatfmt!r}"
        ) from e
    lines = [
        "| " + " | ".join(_cell(h, floatfmt) for _, h in cols) + " |",
        "| " + " | ".join("---" for _ in cols) + " |",
    ]
    for k, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise ValueError(f"rows[{k}] must be a mapping, got {row!r}")
        lines.append("| " + " | ".join(_cell(row.get(key), floatfmt) for key, _ in cols) + " |")
    return "\n".join(lines)


RESULTS_COLUMNS = (
    ("benchmark", "benchmark"),
    ("method", "method"),
    ("acc", "ACC"),
    ("bwt", "BWT"),
    ("fwt", "FWT"),
    ("forgetting", "Forgetting"),
    ("train_time_s", "train time (s)"),
)



def _check_runs(runs: Any) -> Sequence[Mapping]:
    """``runs`` if it is a sequence of mappings, else ``ValueError`` naming the bad entry."""
    if not isinstance(runs, Sequence) or isinstance(runs, (str, bytes)):
        raise ValueError(f"runs must be a sequence of mappings, got {type(runs)}")
    for k, run in enumerate(runs):
        if not isinstance(run, Mapping):
            raise ValueError(f"runs[{k}] must be a mapping, got {run!r}")
    return runs

def _number(run: Mapping[str, Any], key: str, k: int) -> float | None:
    value = run.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"runs[{k}][{key!r}] must be a number or None, got {value!r}")
    return float(value)


def results_table(runs: Sequence[Mapping[str, Any]]) -> str:
    """The standard comparison table of continual-learning runs, in markdown.

    Columns ``benchmark | method | ACC | BWT | FWT | Forgetting | train time (s)`` from the keys
    ``benchmark``, ``method``, ``acc``, ``bwt``, ``fwt``, ``forgetting`` and ``train_time_s``
    (e.g. a :func:`~clax.metrics.continual.summarize` dict merged with run info). Metrics stored
    as fractions are shown in percent with one decimal: ``ACC = 100 * acc`` (``0.931`` ->
    ``93.1``); BWT, FWT and Forgetting in percentage points, BWT and FWT with an explicit sign
    (``-0.052`` -> ``-5.2``, ``0.01`` -> ``+1.0``, never ``-0.0``). Train time is in seconds
    with one decimal. Missing or ``None`` values are shown as ``"–"``. A row whose ``metric``
    key names another metric than ``"accuracy"`` (a loss, a perplexity) is shown in that
    metric's own units with three decimals, its name after the method (``lm (loss)``).

    Args:
        runs: Sequence of mappings, one per row, in display order.

    Returns:
        The markdown table (no trailing newline).

    Raises:
        ValueError: If ``runs`` is not a sequence of mappings or a metric is not a number.
    """
    rows = []
    for k, run in enumerate(_check_runs(runs)):
        metric = run.get("metric", "accuracy")
        if metric != "accuracy":
            cells = {key: _number(run, key, k) for key in ("acc", "bwt", "fwt", "forgetting")}
            train_time = _number(run, "train_time_s", k)
            rows.append({
                "benchmark": run.get("benchmark"), "method": f"{run.get('method')} ({metric})",
                **{key: None if v is None else f"{v:{'+' if key in ('bwt', 'fwt') else ''}z.3f}"
                   for key, v in cells.items()},
                "train_time_s": None if train_time is None else f"{train_time:z.1f}",
            })
            continue
        acc = _number(run, "acc", k)
        bwt = _number(run, "bwt", k)
        fwt = _number(run, "fwt", k)
        forgetting = _number(run, "forgetting", k)
        train_time = _number(run, "train_time_s", k)
        rows.append(
            {
                "benchmark": run.get("benchmark"),
                "method": run.get("method"),
                "acc": None if acc is None else f"{100 * acc:z.1f}",
                "bwt": None if bwt is None else f"{100 * bwt:+z.1f}",
                "fwt": None if fwt is None else f"{100 * fwt:+z.1f}",
                "forgetting": None if forgetting is None else f"{100 * forgetting:z.1f}",
                "train_time_s": None if train_time is None else f"{train_time:z.1f}",
            }
        )
    return markdown_table(rows, RESULTS_COLUMNS)


STABILITY_COLUMNS = (
    ("benchmark", "benchmark"),
    ("method", "method"),
    ("acc", "ACC"),
    ("min_acc", "min-ACC"),
    ("wc_acc", "WC-ACC"),
    ("wf_10", "WF^10"),
    ("wp_10", "WP^10"),
    ("wf_100", "WF^100"),
    ("wp_100", "WP^100"),
)


def stability_table(runs: Sequence[Mapping[str, Any]]) -> str:
    """Stability-gap metrics of continual-learning runs, in markdown.

    Columns ``benchmark | method | ACC | min-ACC | WC-ACC | WF^10 | WP^10 | WF^100 | WP^100``
    from the keys of :func:`run_summary` (``acc``, ``min_acc``, ``wc_acc``, ``wf_10``, ...), all
    fractions shown in percent with one decimal. Missing or ``None`` values (no curves, or
    fewer evaluations than a window) are shown as ``"–"``.

    Args:
        runs: Sequence of mappings, one per row, in display order.

    Returns:
        The markdown table (no trailing newline).

    Raises:
        ValueError: If ``runs`` is not a sequence of mappings or a metric is not a number.
    """
    rows = []
    for k, run in enumerate(_check_runs(runs)):
        row = {"benchmark": run.get("benchmark"), "method": run.get("method")}
        for key, _ in STABILITY_COLUMNS[2:]:
            value = _number(run, key, k)
            row[key] = None if value is None else f"{100 * value:z.1f}"
        rows.append(row)
    return markdown_table(rows, STABILITY_COLUMNS)
