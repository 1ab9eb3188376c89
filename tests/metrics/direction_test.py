"""Metric direction: loss-like matrices and curves (higher_is_better=False) across
clax.metrics.continual, stability, report and plots.

The rule: with s = +1 (higher is better) or -1, every metric is computed on s * R; level
metrics (acc, avg_incremental_acc, min_acc, wc_acc) are reported back in the metric's units,
difference metrics (bwt, fwt, forgetting, wf, wp) as computed on s * R.
"""

import csv
import json

import numpy as np
import pytest

from clax.metrics import continual, curves, plots, report, stability

R1 = np.array([
    [0.9, 0.1, 0.2],
    [0.7, 0.8, 0.1],
    [0.6, 0.5, 0.95],
])
B1 = np.array([0.1, 0.15, 0.05])

# Three tasks, two evaluations each (as in stability_test.py).
ACC_CURVES = [
    (10, 0, 0, 0.5), (20, 0, 0, 0.9),
    (30, 1, 0, 0.4), (30, 1, 1, 0.6), (40, 1, 0, 0.8), (40, 1, 1, 0.9),
    (50, 2, 0, 0.7), (50, 2, 1, 0.3), (50, 2, 2, 0.5),
    (60, 2, 0, 0.85), (60, 2, 1, 0.75), (60, 2, 2, 0.95),
]


def _loss_points(points, f=lambda a: 1.0 - a):
    """The training loop's loss format: {"step", "train_task", "eval_task", "metric", "value"}."""
    return [{"step": s, "train_task": k, "eval_task": j, "metric": "loss", "value": f(a)}
            for s, k, j, a in points]


class TestContinual:
    @pytest.mark.parametrize("transform", [lambda r: 1.0 - r, lambda r: -r])
    def test_same_magnitudes_and_signs_as_accuracy(self, transform):
        L, c = transform(R1), transform(B1)
        acc = continual.summarize(R1, B1)
        loss = continual.summarize(L, c, higher_is_better=False)
        # Differences: identical (negative BWT / positive forgetting = forgetting).
        for key in ("bwt", "fwt", "forgetting"):
            assert loss[key] == pytest.approx(acc[key], abs=1e-12), key
        assert loss["bwt"] == pytest.approx(-0.3) and loss["forgetting"] == pytest.approx(0.3)
        # Levels: in the loss's own units.
        assert loss["acc"] == pytest.approx(float(transform(acc["acc"])))
        assert loss["avg_incremental_acc"] == pytest.approx(
            float(transform(acc["avg_incremental_acc"])))
        assert continual.backward_transfer(L, higher_is_better=False) == pytest.approx(
            continual.backward_transfer(R1))
        assert continual.average_forgetting(L, higher_is_better=False) == pytest.approx(
            continual.average_forgetting(R1))
        assert continual.forward_transfer(L, c, higher_is_better=False) == pytest.approx(
            continual.forward_transfer(R1, B1), abs=1e-12)
        assert continual.average_accuracy(L, after_task=1, higher_is_better=False) == (
            pytest.approx(float(transform(continual.average_accuracy(R1, after_task=1)))))

    def test_hand_computed_loss(self):
        # Task 0's loss goes 0.2 -> 0.1 -> 2.5 (forgotten), task 1's 3.0 -> 0.4 -> 0.6.
        L = [[0.2, 3.0, 3.0],
             [0.1, 0.4, 3.0],
             [2.5, 0.6, 0.3]]
        s = continual.summarize(L, [2.3, 2.3, 2.3], higher_is_better=False)
        # BWT = ((0.2 - 2.5) + (0.4 - 0.6)) / 2; forgetting = ((2.5 - 0.1) + (0.6 - 0.4)) / 2
        # (measured from the best, i.e. lowest, loss); FWT = ((2.3 - 3.0) + (2.3 - 3.0)) / 2.
        assert s["bwt"] == pytest.approx(-1.25)
        assert s["forgetting"] == pytest.approx(1.3)
        assert s["fwt"] == pytest.approx(-0.7)
        assert s["acc"] == pytest.approx((2.5 + 0.6 + 0.3) / 3)
        assert s["avg_incremental_acc"] == pytest.approx((0.2 + 0.25 + 3.4 / 3) / 3)

    def test_scaled_loss_scales_differences(self):
        L = 3.0 * (1.0 - R1) + 0.5  # a loss above 1
        s = continual.summarize(L, higher_is_better=False)
        assert s["bwt"] == pytest.approx(3.0 * continual.backward_transfer(R1))
        assert s["forgetting"] == pytest.approx(3.0 * continual.average_forgetting(R1))

    def test_validation_range_only_for_accuracies(self):
        L = [[2.5, 7.0], [3.0, 1.5]]
        with pytest.raises(ValueError, match=r"fractions in \[0, 1\]"):
            continual.summarize(L)
        with pytest.raises(ValueError, match=r"fractions in \[0, 1\]"):
            continual.validate_metric_matrix(L)
        assert continual.summarize(L, higher_is_better=False)["acc"] == pytest.approx(2.25)
        np.testing.assert_array_equal(continual.validate_metric_matrix(L, bounded=False), L)
        with pytest.raises(ValueError, match="finite"):
            continual.summarize([[1.0, np.inf], [1.0, 1.0]], higher_is_better=False)
        with pytest.raises(ValueError, match="b must"):
            continual.summarize(L, [1.0, np.nan], higher_is_better=False)
        assert continual.forward_transfer(L, [5.0, 9.0], higher_is_better=False) == (
            pytest.approx(2.0))
        with pytest.raises(ValueError, match="higher_is_better must be a bool"):
            continual.summarize(R1, higher_is_better="no")


