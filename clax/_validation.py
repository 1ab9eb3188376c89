"""Argument checks shared across clax: one helper per kind of check.

Convention, for every helper:

* a value of the wrong **type** raises ``TypeError`` (``buffer_size="a"``, a float where an
  int is required, an int where a bool flag is; ``bool`` is not an int or a number here);
* a value of the right type outside its range raises ``ValueError``;
* the message names the argument and says what was expected, e.g.
  ``buffer_size must be a positive int, got 'a' (str)`` (type errors also print the type).

Each helper returns the value normalised to a plain Python type (``int``, ``float``,
``bool``, ``tuple``), so callers can write ``n = check_positive_int("n", n)``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import chex
import numpy as np

T = TypeVar("T")


def _got(value: Any) -> str:
    """``got 'a' (str)``: the value and its type, for type errors."""
    return f"got {value!r} ({type(value).__name__})"


def is_int(value: Any) -> bool:
    """A Python or NumPy integer, not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def is_real(value: Any) -> bool:
    """A Python or NumPy int or float, not a bool (finiteness is not checked)."""
    return isinstance(value, (int, float, np.integer, np.floating)) \
        and not isinstance(value, (bool, np.bool_))


def _int_range(low: int | None, high: int | None) -> str:
    if high is None:
        return {None: "an int", 0: "a non-negative int", 1: "a positive int"}.get(
            low, f"an int >= {low}")
    return f"an int <= {high}" if low is None else f"an int in [{low}, {high}]"


