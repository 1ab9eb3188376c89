"""Tests for clax.metrics.report: run directories, CSV/JSON round trips, markdown tables."""

import csv
import json
import os

import numpy as np
import pytest

from clax.metrics import plots, report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

R = [
    [0.9, 0.1, 0.2],
    [0.7, 0.8, 0.1],
    [0.6, 0.5, 0.95],
]
B = [0.1, 0.15, 0.05]
CURVES = [
    {"step": 0, "train_task": 0, "eval_task": 0, "accuracy": 0.1},
    {"step": 100, "train_task": 0, "eval_task": 0, "accuracy": 0.9},
    (100, 0, 1, 0.1),
    (200, 1, 0, 0.7),
    (200, 1, 1, 0.8),
    (300, 2, 0, 0.6),
    (300, 2, 1, 0.5),
    (300, 2, 2, 0.95),
]


def _tmp_leftovers(directory):
    return [p.name for p in directory.iterdir() if p.name.endswith(".tmp")]


class TestWriteRunResults:
    def test_writes_all_files(self, tmp_path):
        workdir = tmp_path / "runs" / "ewc"
        summary = report.write_run_results(
            workdir, name="ewc/split", R=R, b=B, curves=CURVES, extra={"train_time_s": 12.5}
        )
        for fname in (
            "metrics.json",
            "accuracy_matrix.csv",
            "curves.csv",
            "accuracy_matrix.png",
            "accuracy_curves.png",
        ):
            assert (workdir / fname).is_file(), fname
            assert (workdir / fname).stat().st_size > 0, fname
        for fname in ("accuracy_matrix.png", "accuracy_curves.png"):
            assert (workdir / fname).read_bytes().startswith(PNG_SIGNATURE)
        # Hand-computed (see continual_test.py): ACC 2.05/3, BWT -0.3, FWT 0, forgetting 0.3.
        assert summary["acc"] == pytest.approx(0.6833333333333333)
        assert summary["bwt"] == pytest.approx(-0.3)
        assert summary["fwt"] == pytest.approx(0.0, abs=1e-12)
        assert summary["forgetting"] == pytest.approx(0.3)
        assert _tmp_leftovers(workdir) == []

    def test_accuracy_matrix_csv_round_trip(self, tmp_path):
        report.write_run_results(tmp_path, name="run", R=R)
        with open(tmp_path / "accuracy_matrix.csv", newline="") as f:
            rows = list(csv.reader(f))
        assert rows[0] == ["after_task", "task_0", "task_1", "task_2"]
        assert [int(r[0]) for r in rows[1:]] == [0, 1, 2]
        parsed = np.array([[float(x) for x in r[1:]] for r in rows[1:]])
        np.testing.assert_array_equal(parsed, np.array(R))  # exact: floats written with repr

    def test_curves_csv(self, tmp_path):
        report.write_run_results(tmp_path, name="run", R=R, curves=CURVES)
        with open(tmp_path / "curves.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        assert list(rows[0]) == ["step", "train_task", "eval_task", "accuracy"]
        got = [
            (int(r["step"]), int(r["train_task"]), int(r["eval_task"]), float(r["accuracy"]))
            for r in rows
        ]
        assert got == [
            (0, 0, 0, 0.1),
            (100, 0, 0, 0.9),
            (100, 0, 1, 0.1),
            (200, 1, 0, 0.7),
            (200, 1, 1, 0.8),
            (300, 2, 0, 0.6),
            (300, 2, 1, 0.5),
            (300, 2, 2, 0.95),
        ]

    def test_no_curves(self, tmp_path):
        report.write_run_results(tmp_path, name="run", R=R)
        assert not (tmp_path / "accuracy_curves.png").exists()
        assert (tmp_path / "curves.csv").read_text() == "step,train_task,eval_task,accuracy\n"

    def test_json_round_trip(self, tmp_path):
        extra = {"train_time_s": np.float32(2.5), "config": "ewc", "seeds": np.array([0, 1])}
        summary = report.write_run_results(tmp_path, name="ewc", R=R, b=B, extra=extra)
        data = report.read_run_results(tmp_path)
        assert data == {
            "name": "ewc",
            "num_tasks": 3,
            "metric": "accuracy",
            "higher_is_better": True,
            "summary": summary,
            "accuracy_matrix": R,
            "metric_matrix": R,
            "b": B,
            "extra": {"train_time_s": 2.5, "config": "ewc", "seeds": [0, 1]},
        }
        # Plain JSON on disk (readable without clax).
        assert json.loads((tmp_path / "metrics.json").read_text())["name"] == "ewc"

    def test_json_without_b(self, tmp_path):
        report.write_run_results(tmp_path, name="run", R=[[0.5]])
        data = report.read_run_results(tmp_path)
        assert data["b"] is None
        assert data["summary"]["fwt"] is None
        assert data["extra"] == {}

    def test_overwrite(self, tmp_path):
        report.write_run_results(tmp_path, name="first", R=R)
        report.write_run_results(tmp_path, name="second", R=[[0.5]])
        assert report.read_run_results(tmp_path)["name"] == "second"
        assert _tmp_leftovers(tmp_path) == []

    def test_invalid_input_writes_nothing(self, tmp_path):
        workdir = tmp_path / "run"
        with pytest.raises(ValueError, match="extra"):
            report.write_run_results(workdir, name="run", R=R, extra={"bad": object()})
        with pytest.raises(ValueError, match="R must"):
            report.write_run_results(workdir, name="run", R=[[50.0]])
        with pytest.raises(ValueError, match="b must"):
            report.write_run_results(workdir, name="run", R=R, b=[0.1])
        with pytest.raises(ValueError, match="name"):
            report.write_run_results(workdir, name="", R=R)
        with pytest.raises(ValueError, match=r"curves\[0\]"):
            report.write_run_results(workdir, name="run", R=R, curves=[(0, 0, 0)])
        assert not workdir.exists()

    def test_crash_before_metrics_leaves_no_metrics_json(self, tmp_path, monkeypatch):
        def boom(*args, **kwargs):
            raise RuntimeError("plotting crashed")

        monkeypatch.setattr(plots, "plot_accuracy_matrix", boom)
        with pytest.raises(RuntimeError, match="plotting crashed"):
            report.write_run_results(tmp_path, name="run", R=R)
        assert not (tmp_path / "metrics.json").exists()
        assert _tmp_leftovers(tmp_path) == []


class TestAtomicWrite:
    def test_writes_and_creates_parents(self, tmp_path):
        path = report.atomic_write_text(tmp_path / "a" / "b" / "f.txt", "hello")
        assert path.read_text() == "hello"
        assert _tmp_leftovers(path.parent) == []

    def test_failed_replace_keeps_old_file_and_no_tmp(self, tmp_path, monkeypatch):
        path = tmp_path / "metrics.json"
        path.write_text('{"old": true}')

        def failing_replace(src, dst):
            raise OSError("disk full")

        monkeypatch.setattr(os, "replace", failing_replace)
        with pytest.raises(OSError, match="disk full"):
            report.atomic_write_text(path, '{"new": tr')
        assert path.read_text() == '{"old": true}'
        assert _tmp_leftovers(tmp_path) == []


class TestReadRunResults:
    def test_missing(self, tmp_path):
        with pytest.raises(FileNotFoundError):
            report.read_run_results(tmp_path)

    def test_malformed(self, tmp_path):
        (tmp_path / "metrics.json").write_text("{not json")
        with pytest.raises(ValueError, match="not valid JSON"):
            report.read_run_results(tmp_path)
        (tmp_path / "metrics.json").write_text('{"name": "x"}')
        with pytest.raises(ValueError, match="expected keys"):
            report.read_run_results(tmp_path)


class TestNormalizeCurves:
    def test_mixed(self):
        pts = report.normalize_curves(
            [{"step": np.int64(3), "train_task": 0, "eval_task": 1, "accuracy": np.float32(0.5)}]
            + [(4, 1, 1, 1)]
        )
        assert pts == [(3, 0, 1, 0.5), (4, 1, 1, 1.0)]
        assert all(type(x) is int for x in pts[0][:3]) and type(pts[0][3]) is float

    @pytest.mark.parametrize(
        "curves, match",
        [
            ([{"step": 0, "train_task": 0, "accuracy": 0.5}], "missing keys"),
            ([(0, 0, 0, 93.0)], r"fraction in \[0, 1\]"),
            ([(0, 0, 0, float("nan"))], r"fraction in \[0, 1\]"),
            ([(-1, 0, 0, 0.5)], "step must be >= 0"),
            ([(0.5, 0, 0, 0.5)], "step must be an int"),
            ([(0, 0, 0, "high")], "accuracy must be a number"),
            ([5], "dict or a 4-tuple"),
            ({"step": 0}, "iterable of points"),
        ],
    )
    def test_bad(self, curves, match):
        with pytest.raises(ValueError, match=match):
            report.normalize_curves(curves)


class TestMarkdownTable:
    def test_exact(self):
        rows = [
            {"a": 1, "b": 0.5, "c": None},
            {"a": 2, "b": 1 / 3, "c": "x|y"},
            {"a": True, "b": np.float32(2.0)},
        ]
        table = report.markdown_table(rows, ["a", ("b", "B"), ("c", "C")])
        assert table == (
            "| a | B | C |\n"
            "| --- | --- | --- |\n"
            "| 1 | 0.500 | – |\n"
            "| 2 | 0.333 | x\\|y |\n"
            "| True | 2.000 | – |"
        )

    def test_floatfmt_and_no_rows(self):
        assert report.markdown_table([{"x": 0.12345}], ["x"], floatfmt=".1f") == (
            "| x |\n| --- |\n| 0.1 |"
        )
        assert report.markdown_table([], [("x", "X")]) == "| X |\n| --- |"

    def test_no_implicit_percent(self):
        assert report.markdown_table([{"acc": 0.931}], ["acc"]).endswith("| 0.931 |")

    @pytest.mark.parametrize("columns", [[], "ab", [("a",)], [("a", 1)], [3]])
    def test_bad_columns(self, columns):
        with pytest.raises(ValueError, match="column"):
            report.markdown_table([{"a": 1}], columns)

    def test_bad_rows_and_floatfmt(self):
        with pytest.raises(ValueError, match=r"rows\[0\] must be a mapping"):
            report.markdown_table([[1, 2]], ["a"])
        with pytest.raises(ValueError, match="rows must be a sequence"):
            report.markdown_table("abc", ["a"])
        with pytest.raises(ValueError, match="floatfmt"):
            report.markdown_table([{"a": 1.0}], ["a"], floatfmt="q")


class TestResultsTable:
    def test_exact(self):
        runs = [
            {
                "benchmark": "split_mnist",
                "method": "ewc",
                "acc": 0.931,
                "bwt": -0.052,
                "fwt": 0.01,
                "forgetting": 0.061,
                "train_time_s": 12.34,
            },
            {
                "benchmark": "perm_mnist",
                "method": "sgd",
                "acc": 0.5,
                "bwt": -0.0001,  # rounds to zero: shown as +0.0, never -0.0
                "fwt": None,
                "forgetting": 0.0,
            },
        ]
        assert report.results_table(runs) == (
            "| benchmark | method | ACC | BWT | FWT | Forgetting | train time (s) |\n"
            "| --- | --- | --- | --- | --- | --- | --- |\n"
            "| split_mnist | ewc | 93.1 | -5.2 | +1.0 | 6.1 | 12.3 |\n"
            "| perm_mnist | sgd | 50.0 | +0.0 | – | 0.0 | – |"
        )

    def test_from_summary(self, tmp_path):
        summary = report.write_run_results(tmp_path, name="r", R=R, b=B)
        table = report.results_table([{"benchmark": "b", "method": "m", **summary}])
        # ACC 68.3, BWT -30.0, FWT +0.0, forgetting 30.0 (hand-computed above).
        assert table.splitlines()[-1] == "| b | m | 68.3 | -30.0 | +0.0 | 30.0 | – |"

    def test_bad(self):
        with pytest.raises(ValueError, match=r"runs\[0\]\['acc'\] must be a number"):
            report.results_table([{"benchmark": "b", "method": "m", "acc": "93%"}])
        with pytest.raises(ValueError, match=r"runs\[0\] must be a mapping"):
            report.results_table([("b", "m")])


class TestStabilityResults:
    """Continual-evaluation curves: summary metrics, curves.json, the stability table."""

    BOUNDARIES = (150, 250)

    def test_summary_holds_stability_metrics(self, tmp_path):
        summary = report.write_run_results(tmp_path, name="r", R=R, b=B, curves=CURVES)
        # CURVES (above): task 0 after it was learned: 0.7, 0.6; task 1: 0.5 (its 0.1 at step
        # 100 predates learning it); current task 2 at the last step: 0.95.
        assert summary["min_acc"] == pytest.approx(0.55)
        assert summary["wc_acc"] == pytest.approx((0.95 + 0.6 + 0.5) / 3)
        assert summary["wf_10"] is None  # 4 evaluations: shorter than the window
        assert summary == report.run_summary(R, B, CURVES)
        assert report.read_run_results(tmp_path)["summary"] == summary
        assert "min_acc" not in report.run_summary(R, B)

    def test_curves_json_round_trip(self, tmp_path):
        report.write_run_results(tmp_path, name="r", R=R, curves=CURVES,
                                 task_boundaries=self.BOUNDARIES)
        doc = json.loads((tmp_path / "curves.json").read_text())
        assert doc["steps"] == [0, 100, 200, 300]
        assert doc["train_task"] == [0, 0, 1, 2]
        assert doc["accuracy"] == [[0.1, None, None], [0.9, 0.1, None], [0.7, 0.8, None],
                                   [0.6, 0.5, 0.95]]
        assert doc["min_acc"][:2] == [None, None]
        assert doc["wc_acc"][-1] == pytest.approx((0.95 + 0.6 + 0.5) / 3)
        got = report.read_run_curves(tmp_path)
        assert got["task_boundaries"] == list(self.BOUNDARIES)
        assert sorted(got["points"]) == sorted(report.normalize_curves(CURVES))

    def test_curves_read_from_csv_without_json(self, tmp_path):
        report.write_run_results(tmp_path, name="r", R=R, curves=CURVES)
        (tmp_path / "curves.json").unlink()
        got = report.read_run_curves(tmp_path)
        assert got["task_boundaries"] == [200, 300]  # first evaluated step of tasks 1 and 2
        assert got["points"] == report.normalize_curves(CURVES)

    def test_no_curves(self, tmp_path):
        report.write_run_results(tmp_path, name="r", R=R)
        assert not (tmp_path / "curves.json").exists()
        assert report.read_run_curves(tmp_path) is None
        assert report.read_run_curves(tmp_path / "missing") is None

    def test_bad_boundaries_write_nothing(self, tmp_path):
        with pytest.raises(ValueError, match=r"task_boundaries\[1\] must be >= 0"):
            report.write_run_results(tmp_path / "r", name="r", R=R, curves=CURVES,
                                     task_boundaries=[1, -5])
        with pytest.raises(ValueError, match="two training tasks"):
            report.write_run_results(tmp_path / "r", name="r", R=R,
                                     curves=[(1, 0, 0, 0.5), (1, 1, 1, 0.5)])
        assert not (tmp_path / "r").exists()

    def test_stability_table(self):
        runs = [
            {"benchmark": "split", "method": "finetune", "acc": 0.2, "min_acc": 0.0,
             "wc_acc": 0.19, "wf_10": 0.95, "wp_10": 0.9, "wf_100": None},
            {"benchmark": "split", "method": "joint", "acc": 0.9},
        ]
        assert report.stability_table(runs) == (
            "| benchmark | method | ACC | min-ACC | WC-ACC | WF^10 | WP^10 | WF^100 | WP^100 |\n"
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n"
            "| split | finetune | 20.0 | 0.0 | 19.0 | 95.0 | 90.0 | – | – |\n"
            "| split | joint | 90.0 | – | – | – | – | – | – |"
        )
        with pytest.raises(ValueError, match=r"runs\[0\]\['min_acc'\] must be a number"):
            report.stability_table([{"min_acc": "low"}])


class TestPlotCurveComparison:
    def test_writes_png(self, tmp_path):
        steps = np.arange(10)
        panels = {
            "task 0": {"finetune": (steps, np.linspace(1, 0, 10)), "joint": (steps, np.ones(10))},
            "WC-ACC": {"finetune": (steps, np.r_[np.nan, np.linspace(0.5, 0.1, 9)])},
        }
        path = plots.plot_curve_comparison(panels, tmp_path / "f" / "c.png",
                                           task_boundaries=[5], title="split")
        assert path.read_bytes().startswith(PNG_SIGNATURE)

    @pytest.mark.parametrize("panels, match", [
        ({}, "non-empty mapping"),
        ({"a": {}}, r"panels\['a'\] must be a non-empty"),
        ({"a": {"m": ([0, 1], [0.5])}}, "equal length"),
        ({"a": {"m": ([0, 1], [50.0, 60.0])}}, "fractions"),
        ({"a": {"m": 3}}, "pair of numbers"),
    ])
    def test_bad(self, tmp_path, panels, match):
        with pytest.raises(ValueError, match=match):
            plots.plot_curve_comparison(panels, tmp_path / "c.png")
        with pytest.raises(ValueError, match="task_boundaries"):
            plots.plot_curve_comparison({"a": {"m": ([0], [0.5])}}, tmp_path / "c.png",
                                        task_boundaries=[float("nan")])