class TestStability:
    def test_loss_curves_mirror_accuracy_curves(self):
        loss = _loss_points(ACC_CURVES)
        acc_s = stability.stability_summary(ACC_CURVES, windows=(2, 6))
        loss_s = stability.stability_summary(loss, windows=(2, 6), higher_is_better=False)
        assert loss_s.keys() == acc_s.keys()
        for key in ("min_acc", "wc_acc"):  # levels: 1 - accuracy
            assert loss_s[key] == pytest.approx(1.0 - acc_s[key]), key
        for key in acc_s:  # differences: the same
            if key.startswith(("wf_", "wp_")):
                assert loss_s[key] == pytest.approx(acc_s[key], abs=1e-12), key

    def test_min_acc_on_losses_is_a_max(self):
        loss = _loss_points(ACC_CURVES, f=lambda a: 4.0 * (1.0 - a))
        # Task 0 after it was learned: losses 4 * (0.6, 0.2, 0.3, 0.15) -> worst 2.4; task 1:
        # 4 * (0.7, 0.25) -> 2.8.
        assert stability.min_accuracy(loss, higher_is_better=False) == pytest.approx(2.6)
        # WC-ACC: mean of the current task's loss 4 * 0.05 and those worst losses.
        assert stability.worst_case_accuracy(loss, higher_is_better=False) == pytest.approx(
            (0.2 + 2.4 + 2.8) / 3)
        tracked = stability.tracking_metrics(loss, higher_is_better=False)
        np.testing.assert_allclose(tracked["current_acc"], 4 * (1 - np.array(
            [0.5, 0.9, 0.6, 0.9, 0.5, 0.95])))
        np.testing.assert_allclose(tracked["min_acc"], [np.nan, np.nan, 2.4, 2.4, 2.6, 2.6])
        # WF on losses: the largest loss increase (task 0: 4 * (0.9 - 0.4) = 2.0).
        wf = stability.windowed_forgetting(loss, 2, higher_is_better=False)
        assert wf == pytest.approx(4.0 * stability.windowed_forgetting(ACC_CURVES, 2))

    def test_grid_validation(self):
        loss = [(1, 0, 0, 2.5), (2, 0, 0, 1.5)]
        with pytest.raises(ValueError, match=r"fraction in \[0, 1\]"):
            stability.evaluation_grid(loss)
        grid = stability.evaluation_grid(loss, higher_is_better=False)
        np.testing.assert_array_equal(grid.values, [[2.5], [1.5]])  # stored as given
        assert stability.windowed_plasticity(grid, 2, higher_is_better=False) == pytest.approx(
            1.0)  # the loss fell by 1.0
        assert stability.windowed_forgetting(grid, 2, higher_is_better=False) == 0.0


