"""Argument checks shared across clax: each raises ``ValueError`` naming the argument."""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) \
        and not isinstance(value, (bool, np.bool_))


def check_real(name: str, value: Any, low: float, high: float, *, low_open: bool,
               high_open: bool) -> float:
    """Returns ``float(value)`` if it is a finite real number in the interval, else raises.

    ``low_open`` / ``high_open`` make the bound strict; the message names ``name`` and
    prints the interval, e.g. ``decay must be a number in (0, 1], got 1.5``.
    """
    ok = _is_real(value) and math.isfinite(float(value))
    if ok:
        v = float(value)
        ok = (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
    if not ok:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be a number in {interval}, got {value!r}")
    return float(value)


def check_unit_interval(name: str, value: Any) -> float:
    """A share or fraction: a real number in ``[0, 1]``."""
    if not _is_real(value) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)
