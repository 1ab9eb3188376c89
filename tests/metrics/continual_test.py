"""Tests for clax.metrics.continual against hand-computed accuracy matrices."""

import numpy as np
import pytest

from clax.metrics import continual

# Example 1 (3 tasks).
R1 = [
    [0.9, 0.1, 0.2],
    [0.7, 0.8, 0.1],
    [0.6, 0.5, 0.95],
]
B1 = [0.1, 0.15, 0.05]

# Example 2 (4 tasks): task 0 rises after its own task (0.5 -> 0.8) and then drops, task 1 peaks
# one task later (0.6 -> 0.9), so the forgetting max is off the diagonal. R2[0, 1] = 0.95 sits in
# the upper triangle (before task 1 was trained) and must not count as task 1's best accuracy.
R2 = [
    [0.5, 0.95, 0.0, 0.0],
    [0.8, 0.6, 0.1, 0.0],
    [0.7, 0.9, 0.7, 0.2],
    [0.4, 0.6, 0.6, 0.9],
]
B2 = [0.1, 0.1, 0.1, 0.1]


class TestExample1:
    def test_average_accuracy(self):
        # Last row, all 3 tasks seen: (0.6 + 0.5 + 0.95) / 3 = 2.05 / 3.
        assert continual.average_accuracy(R1) == pytest.approx(0.6833333333333333)

    def test_average_accuracy_after_task(self):
        # Only seen tasks: after task 0 -> 0.9; after task 1 -> (0.7 + 0.8) / 2 = 0.75.
        assert continual.average_accuracy(R1, after_task=0) == pytest.approx(0.9)
        assert continual.average_accuracy(R1, after_task=1) == pytest.approx(0.75)
        assert continual.average_accuracy(R1, after_task=2) == pytest.approx(0.6833333333333333)

    def test_backward_transfer(self):
        # ((0.6 - 0.9) + (0.5 - 0.8)) / 2 = (-0.3 - 0.3) / 2 = -0.3.
        assert continual.backward_transfer(R1) == pytest.approx(-0.3)

    def test_forward_transfer(self):
        # ((R[0,1] - b[1]) + (R[1,2] - b[2])) / 2 = ((0.1 - 0.15) + (0.1 - 0.05)) / 2 = 0.0.
        assert continual.forward_transfer(R1, B1) == pytest.approx(0.0, abs=1e-12)

    def test_forgetting(self):
        # f_0 = max(0.9, 0.7) - 0.6 = 0.3; f_1 = max(0.8) - 0.5 = 0.3; mean = 0.3.
        assert continual.average_forgetting(R1) == pytest.approx(0.3)

    def test_average_incremental_accuracy(self):
        # (0.9 + 0.75 + 2.05/3) / 3 = (0.9 + 0.75 + 0.683333...) / 3 = 0.777777...
        assert continual.average_incremental_accuracy(R1) == pytest.approx(0.7777777777777778)

    def test_summarize(self):
        s = continual.summarize(R1, B1)
        assert set(s) == {"acc", "bwt", "fwt", "forgetting", "avg_incremental_acc"}
        assert all(type(v) is float for v in s.values())
        assert s["acc"] == pytest.approx(0.6833333333333333)
        assert s["bwt"] == pytest.approx(-0.3)
        assert s["fwt"] == pytest.approx(0.0, abs=1e-12)
        assert s["forgetting"] == pytest.approx(0.3)
        assert s["avg_incremental_acc"] == pytest.approx(0.7777777777777778)

    def test_summarize_without_b(self):
        s = continual.summarize(np.array(R1))
        assert s["fwt"] is None
        assert s["bwt"] == pytest.approx(-0.3)


class TestExample2:
    def test_forgetting_max_off_diagonal(self):
        # f_0 = max(R[0,0], R[1,0], R[2,0]) - R[3,0] = max(0.5, 0.8, 0.7) - 0.4 = 0.4
        # f_1 = max(R[1,1], R[2,1]) - R[3,1] = max(0.6, 0.9) - 0.6 = 0.3  (R[0,1]=0.95 excluded)
        # f_2 = max(R[2,2]) - R[3,2] = 0.7 - 0.6 = 0.1
        # F = (0.4 + 0.3 + 0.1) / 3 = 0.8 / 3 = 0.2666...
        assert continual.average_forgetting(R2) == pytest.approx(0.26666666666666666)

    def test_backward_transfer_uses_diagonal(self):
        # ((0.4 - 0.5) + (0.6 - 0.6) + (0.6 - 0.7)) / 3 = -0.2 / 3 = -0.0666...
        assert continual.backward_transfer(R2) == pytest.approx(-0.06666666666666667)

    def test_forward_transfer(self):
        # ((0.95 - 0.1) + (0.1 - 0.1) + (0.2 - 0.1)) / 3 = 0.95 / 3 = 0.31666...
        assert continual.forward_transfer(R2, B2) == pytest.approx(0.31666666666666665)

    def test_accuracies(self):
        # ACC = (0.4 + 0.6 + 0.6 + 0.9) / 4 = 0.625.
        assert continual.average_accuracy(R2) == pytest.approx(0.625)
        # ACC_i: 0.5, (0.8 + 0.6)/2 = 0.7, (0.7 + 0.9 + 0.7)/3 = 0.7666..., 0.625.
        # AIA = (0.5 + 0.7 + 0.766666... + 0.625) / 4 = 2.591666... / 4 = 0.6479166...
        assert continual.average_incremental_accuracy(R2) == pytest.approx(0.6479166666666667)

    def test_upper_triangle_ignored_except_fwt(self):
        # Changing not-yet-seen entries must only move FWT.
        R = np.array(R2)
        R_other = R.copy()
        R_other[np.triu_indices(4, k=1)] = 0.33
        a, b = continual.summarize(R, B2), continual.summarize(R_other, B2)
        for key in ("acc", "bwt", "forgetting", "avg_incremental_acc"):
            assert a[key] == b[key], key
        assert a["fwt"] != b["fwt"]