class TestCurvePoints:
    def test_value_key_and_metric_name(self):
        pts = curves.normalize_curves(
            [{"step": 1, "train_task": 0, "eval_task": 0, "metric": "loss", "value": 2.5},
             {"step": 2, "train_task": 0, "eval_task": 0, "value": np.float32(0.5)}],
            bounded=False)
        assert pts == [(1, 0, 0, 2.5), (2, 0, 0, 0.5)]
        assert report.normalize_curves is curves.normalize_curves  # re-exported

    @pytest.mark.parametrize("points, kwargs, match", [
        ([{"step": 1, "train_task": 0, "eval_task": 0, "value": 2.5}], {},
         r"value must be a fraction in \[0, 1\]"),
        ([{"step": 1, "train_task": 0, "eval_task": 0, "value": float("inf")}],
         {"bounded": False}, "must be finite"),
        ([(1, 0, 0, float("nan"))], {"bounded": False}, "must be finite"),
        ([{"step": 1, "train_task": 0, "eval_task": 0, "value": 0.5, "accuracy": 0.5}], {},
         "both 'accuracy' and 'value'"),
        ([{"step": 1, "train_task": 0, "eval_task": 0, "metric": "loss", "value": 0.5}],
         {"metric": "accuracy"}, "measures metric 'loss', expected 'accuracy'"),
        ([{"step": 1, "train_task": 0, "eval_task": 0, "metric": "loss", "value": 0.5},
          {"step": 2, "train_task": 0, "eval_task": 0, "metric": "ppl", "value": 0.5}], {},
         r"curves\[1\] measures metric 'ppl', expected 'loss'"),
        ([{"step": 1, "train_task": 0, "eval_task": 0, "metric": 3, "value": 0.5}], {},
         "metric must be a str"),
        ([{"step": 1, "train_task": 0, "eval_task": 0}], {}, "missing keys"),
    ])
    def test_bad(self, points, kwargs, match):
        with pytest.raises(ValueError, match=match):
            curves.normalize_curves(points, **kwargs)


class TestReport:
    def test_loss_run_directory(self, tmp_path):
        L = 2.0 * (1.0 - R1)  # losses up to 1.8
        pts = _loss_points(ACC_CURVES, f=lambda a: 2.0 * (1.0 - a))
        summary = report.write_run_results(
            tmp_path, name="ewc/loss", R=L, b=2.0 * (1.0 - B1), curves=pts,
            metric="loss", higher_is_better=False, task_boundaries=[30, 50])
        files = sorted(p.name for p in tmp_path.iterdir())
        assert files == ["curves.csv", "curves.json", "loss_curves.png", "loss_matrix.csv",
                         "loss_matrix.png", "metrics.json"]
        assert summary == report.run_summary(L, 2.0 * (1.0 - B1), pts, higher_is_better=False)
        assert summary["bwt"] == pytest.approx(2.0 * continual.backward_transfer(R1))
        assert summary["forgetting"] == pytest.approx(0.6)
        assert summary["min_acc"] == pytest.approx(
            2.0 * (1.0 - stability.min_accuracy(ACC_CURVES)))
        data = json.loads((tmp_path / "metrics.json").read_text())
        assert data["metric"] == "loss" and data["higher_is_better"] is False
        assert "accuracy_matrix" not in data
        np.testing.assert_allclose(data["metric_matrix"], L)
        assert report.read_run_results(tmp_path)["metric_matrix"] == data["metric_matrix"]
        with open(tmp_path / "curves.csv", newline="") as f:
            assert next(csv.reader(f)) == ["step", "train_task", "eval_task", "value"]
        doc = json.loads((tmp_path / "curves.json").read_text())
        assert doc["metric"] == "loss" and doc["higher_is_better"] is False
        assert "values" in doc and "accuracy" not in doc
        got = report.read_run_curves(tmp_path)
        assert got["metric"] == "loss" and got["higher_is_better"] is False
        assert got["task_boundaries"] == [30, 50]
        assert sorted(got["points"]) == sorted(curves.normalize_curves(pts, bounded=False))
        (tmp_path / "curves.json").unlink()  # from curves.csv, direction from metrics.json
        got = report.read_run_curves(tmp_path)
        assert got["metric"] == "loss" and got["higher_is_better"] is False
        assert got["points"] == curves.normalize_curves(pts, bounded=False)

    def test_accuracy_run_records_its_metric(self, tmp_path):
        report.write_run_results(tmp_path, name="r", R=R1, curves=ACC_CURVES)
        data = report.read_run_results(tmp_path)
        assert data["metric"] == "accuracy" and data["higher_is_better"] is True
        assert data["accuracy_matrix"] == data["metric_matrix"] == R1.tolist()
        got = report.read_run_curves(tmp_path)
        assert got["metric"] == "accuracy" and got["higher_is_better"] is True

    def test_old_documents_are_accuracy_runs(self, tmp_path):
        (tmp_path / "metrics.json").write_text(json.dumps(
            {"name": "old", "num_tasks": 1, "summary": {}, "accuracy_matrix": [[0.5]],
             "b": None, "extra": {}}))
        data = report.read_run_results(tmp_path)
        assert data["metric"] == "accuracy" and data["higher_is_better"] is True
        assert data["metric_matrix"] == [[0.5]]

    def test_metric_files(self):
        assert report.metric_files() == ("accuracy_matrix.csv", "accuracy_matrix.png",
                                         "accuracy_curves.png")
        assert report.metric_files("loss").curves_png == "loss_curves.png"
        for bad in ("", "../x", "a b", ".hidden", 3):
            with pytest.raises(ValueError, match="metric must be a name"):
                report.metric_files(bad)

    def test_invalid_direction_writes_nothing(self, tmp_path):
        workdir = tmp_path / "run"
        L = [[2.5, 7.0], [3.0, 1.5]]
        with pytest.raises(ValueError, match="R must"):  # a loss > 1 needs the direction
            report.write_run_results(workdir, name="r", R=L, metric="loss")
        with pytest.raises(ValueError, match="higher-is-better"):
            report.write_run_results(workdir, name="r", R=R1, higher_is_better=False)
        with pytest.raises(ValueError, match="measures metric 'loss', expected 'nll'"):
            report.write_run_results(workdir, name="r", R=L, metric="nll",
                                     higher_is_better=False,
                                     curves=_loss_points([(1, 0, 0, 0.5)]))
        with pytest.raises(ValueError, match="metric must be a name"):
            report.write_run_results(workdir, name="r", R=R1, metric="a/b")
        assert not workdir.exists()