def check_int(name: str, value: Any, *, low: int | None = None, high: int | None = None,
              optional: bool = False) -> int | None:
    """An int in ``[low, high]`` (either bound may be ``None``); ``None`` too if ``optional``.

    ``low=1`` reads "a positive int", ``low=0`` "a non-negative int", e.g.
    ``start_task must be a non-negative int, got -1``.

    Raises:
        TypeError: ``value`` is not an int (a bool, a float, a str, ...).
        ValueError: ``value`` is outside ``[low, high]``.
    """
    if optional and value is None:
        return None
    what = ("None or " if optional else "") + _int_range(low, high)
    if not is_int(value):
        raise TypeError(f"{name} must be {what}, {_got(value)}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return int(value)


def check_bool(name: str, value: Any) -> bool:
    """A bool flag (``True``/``False`` or a NumPy bool); ``0``/``1`` are not bools.

    Raises:
        TypeError: ``value`` is not a bool.
    """
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, {_got(value)}")
    return bool(value)


def check_choice(name: str, value: Any, choices: Sequence[T]) -> T:
    """One of ``choices``: ``mode must be one of ['online', 'separate'], got 'x'``.

    Raises:
        TypeError: the choices are all strings and ``value`` is not one.
        ValueError: ``value`` is not among ``choices``.
    """
    choices = tuple(choices)
    if all(isinstance(c, str) for c in choices) and not isinstance(value, str):
        raise TypeError(f"{name} must be one of {list(choices)}, {_got(value)}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def _interval(low: float, high: float, low_open: bool, high_open: bool) -> str:
    if math.isinf(low) and math.isinf(high):
        return "a finite number"
    if math.isinf(high):
        return f"a finite number {'>' if low_open else '>='} {low:g}"
    if math.isinf(low):
        return f"a finite number {'<' if high_open else '<='} {high:g}"
    return f"a number in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"


def check_real(name: str, value: Any, low: float, high: float, *, low_open: bool,
               high_open: bool) -> float:
    """Returns ``float(value)`` if it is a finite real number in the interval, else raises.

    ``low_open`` / ``high_open`` make the bound strict; the message names ``name`` and
    prints the interval, e.g. ``decay must be a number in (0, 1], got 1.5``. An infinite
    bound reads as a one-sided one: ``(0, inf)`` is ``a finite number > 0``.

    Raises:
        TypeError: ``value`` is not a real number (a bool, a str, ``None``, an array).
        ValueError: ``value`` is not finite or outside the interval.
    """
    what = _interval(low, high, low_open, high_open)
    if not is_real(value):
        raise TypeError(f"{name} must be {what}, {_got(value)}")
    v = float(value)
    if not (math.isfinite(v) and (v > low if low_open else v >= low)
            and (v < high if high_open else v <= high)):
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return v


def check_unit_interval(name: str, value: Any) -> float:
    """A share or fraction: a real number in ``[0, 1]`` (``TypeError`` for a non-number)."""
    if not is_real(value):
        raise TypeError(f"{name} must be a number in [0, 1], {_got(value)}")
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


def check_positive_int(name: str, value: Any) -> int:
    """An int ``>= 1`` (not a bool).

    >>> check_positive_int("buffer_size", 200)
    200
    >>> check_positive_int("buffer_size", 0)
    Traceback (most recent call last):
    ...
    ValueError: buffer_size must be a positive int, got 0
    """
    return check_int(name, value, low=1)


def check_sequence(name: str, value: Any, check_item: Callable[[str, Any], T], *,
                   allow_empty: bool = True) -> tuple[T, ...]:
    """A list or tuple whose items pass ``check_item(f"{name}[{i}]", item)``.

    Raises:
        TypeError: ``value`` is not a list or tuple (a str, a set, a scalar), or an item
            has the wrong type (from ``check_item``).
        ValueError: ``value`` is empty and ``allow_empty`` is false, or an item is out of
            range (from ``check_item``).
    """
    what = "sequence" if allow_empty else "non-empty sequence"
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{name} must be a {what} (list or tuple), {_got(value)}")
    if not value and not allow_empty:
        raise ValueError(f"{name} must be a {what}, got {value!r}")
    return tuple(check_item(f"{name}[{i}]", v) for i, v in enumerate(value))


def check_int_sequence(name: str, value: Any, *, low: int = 1,
                       allow_empty: bool = False) -> tuple[int, ...]:
    """A sequence (not a str) of ints ``>= low``, returned as a tuple.

    The message names the whole argument: ``hidden must be a non-empty sequence of
    positive ints, got (64, 0)``.

    Raises:
        TypeError: ``value`` is not a sequence, or an item is not an int.
        ValueError: ``value`` is empty (unless ``allow_empty``) or an item is ``< low``.
    """
    items = {0: "non-negative ints", 1: "positive ints"}.get(low, f"ints >= {low}")
    what = f"{'sequence' if allow_empty else 'non-empty sequence'} of {items}"
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) \
            or not all(is_int(v) for v in value):
        raise TypeError(f"{name} must be a {what}, {_got(value)}")
    out = tuple(int(v) for v in value)
    if (not out and not allow_empty) or any(v < low for v in out):
        raise ValueError(f"{name} must be a {what}, got {value!r}")
    return out


def check_params_given(params: Any, transform: str) -> None:
    """An optax ``update`` of a transform that reads the parameters was given them.

    Replaces optax's private ``NO_PARAMS_MSG`` with a message naming the transform.

    Raises:
        ValueError: ``params`` is ``None`` (as optax's own transforms do).
    """
    if params is None:
        raise ValueError(f"{transform} needs the current parameters: pass `params` when "
                         "calling `update`")


def check_same_shapes(name: str, tree: Any, ref_name: str, ref: Any) -> None:
    """``tree`` has the tree structure and leaf shapes of ``ref`` (dtypes may differ).

    A ``chex.assert_trees_all_equal_shapes`` check (shapes only: no device transfer, so it
    is free at trace time) whose ``AssertionError`` becomes a ``ValueError`` naming both
    arguments, e.g. ``reference_grads must have the structure and leaf shapes of the
    gradients: the gradients and reference_grads differ in leaves 'w': shapes: (2,) !=
    (3,)`` (``ref`` is printed first). Disabled with chex's asserts
    (``chex.disable_asserts()``).

    Raises:
        ValueError: The structures or a leaf's shape differ (naming the first leaf path).
    """
    try:
        chex.assert_trees_all_equal_shapes(ref, tree)
    except AssertionError as e:
        detail = str(e).split(" failed:", 1)[-1].strip()
        detail = re.sub(r"(?i)\btrees 0 and 1\b", f"{ref_name} and {name}", detail)
        detail = re.sub(r"\btree 0:", f"{ref_name}:", re.sub(r"\btree 1:", f"{name}:", detail))
        raise ValueError(f"{name} must have the structure and leaf shapes of {ref_name}: "
                         f"{detail}") from None
