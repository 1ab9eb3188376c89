"""Tests for clax.metrics.stability: stability-gap metrics against hand-computed examples and a
transcription of the official deque-based implementation (mattdl/ContinualEvaluation)."""

from collections import defaultdict, deque

import numpy as np
import pytest

from clax.metrics import stability


def _curves(train_tasks, table):
    """Points from one row per evaluation: row n holds the accuracies of tasks 0..len(row)-1."""
    return [
        (10 * (n + 1), k, j, acc)
        for n, (k, row) in enumerate(zip(train_tasks, table, strict=False))
        for j, acc in enumerate(row)
    ]


# Three tasks, two evaluations each (rho = 10); only seen tasks are evaluated.
#   step  current  A_0   A_1   A_2
#    10      0     0.50
#    20      0     0.90
#    30      1     0.40  0.60         <- stability gap on task 0 right after the switch
#    40      1     0.80  0.90
#    50      2     0.70  0.30  0.50
#    60      2     0.85  0.75  0.95
THREE_TASKS = _curves(
    [0, 0, 1, 1, 2, 2],
    [[0.5], [0.9], [0.4, 0.6], [0.8, 0.9], [0.7, 0.3, 0.5], [0.85, 0.75, 0.95]],
)


class TestMinAndWorstCaseAccuracy:
    def test_hand_computed(self):
        # min over evaluations after each task was learned (not while it is current):
        # task 0: min(0.4, 0.8, 0.7, 0.85) = 0.4; task 1: min(0.3, 0.75) = 0.3; task 2 current.
        assert stability.min_accuracy(THREE_TASKS) == pytest.approx((0.4 + 0.3) / 2)
        # WC-ACC = 1/k * A_current + (1 - 1/k) * min-ACC with k = 3.
        assert stability.worst_case_accuracy(THREE_TASKS) == pytest.approx(
            0.95 / 3 + (2 / 3) * 0.35
        )

    def test_current_task_is_excluded(self):
        # Task 1's low 0.6 / 0.9 while it was being trained must not enter its minimum, and
        # the current task 2 (0.5 at step 50) must not enter min-ACC at all.
        tracked = stability.tracking_metrics(THREE_TASKS)
        np.testing.assert_allclose(tracked["step"], [10, 20, 30, 40, 50, 60])
        np.testing.assert_allclose(tracked["min_acc"], [np.nan, np.nan, 0.4, 0.4, 0.35, 0.35])
        np.testing.assert_allclose(tracked["current_acc"], [0.5, 0.9, 0.6, 0.9, 0.5, 0.95])
        np.testing.assert_allclose(
            tracked["wc_acc"],
            [0.5, 0.9, (0.6 + 0.4) / 2, (0.9 + 0.4) / 2, (0.5 + 0.4 + 0.3) / 3,
             (0.95 + 0.4 + 0.3) / 3],
        )

    def test_weighting_is_one_over_k(self):
        # Five tasks; the minima of the four earlier ones are all 0, the current task is at 1
        # (task 3 drops to 0 only at the last evaluation, after it stopped being current):
        # WC-ACC = 1/5, ACC over seen tasks would be much higher.
        curves = _curves([0, 1, 2, 3, 4], [[1.0], [0.0, 1.0], [0.0, 0.0, 1.0],
                                           [0.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 0.0, 1.0]])
        assert stability.worst_case_accuracy(curves) == pytest.approx(1 / 5)
        assert stability.min_accuracy(curves) == pytest.approx(0.0)

    def test_tasks_evaluated_before_they_are_learned_do_not_count(self):
        # Task 1 is evaluated (0.1) while task 0 trains: it is not learned yet.
        curves = [(1, 0, 0, 0.9), (1, 0, 1, 0.1), (2, 1, 0, 0.6), (2, 1, 1, 0.8),
                  (3, 2, 0, 0.7), (3, 2, 1, 0.5), (3, 2, 2, 0.9)]
        assert stability.min_accuracy(curves) == pytest.approx((0.6 + 0.5) / 2)

    def test_single_task(self):
        curves = _curves([0, 0, 0], [[0.2], [0.5], [0.7]])
        assert stability.min_accuracy(curves) is None
        assert stability.worst_case_accuracy(curves) == pytest.approx(0.7)

    def test_current_task_not_evaluated_gives_none(self):
        curves = [(1, 0, 0, 0.9), (2, 1, 0, 0.3)]
        assert stability.min_accuracy(curves) == pytest.approx(0.3)
        assert stability.worst_case_accuracy(curves) is None

    def test_wc_acc_lower_bounds_seen_task_accuracy(self):
        rng = np.random.default_rng(0)
        for _ in range(20):
            train = np.repeat(np.arange(4), 5)
            table = [rng.uniform(size=k + 1) for k in train]
            curves = _curves(train, table)
            tracked = stability.tracking_metrics(curves)
            seen_mean = np.array([np.mean(row) for row in table])
            assert np.all(tracked["wc_acc"] <= seen_mean + 1e-12)


