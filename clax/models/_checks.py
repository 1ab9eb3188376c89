"""Argument validation shared by the model constructors and heads."""

from __future__ import annotations

from collections.abc import Sequence


def _is_positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def check_positive_int(name: str, value: object) -> int:
    """Returns ``value`` if it is a positive int, else raises ``ValueError`` naming ``name``."""
    if not _is_positive_int(value):
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value  # type: ignore[return-value]


def check_int_sequence(name: str, value: object, *, allow_empty: bool = False) -> tuple[int, ...]:
    """Returns ``value`` as a tuple of positive ints, else raises ``ValueError``."""
    what = "sequence" if allow_empty else "non-empty sequence"
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(f"{name} must be a {what} of positive ints, got {value!r}")
    out = tuple(value)
    if (not out and not allow_empty) or not all(_is_positive_int(v) for v in out):
        raise ValueError(f"{name} must be a {what} of positive ints, got {value!r}")
    return out


def check_input_shape_arg(input_shape: object) -> tuple[int, int, int]:
    """Validates a constructor ``input_shape`` ``(H, W, C)`` and returns it as a tuple."""
    if (
        isinstance(input_shape, (str, bytes))
        or not isinstance(input_shape, Sequence)
        or len(input_shape) != 3
        or not all(_is_positive_int(v) for v in input_shape)
    ):
        raise ValueError(f"input_shape must be three positive ints (H, W, C), got {input_shape!r}")
    return tuple(input_shape)  # type: ignore[return-value]
