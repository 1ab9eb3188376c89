"""Tests for clax.metrics.plots: PNG files are written, inputs are validated, no pyplot."""

import os
import pathlib
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from clax.metrics import plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]

R = [
    [0.9, 0.1, 0.2],
    [0.7, 0.8, 0.1],
    [0.6, 0.5, 0.95],
]
CURVES = [
    (0, 0, 0, 0.1),
    (50, 0, 0, 0.9),
    (50, 0, 1, 0.1),
    (100, 1, 0, 0.7),
    {"step": 100, "train_task": 1, "eval_task": 1, "accuracy": 0.8},
]
RUNS = [
    {"benchmark": "split_mnist", "method": "sgd", "acc": 0.6, "bwt": -0.3},
    {"benchmark": "split_mnist", "method": "ewc", "acc": 0.8, "bwt": -0.1},
    {"benchmark": "perm_mnist", "method": "sgd", "acc": 0.7, "bwt": None},
]


def _assert_png(path):
    path = pathlib.Path(path)
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    width, height = struct.unpack(">II", data[16:24])  # IHDR chunk
    assert width > 100 and height > 100
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    return width, height


class TestAccuracyMatrix:
    def test_writes_png(self, tmp_path):
        path = tmp_path / "a" / "b" / "matrix.png"
        out = plots.plot_accuracy_matrix(R, path, title="run", task_labels=["A", "B", "C"])
        assert out == path
        _assert_png(path)

    def test_str_path_and_single_task(self, tmp_path):
        out = plots.plot_accuracy_matrix([[0.5]], str(tmp_path / "m.png"))
        assert isinstance(out, pathlib.Path)
        _assert_png(out)

    def test_many_tasks(self, tmp_path):
        rng = np.random.default_rng(0)
        _assert_png(plots.plot_accuracy_matrix(rng.uniform(size=(40, 40)), tmp_path / "m.png"))

    def test_bad_input(self, tmp_path):
        with pytest.raises(ValueError, match="task_labels"):
            plots.plot_accuracy_matrix(R, tmp_path / "m.png", task_labels=["A", "B"])
        with pytest.raises(ValueError, match="R must"):
            plots.plot_accuracy_matrix([[93.0]], tmp_path / "m.png")
        with pytest.raises(ValueError, match="title"):
            plots.plot_accuracy_matrix(R, tmp_path / "m.png", title=3)
        assert not (tmp_path / "m.png").exists()


class TestAccuracyCurves:
    def test_writes_png(self, tmp_path):
        path = tmp_path / "c" / "curves.png"
        out = plots.plot_accuracy_curves(CURVES, path, task_boundaries=[50, 100], title="t")
        assert out == path
        _assert_png(path)

    def test_bad_input(self, tmp_path):
        with pytest.raises(ValueError, match="at least one point"):
            plots.plot_accuracy_curves([], tmp_path / "c.png")
        with pytest.raises(ValueError, match=r"task_boundaries\[0\]"):
            plots.plot_accuracy_curves(CURVES, tmp_path / "c.png", task_boundaries=["x"])
        with pytest.raises(ValueError, match="accuracy"):
            plots.plot_accuracy_curves([(0, 0, 0, 2.0)], tmp_path / "c.png")
        assert not (tmp_path / "c.png").exists()


class TestComparison:
    @pytest.mark.parametrize("metric", ["acc", "bwt"])
    def test_writes_png(self, tmp_path, metric):
        path = tmp_path / "cmp" / f"{metric}.png"
        assert plots.plot_comparison(RUNS, path, metric=metric) == path
        _assert_png(path)

    def test_bad_input(self, tmp_path):
        with pytest.raises(ValueError, match="more than one entry"):
            plots.plot_comparison(RUNS + [RUNS[0]], tmp_path / "c.png")
        with pytest.raises(ValueError, match="no run has a value"):
            plots.plot_comparison(RUNS, tmp_path / "c.png", metric="fwt")
        with pytest.raises(ValueError, match="non-empty sequence"):
            plots.plot_comparison([], tmp_path / "c.png")
        with pytest.raises(ValueError, match="'benchmark' and 'method'"):
            plots.plot_comparison([{"method": "sgd", "acc": 0.5}], tmp_path / "c.png")
        with pytest.raises(ValueError, match="finite number"):
            plots.plot_comparison([{"benchmark": "b", "method": "m", "acc": "x"}], "c.png")
        assert not (tmp_path / "c.png").exists()


def test_no_pyplot_import():
    # Importing clax.metrics, and even plotting, must not import pyplot (no display needed,
    # no global figure manager). Checked in a fresh interpreter so other tests cannot interfere.
    code = textwrap.dedent(
        """
        import sys, tempfile, os
        import clax.metrics as m
        assert "matplotlib.pyplot" not in sys.modules, "pyplot imported by clax.metrics"
        d = tempfile.mkdtemp()
        m.plot_accuracy_matrix([[0.5, 0.1], [0.4, 0.9]], os.path.join(d, "m.png"))
        m.plot_accuracy_curves([(0, 0, 0, 0.5)], os.path.join(d, "c.png"))
        m.plot_comparison([{"benchmark": "b", "method": "m", "acc": 0.5}], os.path.join(d, "p.png"))
        assert "matplotlib.pyplot" not in sys.modules, "pyplot imported by plotting"
        print("ok")
        """
    )
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "MPLBACKEND")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"