class TestWindowedMetrics:
    # One task: a drop of 0.5 spread over 4 evaluations early on, then steady growth.
    SLOW_DROP = _curves([0] * 12, [[a] for a in
                                   (0.9, 0.8, 0.6, 0.5, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95)])

    def test_forgetting_hand_computed(self):
        # w = 2: consecutive drops only, largest 0.2 (0.8 -> 0.6); w = 3: 0.8 -> 0.5 = 0.3;
        # w = 5: 0.9 -> 0.4 = 0.5. The final windows have no drop: the running max is kept.
        assert stability.windowed_forgetting(self.SLOW_DROP, 2) == pytest.approx(0.2)
        assert stability.windowed_forgetting(self.SLOW_DROP, 3) == pytest.approx(0.3)
        assert stability.windowed_forgetting(self.SLOW_DROP, 5) == pytest.approx(0.5)
        assert stability.windowed_forgetting(self.SLOW_DROP, 12) == pytest.approx(0.5)

    def test_plasticity_hand_computed(self):
        # Largest gain within w evaluations: w = 2: 0.1 steps; w = 12: 0.4 -> 0.95.
        assert stability.windowed_plasticity(self.SLOW_DROP, 2) == pytest.approx(0.1)
        assert stability.windowed_plasticity(self.SLOW_DROP, 12) == pytest.approx(0.55)

    def test_averaged_over_tasks_with_zero_for_no_drop(self):
        # Task 0 drops 0.9 -> 0.3 within 2 evaluations; task 1 only improves: WF counts it as 0.
        curves = _curves([0, 0, 1, 1], [[0.9], [0.9], [0.3, 0.2], [0.4, 0.6]])
        assert stability.windowed_forgetting(curves, 2) == pytest.approx((0.6 + 0.0) / 2)
        assert stability.windowed_plasticity(curves, 2) == pytest.approx((0.1 + 0.4) / 2)

    def test_three_tasks(self):
        # Task 0: 0.5 .9 .4 .8 .7 .85 -> drops within 2: .5, within 3: .5; task 1: .6 .9 .3 .75
        # -> .6; task 2: .5 .95 -> 0. WF^2 = (0.5 + 0.6 + 0) / 3.
        assert stability.windowed_forgetting(THREE_TASKS, 2) == pytest.approx(1.1 / 3)
        # WP^2: task 0 +0.4 (0.5 -> 0.9, 0.4 -> 0.8), task 1 +0.45, task 2 +0.45.
        assert stability.windowed_plasticity(THREE_TASKS, 2) == pytest.approx(1.3 / 3)

    @pytest.mark.parametrize("window, match", [
        (7, r"window=7 is larger than the 6 evaluations"),
        (1, r"window must be >= 2"),
        (2.5, r"window must be an int"),
        (True, r"window must be an int"),
    ])
    def test_bad_window(self, window, match):
        with pytest.raises(ValueError, match=match):
            stability.windowed_forgetting(THREE_TASKS, window)
        with pytest.raises(ValueError, match=match):
            stability.windowed_plasticity(THREE_TASKS, window)


