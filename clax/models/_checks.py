"""Argument validation shared by the model constructors and heads."""

from __future__ import annotations

from collections.abc import Sequence

# The shared checks (clax/_validation.py), re-exported for the model modules.
from clax._validation import check_int_sequence, check_positive_int, is_int

__all__ = ["check_input_shape_arg", "check_int_sequence", "check_positive_int"]


def check_input_shape_arg(input_shape: object) -> tuple[int, int, int]:
    """Validates a constructor ``input_shape`` ``(H, W, C)`` and returns it as a tuple.

    Raises:
        TypeError: ``input_shape`` is not a sequence of ints.
        ValueError: it does not have three entries, or one is ``< 1``.
    """
    what = "input_shape must be three positive ints (H, W, C)"
    if isinstance(input_shape, (str, bytes)) or not isinstance(input_shape, Sequence) \
            or not all(is_int(v) for v in input_shape):
        raise TypeError(f"{what}, got {input_shape!r} ({type(input_shape).__name__})")
    if len(input_shape) != 3 or any(v < 1 for v in input_shape):
        raise ValueError(f"{what}, got {input_shape!r}")
    return tuple(int(v) for v in input_shape)  # type: ignore[return-value]
