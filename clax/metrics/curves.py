"""The curve-point format of continual evaluation, validated (pure Python, no numpy).

A curve point is one evaluation of one task's test set during training::

    (step, train_task, eval_task, value)

``step`` is the global training step, ``train_task`` the task being trained at that step,
``eval_task`` the task evaluated and ``value`` the metric measured on it. A point is either a
4-sequence in that order or a mapping with the keys ``step``, ``train_task``, ``eval_task`` and
exactly one of ``accuracy`` (the original format) or ``value``, optionally with ``metric``
naming the metric (the training loop writes ``{"step", "train_task", "eval_task", "metric":
name, "value": v}``).

Values are validated as *bounded* fractions in ``[0, 1]`` (accuracies: the default) or as any
finite number (``bounded=False``: losses, perplexities). This module is the bottom layer of
:mod:`clax.metrics`: it imports no other metrics module, so every other one may import it.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = [
    "CURVE_FIELDS",
    "Point",
    "as_int",
    "normalize_curves",
    "task_boundaries",
]

CURVE_FIELDS = ("step", "train_task", "eval_task", "accuracy")
# Keys that may carry the measured value of a mapping point (exactly one of them).
_VALUE_KEYS = ("accuracy", "value")

Point = tuple[int, int, int, float]


def as_int(value: Any, what: str, *, minimum: int | None = None) -> int:
    """``value`` as a Python int (integral floats such as ``3.0`` accepted, bools not).

    Args:
        value: The number to check.
        what: Its name in error messages (e.g. ``"curves[3].step"``).
        minimum: Optional smallest allowed value.

    Returns:
        The int.

    Raises:
        ValueError: If ``value`` is not integral or is below ``minimum``.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        if isinstance(value, numbers.Real) and float(value).is_integer():
            value = int(value)
        else:
            raise ValueError(f"{what} must be an int, got {value!r}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{what} must be >= {minimum}, got {value}")
    return value


def _point_fields(point: Any, k: int, metric: str | None) -> tuple[list[Any], str, str | None]:
    """``([step, train_task, eval_task, value], value_name, metric_name)`` of one point."""
    if isinstance(point, Mapping):
        base = CURVE_FIELDS[:3]
        missing = [f for f in base if f not in point]
        present = [f for f in _VALUE_KEYS if f in point]
        if missing or not present:
            raise ValueError(
                f"curves[{k}] is missing keys {missing or ['accuracy']}; expected "
                f"{CURVE_FIELDS} (or 'value' in place of 'accuracy')"
            )
        if len(present) > 1:
            raise ValueError(
                f"curves[{k}] has both 'accuracy' and 'value'; give the measurement once"
            )
        name = point.get("metric")
        if name is not None and not isinstance(name, str):
            raise ValueError(f"curves[{k}].metric must be a str, got {name!r}")
        if name is not None and metric is not None and name != metric:
            raise ValueError(
                f"curves[{k}] measures metric {name!r}, expected {metric!r}"
            )
        return [point[f] for f in base] + [point[present[0]]], present[0], name
    if isinstance(point, Sequence) and not isinstance(point, (str, bytes)):
        if len(point) != 4:
            raise ValueError(
                f"curves[{k}] must have 4 fields {CURVE_FIELDS}, got {len(point)}: {point!r}"
            )
        return list(point), "accuracy", None
    raise ValueError(f"curves[{k}] must be a dict or a 4-tuple {CURVE_FIELDS}, got {point!r}")


def normalize_curves(
    curves: Iterable[Any], *, bounded: bool = True, metric: str | None = None
) -> list[Point]:
    """Validates curve points and returns them as tuples.

    Args:
        curves: Iterable of points (see the module docstring), each a mapping with keys
            ``step``, ``train_task``, ``eval_task`` and ``accuracy`` or ``value`` (optionally
            ``metric``), or a 4-sequence in that order. ``step`` is the global training step
            (int >= 0), ``train_task`` the task being trained at that step and ``eval_task``
            the task evaluated (ints >= 0).
        bounded: True: every value must be a fraction in ``[0, 1]`` (accuracies, not
            percentages). False: any finite number (a loss, a perplexity).
        metric: Optional name of the metric: points with a ``metric`` key must name it. When
            None, the points that name a metric must all name the same one.

    Returns:
        A list of ``(step, train_task, eval_task, value)`` tuples of Python ints and float, in
        input order.

    Raises:
        ValueError: If a point is malformed, a value is out of range, or the points name
            different metrics.
    """
    if isinstance(curves, (str, bytes, Mapping)):
        raise ValueError(
            f"curves must be an iterable of points (dicts or 4-tuples), got {type(curves)}"
        )
    out = []
    for k, point in enumerate(curves):
        values, value_name, name = _point_fields(point, k, metric)
        if metric is None and name is not None:
            metric = name  # every later point must measure the same metric
        step = as_int(values[0], f"curves[{k}].step", minimum=0)
        train_task = as_int(values[1], f"curves[{k}].train_task", minimum=0)
        eval_task = as_int(values[2], f"curves[{k}].eval_task", minimum=0)
        v = values[3]
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise ValueError(f"curves[{k}].{value_name} must be a number, got {v!r}")
        v = float(v)
        if bounded and not 0.0 <= v <= 1.0:  # also rejects NaN
            raise ValueError(
                f"curves[{k}].{value_name} must be a fraction in [0, 1] (not a percentage), "
                f"got {v}"
            )
        if not math.isfinite(v):
            raise ValueError(f"curves[{k}].{value_name} must be finite, got {v}")
        out.append((step, train_task, eval_task, v))
    return out


def task_boundaries(points: Sequence[Point]) -> list[int]:
    """First step of each training task except the first one (where a new task started).

    Args:
        points: Normalized points (see :func:`normalize_curves`).

    Returns:
        The sorted first evaluated steps of every training task, without the earliest one.
    """
    first: dict[int, int] = {}
    for step, train_task, _, _ in points:
        first[train_task] = min(step, first.get(train_task, step))
    return sorted(first.values())[1:]