def _max_consec_delta_from_window(window, delta):
    """WindowedForgettingPluginMetric.max_consec_delta_from_window, transcribed line by line."""
    if len(window) <= 1:
        return 0
    max_delta = float("-inf")
    max_found_acc = float("-inf")
    for idx, val in enumerate(window):
        if val < max_found_acc:  # Delta can only increase if higher
            continue
        max_found_acc = val
        for other_idx in range(idx + 1, len(window)):
            other_val = window[other_idx]
            d = delta(val, other_val)
            if d > max_delta:
                max_delta = d
    return max_delta


def _forgetting_delta(first_val, next_val):  # WindowedForgettingPluginMetric.delta
    return first_val - next_val


def _plasticity_delta(first_val, next_val):  # WindowedPlasticityPluginMetric.delta
    return next_val - first_val


def _official_windowed(sequence, w, delta):
    """One task of the official plugin: a deque of the last w values, a running max from 0."""
    window = deque()
    max_change = 0.0  # defaultdict(float)
    for a in sequence:
        window.append(a)
        if len(window) > w:
            window.popleft()
        max_change = max(max_change, _max_consec_delta_from_window(window, delta))
    return max_change


def _paper_windowed(sequence, w, gain):
    """The paper's formula, literally: max(0, max_n max_{n <= m < m' <= n+w-1} d(A(m), A(m')))
    over the windows of the sequence (the whole sequence when it is shorter than w)."""
    n_values = len(sequence)
    best = 0.0
    for n in range(max(1, n_values - w + 1)):
        for m in range(n, min(n + w, n_values)):
            for m2 in range(m + 1, min(n + w, n_values)):
                d = sequence[m2] - sequence[m] if gain else sequence[m] - sequence[m2]
                best = max(best, d)
    return best


def _official(curves, windows):
    """The official metric plugins, transcribed: per-evaluation updates of deques and dicts."""
    grid = stability.evaluation_grid(curves)
    min_acc = defaultdict(lambda: float("inf"))
    wc_acc = None
    for k, row in zip(grid.train_task, grid.accuracy, strict=False):
        for task, a in enumerate(row):
            if not np.isnan(a) and task != k:  # TaskTrackingMINAccuracyPluginMetric
                min_acc[task] = min(min_acc[task], a)  # (only seen tasks are evaluated)
        values = [row[k]] + [m for t, m in min_acc.items() if t != k]  # WCACCPluginMetric
        wc_acc = float(np.mean(values))
    others = [m for t, m in min_acc.items() if t != k]
    out = {"min_acc": float(np.mean(others)) if others else None, "wc_acc": wc_acc}
    sequences = [[a for a in col if not np.isnan(a)] for col in grid.accuracy.T]
    sequences = [seq for seq in sequences if seq]
    for w in windows:  # WindowedForgetting / WindowedPlasticity, one deque per task
        out[f"wf_{w}"] = float(np.mean(
            [_official_windowed(seq, w, _forgetting_delta) for seq in sequences]))
        out[f"wp_{w}"] = float(np.mean([_paper_windowed(seq, w, True) for seq in sequences]))
        out[f"wp_official_{w}"] = float(np.mean(
            [_official_windowed(seq, w, _plasticity_delta) for seq in sequences]))
    return out


def test_matches_the_official_implementation_on_random_curves():
    # wf_* and wp_official_* against the official deque algorithm, wp_* against the paper's
    # formula (the two disagree on WP, see TestWindowedDefinitions).
    rng = np.random.default_rng(1)
    for trial in range(10):
        num_tasks = int(rng.integers(1, 5))
        per_task = int(rng.integers(1, 8))
        train = np.repeat(np.arange(num_tasks), per_task)
        table = [np.round(rng.uniform(size=k + 1), 3) for k in train]
        curves = _curves(train, table)
        windows = sorted({2, min(3, len(train)), len(train)} - {1}) or [2]
        if len(train) < 2:
            continue
        ours = stability.stability_summary(curves, windows=windows)
        ref = _official(curves, windows)
        assert ours.keys() == ref.keys(), trial
        for key in ours:
            if ref[key] is None:
                assert ours[key] is None, (trial, key)
            else:
                assert ours[key] == pytest.approx(ref[key], abs=1e-12), (trial, key)


def _one_task(values):
    return _curves([0] * len(values), [[v] for v in values])


