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
        for n, (k, row) in enumerate(zip(train_tasks, table))
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


def _official(curves, windows):
    """The official metric plugins, transcribed: per-evaluation updates of deques and dicts."""
    grid = stability.evaluation_grid(curves)
    min_acc = defaultdict(lambda: float("inf"))
    acc_window = {w: defaultdict(deque) for w in windows}
    max_change = {(w, s): defaultdict(float) for w in windows for s in (1, -1)}
    wc_acc = None
    for k, row in zip(grid.train_task, grid.accuracy):
        for task, a in enumerate(row):
            if np.isnan(a):
                continue
            if task != k:  # TaskTrackingMINAccuracyPluginMetric (only seen tasks evaluated)
                min_acc[task] = min(min_acc[task], a)
            for w in windows:  # WindowedForgetting / WindowedPlasticity
                window = acc_window[w][task]
                window.append(a)
                if len(window) > w:
                    window.popleft()
                for sign in (1, -1):
                    best = 0.0 if len(window) <= 1 else max(
                        sign * (window[i] - window[j])
                        for i in range(len(window)) for j in range(i + 1, len(window)))
                    d = max_change[(w, sign)]
                    d[task] = max(d[task], best)
        values = [row[k]] + [m for t, m in min_acc.items() if t != k]  # WCACCPluginMetric
        wc_acc = float(np.mean(values))
    out = {"min_acc": float(np.mean([m for t, m in min_acc.items() if t != k])) if len(
        [t for t in min_acc if t != k]) else None, "wc_acc": wc_acc}
    for w in windows:
        out[f"wf_{w}"] = float(np.mean(list(max_change[(w, 1)].values())))
        out[f"wp_{w}"] = float(np.mean(list(max_change[(w, -1)].values())))
    return out


def test_matches_the_official_implementation_on_random_curves():
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


class TestSummaryAndValidation:
    def test_summary_leaves_windows_longer_than_the_run_empty(self):
        out = stability.stability_summary(THREE_TASKS)
        assert set(out) == {"min_acc", "wc_acc", "wf_10", "wp_10", "wf_100", "wp_100"}
        assert out["wf_10"] is None and out["wp_100"] is None
        assert out["min_acc"] == pytest.approx(0.35)
        out = stability.stability_summary(THREE_TASKS, windows=(2, 6))
        assert out["wf_2"] == pytest.approx(1.1 / 3)
        assert out["wf_6"] == pytest.approx(stability.windowed_forgetting(THREE_TASKS, 6))

    def test_points_in_any_order_and_as_dicts(self):
        shuffled = list(reversed(THREE_TASKS))
        dicts = [dict(zip(("step", "train_task", "eval_task", "accuracy"), p)) for p in shuffled]
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
