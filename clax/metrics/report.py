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
"""

from __future__ import annotations

import csv
import io
import json
import numbers
import os
import pathlib
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from clax.metrics import continual

__all__ = [
    "ACCURACY_CURVES_PNG",
    "ACCURACY_MATRIX_CSV",
    "ACCURACY_MATRIX_PNG",
    "CURVES_CSV",
    "CURVES_JSON",
    "CURVE_FIELDS",
    "METRICS_JSON",
    "RESULTS_COLUMNS",
    "STABILITY_COLUMNS",
    "atomic_write_bytes",
    "atomic_write_text",
    "markdown_table",
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

CURVE_FIELDS = ("step", "train_task", "eval_task", "accuracy")

_MISSING = "–"  # en dash, shown for None / missing cells

PathLike = str | os.PathLike[str]


# --------------------------------------------------------------------------------------------
# Atomic file writes.
# --------------------------------------------------------------------------------------------


def atomic_write_bytes(path: PathLike, data: bytes) -> pathlib.Path:
    """Writes ``data`` to ``path`` atomically, creating parent directories.

    The bytes go to a temporary file in the same directory, which is flushed, fsynced and then
    renamed over ``path`` with ``os.replace`` (atomic on POSIX and Windows). On any error the
    temporary file is removed and ``path`` is left as it was.

    Args:
        path: Destination file.
        data: Contents.

    Returns:
        ``path`` as a ``pathlib.Path``.
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def atomic_write_text(path: PathLike, text: str) -> pathlib.Path:
    """Writes ``text`` (UTF-8) to ``path`` atomically; see :func:`atomic_write_bytes`."""
    return atomic_write_bytes(path, text.encode("utf-8"))


# --------------------------------------------------------------------------------------------
# Curves.
# --------------------------------------------------------------------------------------------


def _as_int(value: Any, what: str, *, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        if isinstance(value, numbers.Real) and float(value).is_integer():
            value = int(value)
        else:
            raise ValueError(f"{what} must be an int, got {value!r}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{what} must be >= {minimum}, got {value}")
    return value


def normalize_curves(curves: Iterable[Any]) -> list[tuple[int, int, int, float]]:
    """Validates accuracy-curve points and returns them as tuples.

    Args:
        curves: Iterable of points, each either a mapping with keys ``step``, ``train_task``,
            ``eval_task`` and ``accuracy``, or a 4-sequence in that order. ``step`` is the global
            training step (int >= 0), ``train_task`` the task being trained at that step and
            ``eval_task`` the task evaluated (ints >= 0), ``accuracy`` a fraction in ``[0, 1]``.

    Returns:
        A list of ``(step, train_task, eval_task, accuracy)`` tuples of Python ints and float,
        in input order.

    Raises:
        ValueError: If a point is malformed.
    """
    if isinstance(curves, (str, bytes, Mapping)):
        raise ValueError(
            f"curves must be an iterable of points (dicts or 4-tuples), got {type(curves)}"
        )
    out = []
    for k, point in enumerate(curves):
        if isinstance(point, Mapping):
            missing = [f for f in CURVE_FIELDS if f not in point]
            if missing:
                raise ValueError(f"curves[{k}] is missing keys {missing}; expected {CURVE_FIELDS}")
            values = [point[f] for f in CURVE_FIELDS]
        elif isinstance(point, Sequence) and not isinstance(point, (str, bytes)):
            if len(point) != 4:
                raise ValueError(
                    f"curves[{k}] must have 4 fields {CURVE_FIELDS}, got {len(point)}: {point!r}"
                )
            values = list(point)
        else:
            raise ValueError(
                f"curves[{k}] must be a dict or a 4-tuple {CURVE_FIELDS}, got {point!r}"
            )
        step = _as_int(values[0], f"curves[{k}].step", minimum=0)
        train_task = _as_int(values[1], f"curves[{k}].train_task", minimum=0)
        eval_task = _as_int(values[2], f"curves[{k}].eval_task", minimum=0)
        acc = values[3]
        if isinstance(acc, bool) or not isinstance(acc, numbers.Real):
            raise ValueError(f"curves[{k}].accuracy must be a number, got {acc!r}")
        acc = float(acc)
        if not 0.0 <= acc <= 1.0:  # also rejects NaN
            raise ValueError(
                f"curves[{k}].accuracy must be a fraction in [0, 1] (not a percentage), got {acc}"
            )
        out.append((step, train_task, eval_task, acc))
    return out


def _task_boundaries(points: Sequence[tuple[int, int, int, float]]) -> list[int]:
    """First step of each training task except the first one (where a new task started)."""
    first: dict[int, int] = {}
    for step, train_task, _, _ in points:
        first[train_task] = min(step, first.get(train_task, step))
    starts = sorted(first.values())
    return starts[1:]


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
    R: npt.ArrayLike, b: npt.ArrayLike | None = None, curves: Iterable[Any] = ()
) -> dict[str, float | None]:
    """Task-end metrics of ``R`` plus, when there are curves, the stability-gap metrics.

    Args:
        R: Accuracy matrix of shape ``(T, T)``, fractions in ``[0, 1]``.
        b: Optional accuracies of the freshly initialized model, shape ``(T,)``.
        curves: Accuracy-curve points (see :func:`normalize_curves`); may be empty.

    Returns:
        :func:`clax.metrics.continual.summarize` of ``(R, b)``, updated with
        :func:`clax.metrics.stability.stability_summary` of the curves (``min_acc``,
        ``wc_acc``, ``wf_10``, ``wp_10``, ``wf_100``, ``wp_100``) when there is at least one
        point.

    Raises:
        ValueError: On invalid ``R``, ``b`` or ``curves``.
    """
    from clax.metrics import stability  # stability imports this module

    summary = continual.summarize(R, b)
    points = normalize_curves(curves)
    if points:
        summary.update(stability.stability_summary(points))
    return summary