class TestWindowedDefinitions:
    """WP^w as in the paper's text (any gain in a window) and as the official code computes it
    (gains only from a running maximum of the deque); WF^w, for which they agree."""

    def test_the_example_where_they_differ(self):
        curves = _one_task([0.9, 0.4, 0.95])
        # Paper: max over pairs m < m' of A(m') - A(m) = 0.95 - 0.4.
        assert stability.windowed_plasticity(curves, 3) == pytest.approx(0.55)
        assert stability.windowed_plasticity(curves, 3, definition="paper") == pytest.approx(0.55)
        # Official: 0.4 is below the running maximum 0.9, so it is never a start: 0.95 - 0.9.
        assert stability.windowed_plasticity(curves, 3, definition="official") == pytest.approx(
            0.05)
        assert _official_windowed([0.9, 0.4, 0.95], 3, _plasticity_delta) == pytest.approx(0.05)
        assert _paper_windowed([0.9, 0.4, 0.95], 3, True) == pytest.approx(0.55)
        summary = stability.stability_summary(curves, windows=(3,))
        assert summary["wp_3"] == pytest.approx(0.55)
        assert summary["wp_official_3"] == pytest.approx(0.05)
        # Forgetting: both 0.5 (0.9 -> 0.4).
        for definition in stability.WINDOWED_DEFINITIONS:
            assert stability.windowed_forgetting(
                curves, 3, definition=definition) == pytest.approx(0.5)

    def test_later_deques_start_later(self):
        # w = 3 on 0.9 0.4 0.95 0.3 0.5: the deque (0.4, 0.95, 0.3) starts at 0.4: 0.55.
        curves = _one_task([0.9, 0.4, 0.95, 0.3, 0.5])
        assert stability.windowed_plasticity(curves, 3, definition="official") == pytest.approx(
            0.55)
        # w = 5: one deque from 0.9; starts 0.9 and 0.95 only: 0.95 - 0.9.
        assert stability.windowed_plasticity(curves, 5, definition="official") == pytest.approx(
            0.05)
        assert stability.windowed_plasticity(curves, 5) == pytest.approx(0.55)

    def test_monotone_sequences(self):
        up = _one_task([0.1, 0.2, 0.4, 0.8])
        down = _one_task([0.8, 0.4, 0.2, 0.1])
        for definition in stability.WINDOWED_DEFINITIONS:
            assert stability.windowed_plasticity(up, 3, definition=definition) == pytest.approx(
                0.6)  # 0.2 -> 0.8 within 3 evaluations
            assert stability.windowed_forgetting(up, 3, definition=definition) == 0.0
            assert stability.windowed_plasticity(down, 3, definition=definition) == 0.0
            assert stability.windowed_forgetting(down, 3, definition=definition) == pytest.approx(
                0.6)  # 0.8 -> 0.2

    @pytest.mark.parametrize("chunk_rows", [None, 3])
    def test_random_sequences_against_literal_transcriptions(self, monkeypatch, chunk_rows):
        if chunk_rows is not None:  # several chunks of deque states in the vectorized version
            monkeypatch.setattr(stability, "_CHUNK_ROWS", chunk_rows)
        rng = np.random.default_rng(7)
        differ = 0
        for trial in range(60):
            n = int(rng.integers(2, 30))
            values = rng.uniform(size=n)
            if trial % 3 == 0:
                values = np.round(values, 1)  # ties
            seq = values.tolist()
            curves = _one_task(seq)
            for w in sorted({2, min(3, n), int(rng.integers(2, n + 1)), n}):
                got = {(wf, d): (stability.windowed_forgetting if wf else
                                 stability.windowed_plasticity)(curves, w, definition=d)
                       for wf in (True, False) for d in stability.WINDOWED_DEFINITIONS}
                ctx = (trial, w, seq)
                assert got[(False, "paper")] == pytest.approx(
                    _paper_windowed(seq, w, True), abs=1e-12), ctx
                assert got[(False, "official")] == pytest.approx(
                    _official_windowed(seq, w, _plasticity_delta), abs=1e-12), ctx
                assert got[(True, "paper")] == pytest.approx(
                    _paper_windowed(seq, w, False), abs=1e-12), ctx
                assert got[(True, "official")] == pytest.approx(
                    _official_windowed(seq, w, _forgetting_delta), abs=1e-12), ctx
                # WF: the official shortcut is exact. WP: the official value never exceeds the
                # paper's, and random sequences show the difference.
                assert got[(True, "official")] == pytest.approx(got[(True, "paper")], abs=1e-12)
                assert got[(False, "official")] <= got[(False, "paper")] + 1e-12
                differ += got[(False, "official")] < got[(False, "paper")] - 1e-9
        assert differ > 10

    def test_several_tasks_and_a_long_run(self):
        # Per-task deques (tasks evaluated a different number of times), 300 evaluations.
        rng = np.random.default_rng(3)
        train = np.repeat(np.arange(3), 100)
        table = [rng.uniform(size=k + 1) for k in train]
        curves = _curves(train, table)
        ref = _official(curves, [10, 100])
        out = stability.stability_summary(curves)
        for key in ("wf_10", "wp_10", "wp_official_10", "wf_100", "wp_100", "wp_official_100"):
            assert out[key] == pytest.approx(ref[key], abs=1e-12), key

    def test_bad_definition(self):
        with pytest.raises(ValueError, match="definition must be one of"):
            stability.windowed_plasticity(THREE_TASKS, 2, definition="code")
        with pytest.raises(ValueError, match="definition must be one of"):
            stability.windowed_forgetting(THREE_TASKS, 2, definition=None)


