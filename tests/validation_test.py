"""Shared argument checks (clax/_validation.py)."""

import math

import numpy as np
import pytest

from clax._validation import (
    check_bool,
    check_choice,
    check_int,
    check_int_sequence,
    check_params_given,
    check_positive_int,
    check_real,
    check_same_shapes,
    check_sequence,
    check_unit_interval,
    is_int,
    is_real,
)


def test_check_real_bounds_and_types():
    assert check_real("x", 0.5, 0.0, 1.0, low_open=True, high_open=True) == 0.5
    assert check_real("x", np.float32(1.0), 0.0, 1.0, low_open=True, high_open=False) == 1.0
    out = check_real("x", 3, 0.0, math.inf, low_open=False, high_open=True)
    assert out == 3.0 and type(out) is float
    for bad, low_open, high_open in [(0.0, True, False), (1.0, False, True), (-1, False, False),
                                     (float("nan"), False, False), (math.inf, False, False)]:
        with pytest.raises(ValueError, match=r"decay must be a number in [\[(]0.0, 1.0[\])]"):
            check_real("decay", bad, 0.0, 1.0, low_open=low_open, high_open=high_open)
    # The wrong type is a TypeError; the message keeps the interval and adds the type.
    for bad, kind in [(True, "bool"), (np.bool_(True), "bool"), ("0.5", "str"),
                      (None, "NoneType"), (np.ones(2), "ndarray")]:
        with pytest.raises(TypeError, match=r"decay must be a number in \(0.0, 1.0\], got .* "
                                            rf"\({kind}\)"):
            check_real("decay", bad, 0.0, 1.0, low_open=True, high_open=False)


def test_check_real_one_sided_bounds_read_as_inequalities():
    with pytest.raises(ValueError, match=r"^lam must be a finite number >= 0, got -1$"):
        check_real("lam", -1, 0.0, math.inf, low_open=False, high_open=True)
    with pytest.raises(ValueError, match=r"^tau must be a finite number > 0, got inf$"):
        check_real("tau", math.inf, 0.0, math.inf, low_open=True, high_open=True)
    with pytest.raises(ValueError, match=r"^x must be a finite number <= 1, got 2$"):
        check_real("x", 2, -math.inf, 1.0, low_open=True, high_open=False)
    with pytest.raises(ValueError, match=r"^scale must be a finite number, got nan$"):
        check_real("scale", math.nan, -math.inf, math.inf, low_open=True, high_open=True)


def test_check_unit_interval():
    assert check_unit_interval("share", 0) == 0.0
    assert check_unit_interval("share", np.float64(1.0)) == 1.0
    for bad in (-0.01, 1.01, float("nan")):
        with pytest.raises(ValueError, match=r"share must be a number in \[0, 1\]"):
            check_unit_interval("share", bad)
    for bad in (True, "1", None):
        with pytest.raises(TypeError, match=r"share must be a number in \[0, 1\], got"):
            check_unit_interval("share", bad)


def test_predicates():
    assert is_int(3) and is_int(np.int64(3)) and not is_int(True) and not is_int(3.0)
    assert not is_int(np.bool_(False)) and not is_int("3")
    assert is_real(3) and is_real(np.float32(0.5)) and not is_real(True) and not is_real("1")


def test_check_positive_int():
    out = check_positive_int("buffer_size", np.int32(4))
    assert out == 4 and type(out) is int
    with pytest.raises(TypeError, match=r"^buffer_size must be a positive int, got 'a' \(str\)$"):
        check_positive_int("buffer_size", "a")
    for bad, kind in [(2.0, "float"), (True, "bool"), (None, "NoneType")]:
        with pytest.raises(TypeError, match=rf"buffer_size must be a positive int, .*\({kind}\)"):
            check_positive_int("buffer_size", bad)
    for bad in (0, -3):
        with pytest.raises(ValueError, match=rf"^buffer_size must be a positive int, got {bad}$"):
            check_positive_int("buffer_size", bad)


def test_check_int_bounds_and_wording():
    assert check_int("k", 0, low=0) == 0
    assert check_int("k", -5) == -5
    assert check_int("k", 3, low=1, high=3) == 3
    assert check_int("k", None, low=1, optional=True) is None
    cases = [({"low": 0}, -1, "a non-negative int"), ({"low": 2}, 1, "an int >= 2"),
             ({"high": 4}, 5, "an int <= 4"), ({"low": 1, "high": 4}, 5, r"an int in \[1, 4\]"),
             ({"low": 1, "optional": True}, 0, "None or a positive int")]
    for kw, bad, what in cases:
        with pytest.raises(ValueError, match=rf"^k must be {what}, got {bad}$"):
            check_int("k", bad, **kw)
    with pytest.raises(TypeError, match=r"^k must be an int, got 1.5 \(float\)$"):
        check_int("k", 1.5)
    with pytest.raises(TypeError, match=r"^k must be None or a non-negative int, got '0'"):
        check_int("k", "0", low=0, optional=True)
    with pytest.raises(TypeError, match="k must be a positive int"):
        check_int("k", None, low=1)  # None only when optional


