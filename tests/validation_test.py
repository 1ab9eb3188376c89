"""Shared argument checks (clax/_validation.py)."""

import math

import numpy as np
import pytest

from clax._validation import check_real, check_unit_interval


def test_check_real_bounds_and_types():
    assert check_real("x", 0.5, 0.0, 1.0, low_open=True, high_open=True) == 0.5
    assert check_real("x", np.float32(1.0), 0.0, 1.0, low_open=True, high_open=False) == 1.0
    assert check_real("x", 3, 0.0, math.inf, low_open=False, high_open=True) == 3.0
    for bad, low_open, high_open in [(0.0, True, False), (1.0, False, True), (-1, False, False),
                                     (float("nan"), False, False), (math.inf, False, False),
                                     (True, False, False), (np.bool_(True), False, False),
                                     ("0.5", False, False), (None, False, False)]:
        with pytest.raises(ValueError, match=r"decay must be a number in [\[(]0.0, 1.0[\])]"):
            check_real("decay", bad, 0.0, 1.0, low_open=low_open, high_open=high_open)


def test_check_unit_interval():
    assert check_unit_interval("share", 0) == 0.0
    assert check_unit_interval("share", np.float64(1.0)) == 1.0
    for bad in (-0.01, 1.01, True, "1", float("nan")):
        with pytest.raises(ValueError, match=r"share must be a number in \[0, 1\]"):
            check_unit_interval("share", bad)