class TestSummaryAndValidation:
    def test_summary_leaves_windows_longer_than_the_run_empty(self):
        out = stability.stability_summary(THREE_TASKS)
        assert set(out) == {"min_acc", "wc_acc", "wf_10", "wp_10", "wp_official_10", "wf_100",
                            "wp_100", "wp_official_100"}
        assert out["wf_10"] is None and out["wp_100"] is None and out["wp_official_10"] is None
        assert out["min_acc"] == pytest.approx(0.35)
        out = stability.stability_summary(THREE_TASKS, windows=(2, 6))
        assert out["wf_2"] == pytest.approx(1.1 / 3)
        assert out["wf_6"] == pytest.approx(stability.windowed_forgetting(THREE_TASKS, 6))

    def test_points_in_any_order_and_as_dicts(self):
        shuffled = list(reversed(THREE_TASKS))
        keys = ("step", "train_task", "eval_task", "accuracy")
        dicts = [dict(zip(keys, p, strict=True)) for p in shuffled]
        assert stability.stability_summary(dicts, windows=(2,)) == pytest.approx(
            stability.stability_summary(THREE_TASKS, windows=(2,)))

    def test_grid(self):
        grid = stability.evaluation_grid([(5, 0, 0, 0.5), (10, 1, 1, 0.7), (10, 1, 0, 0.2)])
        np.testing.assert_array_equal(grid.steps, [5, 10])
        np.testing.assert_array_equal(grid.train_task, [0, 1])
        np.testing.assert_array_equal(grid.accuracy, [[0.5, np.nan], [0.2, 0.7]])
        assert stability.evaluation_grid(grid) is grid

    @pytest.mark.parametrize("curves, match", [
        ([], r"at least one evaluation point"),
        ([(1, 0, 0, 0.5), (1, 1, 1, 0.5)], r"two training tasks \(0 and 1\) at step 1"),
        ([(1, 0, 0, 0.5), (1, 0, 0, 0.6)], r"task 0 is evaluated twice at step 1"),
        ([(1, 0, 0, 50.0)], r"fraction in \[0, 1\]"),
        ([(1, 0, 0)], r"curves\[0\]"),
    ])
    def test_bad_curves(self, curves, match):
        with pytest.raises(ValueError, match=match):
            stability.stability_summary(curves)

    def test_bad_windows_argument(self):
        with pytest.raises(ValueError, match="windows must be a sequence"):
            stability.stability_summary(THREE_TASKS, windows=10)
        with pytest.raises(ValueError, match="window must be >= 2"):
            stability.stability_summary(THREE_TASKS, windows=(0,))