def test_check_bool():
    assert check_bool("flag", True) is True
    assert check_bool("flag", np.bool_(False)) is False
    for bad, kind in [(1, "int"), (0, "int"), ("True", "str"), (None, "NoneType")]:
        with pytest.raises(TypeError, match=rf"^flag must be a bool, got .* \({kind}\)$"):
            check_bool("flag", bad)


def test_check_choice():
    assert check_choice("mode", "online", ("online", "separate")) == "online"
    assert check_choice("k", 2, [1, 2]) == 2
    with pytest.raises(ValueError, match=r"^mode must be one of \['online', 'separate'\], "
                                         r"got 'x'$"):
        check_choice("mode", "x", ("online", "separate"))
    with pytest.raises(TypeError, match=r"mode must be one of .*, got 1 \(int\)$"):
        check_choice("mode", 1, ("online", "separate"))
    with pytest.raises(TypeError, match=r"got None \(NoneType\)"):
        check_choice("mode", None, ("online", "separate"))
    with pytest.raises(ValueError, match=r"^k must be one of \[1, 2\], got 3$"):
        check_choice("k", 3, [1, 2])


def test_check_sequence():
    assert check_sequence("eps", [0.5, 1], check_unit_interval) == (0.5, 1.0)
    assert check_sequence("eps", (), check_unit_interval) == ()
    with pytest.raises(ValueError, match=r"^eps must be a non-empty sequence, got \(\)$"):
        check_sequence("eps", (), check_unit_interval, allow_empty=False)
    for bad in ("ab", 0.5, {0.5}, None):
        with pytest.raises(TypeError, match=r"^eps must be a sequence \(list or tuple\), got"):
            check_sequence("eps", bad, check_unit_interval)
    with pytest.raises(ValueError, match=r"^eps\[1\] must be a number in \[0, 1\], got 2$"):
        check_sequence("eps", (0.5, 2), check_unit_interval)
    with pytest.raises(TypeError, match=r"^eps\[0\] must be a number in \[0, 1\], got 'a'"):
        check_sequence("eps", ["a"], check_unit_interval)


def test_check_int_sequence():
    out = check_int_sequence("hidden", [64, np.int64(32)])
    assert out == (64, 32) and all(type(v) is int for v in out)
    assert check_int_sequence("pad", (), low=0, allow_empty=True) == ()
    assert check_int_sequence("pad", (0, 2), low=0) == (0, 2)
    with pytest.raises(ValueError, match=r"^hidden must be a non-empty sequence of positive "
                                         r"ints, got \(64, 0\)$"):
        check_int_sequence("hidden", (64, 0))
    with pytest.raises(ValueError, match="hidden must be a non-empty sequence"):
        check_int_sequence("hidden", [])
    with pytest.raises(ValueError, match=r"pad must be a sequence of ints >= 2, got \(1,\)"):
        check_int_sequence("pad", (1,), low=2, allow_empty=True)
    for bad in ("64", 64, (64, 2.0), (True,), None):
        with pytest.raises(TypeError, match="hidden must be a non-empty sequence of positive"):
            check_int_sequence("hidden", bad)


def test_check_params_given():
    check_params_given({"w": 1.0}, "ewc_penalty")
    with pytest.raises(ValueError, match=r"^ewc_penalty needs the current parameters: pass "
                                         r"`params`"):
        check_params_given(None, "ewc_penalty")


def test_check_same_shapes_names_both_trees():
    ref = {"w": np.zeros((2, 3)), "b": np.zeros(3)}
    check_same_shapes("anchor", {"w": np.ones((2, 3), np.int32), "b": np.ones(3)}, "params", ref)
    with pytest.raises(ValueError, match=r"^anchor must have the structure and leaf shapes of "
                                         r"params: params and anchor differ in leaves 'b': "
                                         r"shapes: \(3,\) != \(4,\)"):
        check_same_shapes("anchor", {"w": np.ones((2, 3)), "b": np.ones(4)}, "params", ref)
    with pytest.raises(ValueError, match=r"(?s)anchor must have the structure .*params: "
                                         r"PyTreeDef.*anchor: PyTreeDef\(\{'w'"):
        check_same_shapes("anchor", {"w": np.ones((2, 3))}, "params", ref)