def test_forgetting_not_clipped_when_final_is_best():
    # R = [[0.5, 0.2], [0.7, 0.8]]: f_0 = 0.5 - 0.7 = -0.2; BWT = 0.7 - 0.5 = +0.2.
    R = [[0.5, 0.2], [0.7, 0.8]]
    assert continual.average_forgetting(R) == pytest.approx(-0.2)
    assert continual.backward_transfer(R) == pytest.approx(0.2)


def test_forgetting_at_least_minus_bwt():
    rng = np.random.default_rng(0)
    for _ in range(20):
        R = rng.uniform(size=(5, 5))
        assert continual.average_forgetting(R) >= -continual.backward_transfer(R) - 1e-12


class TestSingleTask:
    def test_all_metrics(self):
        R = [[0.7]]
        assert continual.average_accuracy(R) == pytest.approx(0.7)
        assert continual.backward_transfer(R) == 0.0
        assert continual.forward_transfer(R, [0.1]) == 0.0
        assert continual.average_forgetting(R) == 0.0
        assert continual.average_incremental_accuracy(R) == pytest.approx(0.7)

    def test_summarize_has_no_nan(self):
        s = continual.summarize([[0.7]], [0.1])
        assert s["bwt"] == 0.0 and s["fwt"] == 0.0 and s["forgetting"] == 0.0
        assert not any(np.isnan(v) for v in s.values())


class TestValidation:
    @pytest.mark.parametrize(
        "R, match",
        [
            ([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]], "square"),
            ([0.1, 0.2], "2-D"),
            (np.zeros((2, 2, 2)), "2-D"),
            (np.zeros((0, 0)), "at least one task"),
            ([[0.5, float("nan")], [0.5, 0.5]], "finite"),
            ([[0.5, float("inf")], [0.5, 0.5]], "finite"),
            ([[93.0, 10.0], [90.0, 95.0]], r"fractions in \[0, 1\]"),
            ([[1.01, 0.0], [0.5, 0.5]], r"fractions in \[0, 1\]"),
            ([[-0.1, 0.0], [0.5, 0.5]], r"fractions in \[0, 1\]"),
            ([["a", "b"], ["c", "d"]], "numeric"),
        ],
    )
    def test_bad_matrix(self, R, match):
        with pytest.raises(ValueError, match=match) as info:
            continual.summarize(R)
        assert "R" in str(info.value)

    def test_bounds_inclusive(self):
        assert continual.average_accuracy([[0.0, 1.0], [1.0, 0.0]]) == pytest.approx(0.5)

    @pytest.mark.parametrize("b", [[0.1, 0.2], [0.1, 0.2, 0.3, 0.4], [[0.1, 0.2, 0.3]], 0.1])
    def test_bad_b_shape(self, b):
        with pytest.raises(ValueError, match=r"b must have shape \(3,\)"):
            continual.forward_transfer(R1, b)

    @pytest.mark.parametrize("b", [[0.1, 1.5, 0.3], [0.1, float("nan"), 0.3]])
    def test_bad_b_values(self, b):
        with pytest.raises(ValueError, match="b must"):
            continual.summarize(R1, b)

    @pytest.mark.parametrize("after_task", [3, -1, 1.0, True, "0"])
    def test_bad_after_task(self, after_task):
        with pytest.raises(ValueError, match="after_task"):
            continual.average_accuracy(R1, after_task=after_task)

    def test_numpy_int_after_task(self):
        assert continual.average_accuracy(R1, after_task=np.int64(1)) == pytest.approx(0.75)

    def test_input_not_modified(self):
        R = np.array(R1)
        before = R.copy()
        continual.summarize(R, B1)
        np.testing.assert_array_equal(R, before)