class TestPlots:
    def test_labels_use_the_metric_name(self, tmp_path, monkeypatch):
        labels = []
        save = plots._save

        def recording_save(fig, path):
            labels.append([ax.get_ylabel() for ax in fig.axes])
            return save(fig, path)

        monkeypatch.setattr(plots, "_save", recording_save)
        pts = _loss_points(ACC_CURVES, f=lambda a: 3.0 * (1.0 - a))
        plots.plot_accuracy_curves(pts, tmp_path / "c.png", metric="loss",
                                   higher_is_better=False)
        plots.plot_accuracy_curves(ACC_CURVES, tmp_path / "a.png")
        plots.plot_accuracy_matrix(3.0 * R1, tmp_path / "m.png", metric="loss",
                                   higher_is_better=False)
        plots.plot_accuracy_matrix(np.ones((2, 2)), tmp_path / "flat.png", metric="loss",
                                   higher_is_better=False)  # constant matrix: no 0/0
        steps = np.arange(4)
        plots.plot_curve_comparison({"task 0": {"m": (steps, [2.0, np.nan, 3.0, 1.0])}},
                                    tmp_path / "p.png", metric="loss", higher_is_better=False)
        assert labels[0] == ["loss"] and labels[1] == ["accuracy (%)"]
        assert "loss" in labels[2]  # the colour bar's axis
        assert labels[4][0] == "loss"
        for name in ("c.png", "a.png", "m.png", "flat.png", "p.png"):
            assert (tmp_path / name).read_bytes().startswith(b"\x89PNG")

    def test_losses_need_the_direction(self, tmp_path):
        with pytest.raises(ValueError, match="R must"):
            plots.plot_accuracy_matrix(3.0 * R1, tmp_path / "m.png", metric="loss")
        with pytest.raises(ValueError, match=r"fraction in \[0, 1\]"):
            plots.plot_accuracy_curves([(0, 0, 0, 2.0)], tmp_path / "c.png", metric="loss")
        with pytest.raises(ValueError, match="finite or NaN"):
            plots.plot_curve_comparison({"a": {"m": ([0, 1], [1.0, np.inf])}},
                                        tmp_path / "p.png", higher_is_better=False)
        assert not list(tmp_path.iterdir())