def _check_boundaries(task_boundaries: Any) -> list[int] | None:
    if task_boundaries is None:
        return None
    if isinstance(task_boundaries, (str, bytes, Mapping)):
        raise ValueError(f"task_boundaries must be a sequence of steps, got {task_boundaries!r}")
    return [_as_int(s, f"task_boundaries[{k}]", minimum=0)
            for k, s in enumerate(task_boundaries)]


def _curves_document(points, boundaries: list[int]) -> dict[str, Any]:
    """curves.json: one row per evaluation (null where a task was not evaluated)."""
    from clax.metrics import stability

    grid = stability.evaluation_grid(points)
    tracked = stability.tracking_metrics(grid)

    def nullable(a):
        return [None if np.isnan(v) else float(v) for v in a]

    return {
        "task_boundaries": boundaries,
        "steps": grid.steps.tolist(),
        "train_task": grid.train_task.tolist(),
        "accuracy": [nullable(row) for row in grid.accuracy],
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
) -> dict[str, float | None]:
    """Writes the results of one continual-learning run to ``workdir``.

    Files (see the module docstring): ``accuracy_matrix.csv``, ``curves.csv``,
    ``accuracy_matrix.png``, ``curves.json`` and ``accuracy_curves.png`` (only if ``curves`` is
    non-empty) and finally ``metrics.json``::

        {"name": name, "num_tasks": T, "summary": run_summary(R, b, curves),
         "accuracy_matrix": R as nested lists, "b": b as a list or null, "extra": extra or {}}

    ``curves.json`` holds ``task_boundaries``, ``steps`` and ``train_task`` (one entry per
    evaluation), ``accuracy`` (per evaluation, a list over tasks with null where a task was
    not evaluated) and the running ``min_acc`` / ``wc_acc`` (see
    :func:`clax.metrics.stability.tracking_metrics`).

    All inputs are validated and serialized before anything is written; each file is written
    atomically and ``metrics.json`` last.

    Args:
        workdir: Run directory; created if missing.
        name: Name of the run (e.g. ``"ewc/split_mnist/seed0"``).
        R: Accuracy matrix of shape ``(T, T)``, fractions in ``[0, 1]``.
        b: Optional accuracies of the freshly initialized model, shape ``(T,)``.
        curves: Accuracy-curve points, dicts or 4-tuples ``(step, train_task, eval_task,
            accuracy)``; see :func:`normalize_curves`.
        extra: Optional JSON-serializable mapping with string keys (train time, config name...).
            numpy scalars/arrays and paths are converted.
        task_boundaries: Steps at which tasks 1, 2, ... started (marked on the curves plot).
            None: the first evaluated step of each training task after the first.

    Returns:
        The summary dict from :func:`run_summary`.

    Raises:
        ValueError: On invalid ``name``, ``R``, ``b``, ``curves``, ``extra`` or
            ``task_boundaries``.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty str, got {name!r}")
    R = continual.validate_accuracy_matrix(R)
    T = R.shape[0]
    b_arr = None if b is None else continual.validate_baseline(b, T)
    points = normalize_curves(curves)
    if extra is None:
        extra = {}
    if not isinstance(extra, Mapping) or not all(isinstance(k, str) for k in extra):
        raise ValueError(f"extra must be a mapping with str keys or None, got {extra!r}")

    boundaries = _check_boundaries(task_boundaries)
    if boundaries is None:
        boundaries = _task_boundaries(points)
    summary = run_summary(R, b_arr, points)
    payload = {
        "name": name,
        "num_tasks": T,
        "summary": summary,
        "accuracy_matrix": R.tolist(),
        "b": None if b_arr is None else b_arr.tolist(),
        "extra": dict(extra),
    }
    try:
        metrics_text = json.dumps(payload, indent=2, default=_json_default) + "\n"
    except (TypeError, ValueError) as e:
        raise ValueError(f"extra must be JSON serializable: {e}") from e

    header = ["after_task"] + [f"task_{j}" for j in range(T)]
    matrix_csv = _csv_text([header] + [[i] + [repr(float(v)) for v in R[i]] for i in range(T)])
    curves_csv = _csv_text(
        [list(CURVE_FIELDS)] + [[s, tr, ev, repr(acc)] for s, tr, ev, acc in points]
    )
    curves_json = (
        json.dumps(_curves_document(points, boundaries)) + "\n" if points else None
    )

    # Imported here so that importing clax.metrics.report does not import matplotlib.
    from clax.metrics import plots

    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(workdir / ACCURACY_MATRIX_CSV, matrix_csv)
    atomic_write_text(workdir / CURVES_CSV, curves_csv)
    plots.plot_accuracy_matrix(R, workdir / ACCURACY_MATRIX_PNG, title=name)
    if points:
        atomic_write_text(workdir / CURVES_JSON, curves_json)
        plots.plot_accuracy_curves(
            points,
            workdir / ACCURACY_CURVES_PNG,
            task_boundaries=boundaries,
            title=name,
        )
    atomic_write_text(workdir / METRICS_JSON, metrics_text)
    return summary


def read_run_curves(workdir: PathLike) -> dict[str, Any] | None:
    """Reads the accuracy curves of a run directory.

    Args:
        workdir: Run directory written by :func:`write_run_results`.

    Returns:
        None when the run has no curves; otherwise ``{"points": [(step, train_task,
        eval_task, accuracy), ...], "task_boundaries": [...]}``, from ``curves.json`` when
        present, else from ``curves.csv`` (boundaries then derived from the points).

    Raises:
        ValueError: If a curves file is malformed.
    """
    workdir = pathlib.Path(workdir)
    path = workdir / CURVES_JSON
    if path.is_file():
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            points = [
                (step, train_task, j, acc)
                for step, train_task, row in zip(doc["steps"], doc["train_task"], doc["accuracy"])
                for j, acc in enumerate(row)
                if acc is not None
            ]
            boundaries = list(doc["task_boundaries"])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path} is not a curves document: {e}") from e
        return {"points": normalize_curves(points), "task_boundaries": boundaries}
    path = workdir / CURVES_CSV
    if not path.is_file():
        return None
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    try:
        points = normalize_curves(
            [(int(r["step"]), int(r["train_task"]), int(r["eval_task"]), float(r["accuracy"]))
             for r in rows]
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path} is not a curves file: {e}") from e
    if not points:
        return None
    return {"points": points, "task_boundaries": _task_boundaries(points)}


def read_run_results(workdir: PathLike) -> dict[str, Any]:
    """Reads ``workdir/metrics.json`` written by :func:`write_run_results`.

    Args:
        workdir: Run directory.

    Returns:
        The JSON document as a dict with keys ``name``, ``num_tasks``, ``summary``,
        ``accuracy_matrix`` (nested lists), ``b`` (list or None) and ``extra``.

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
    required = ("name", "num_tasks", "summary", "accuracy_matrix", "b", "extra")
    if not isinstance(data, dict) or any(k not in data for k in required):
        raise ValueError(f"{path} is not a run-results document; expected keys {required}")
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
    with one decimal. Missing or ``None`` values are shown as ``"–"``.

    Args:
        runs: Sequence of mappings, one per row, in display order.

    Returns:
        The markdown table (no trailing newline).

    Raises:
        ValueError: If ``runs`` is not a sequence of mappings or a metric is not a number.
    """
    rows = []
    for k, run in enumerate(_check_runs(runs)):
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
