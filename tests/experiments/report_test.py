"""experiments.report: a markdown report from run directories (written here without training)."""

import json
import os

import pytest

from clax.metrics import report as metrics_report
from experiments import report

R_FINETUNE = [[0.9, 0.0], [0.0, 0.95]]
R_JOINT = [[0.9, 0.0], [0.85, 0.9]]
# rho = 10, two tasks of 30 steps: the first task drops to 0.2 right after the switch.
FINETUNE_CURVES = [(10, 0, 0, 0.5), (20, 0, 0, 0.8), (30, 0, 0, 0.9),
                   (40, 1, 0, 0.2), (40, 1, 1, 0.6), (50, 1, 0, 0.0), (50, 1, 1, 0.9),
                   (60, 1, 0, 0.0), (60, 1, 1, 0.95)]
JOINT_CURVES = [(10, 0, 0, 0.5), (20, 0, 0, 0.8), (30, 0, 0, 0.9),
                (40, 1, 0, 0.4), (40, 1, 1, 0.6), (50, 1, 0, 0.8), (50, 1, 1, 0.85),
                (60, 1, 0, 0.85), (60, 1, 1, 0.9)]


def _extra(method, curves):
    return {"method": method, "train_time_s": 2.0, "eval_every_steps": 10 if curves else 0,
            "eval_subsample": 1000 if curves else None, "eval_time_s": 0.5 if curves else 0.0,
            "eval_overhead": 0.25 if curves else None,
            "num_evaluations": len({c[0] for c in curves})}


@pytest.fixture
def compare_dir(tmp_path):
    """An experiments.run comparison workdir: <benchmark>/<method>/ run directories."""
    root = tmp_path / "compare"
    for method, R, curves in (("finetune", R_FINETUNE, FINETUNE_CURVES),
                              ("joint", R_JOINT, JOINT_CURVES)):
        metrics_report.write_run_results(
            root / "split" / method, name=f"split/{method}", R=R, b=[0.1, 0.1], curves=curves,
            extra=_extra(method, curves), task_boundaries=[30])
    metrics_report.write_run_results(root / "permuted" / "finetune", name="permuted/finetune",
                                     R=R_JOINT, extra=_extra("finetune", []))
    (root / "split" / "finetune" / "checkpoints" / "0").mkdir(parents=True)  # never searched
    return root


def test_report_from_a_comparison_directory(compare_dir):
    out = report.build_report([str(compare_dir)])
    assert out == os.path.join(str(compare_dir), "report.md")
    with open(out) as f:
        text = f.read()
    assert "| split | finetune | 47.5 | -90.0 |" in text  # task-end table
    # Stability table: finetune's min-ACC 0 (task 0 after the switch), WC-ACC (0.95 + 0) / 2.
    assert "| split | finetune | 47.5 | 0.0 | 47.5 | – | – | – | – |" in text  # 6 evaluations
    # joint: min-ACC 40, WC-ACC (0.9 + 0.4) / 2 = 65.
    assert "| split | joint | 87.5 | 40.0 | 65.0 |" in text
    assert "every 10 steps, 1000 test examples per task" in text and "| 25 |" in text
    assert "| permuted | finetune |" in text and "(no continual evaluation)" in text
    figures = sorted(os.listdir(compare_dir / "report_figures"))
    assert figures == [
        "permuted__finetune__matrix.png", "split__curves.png", "split__finetune__matrix.png",
        "split__finetune__tasks.png", "split__joint__matrix.png", "split__joint__tasks.png",
    ]
    for name in figures:  # every figure is linked, relative to the report
        assert f"](report_figures/{name})" in text
    rows = json.loads((compare_dir / "report.json").read_text())
    assert [(r["benchmark"], r["method"]) for r in rows] == [
        ("permuted", "finetune"), ("split", "finetune"), ("split", "joint")]
    assert rows[1]["min_acc"] == pytest.approx(0.0) and rows[2]["wc_acc"] == pytest.approx(0.65)


def test_several_runs_and_an_explicit_output(compare_dir, tmp_path):
    out = tmp_path / "docs" / "results.md"
    report.FLAGS(["report", str(compare_dir / "split" / "joint"),
                  str(compare_dir / "split" / "finetune"), f"--out={out}", "--title=Gap",
                  "--intro=Made by `x`."])
    report.main(["report", str(compare_dir / "split" / "joint"),
                 str(compare_dir / "split" / "finetune")])
    text = out.read_text()
    assert text.startswith("# Gap\n\nMade by `x`.\n")
    assert "python -m experiments.report" in text
    assert text.index("| split | joint |") < text.index("| split | finetune |")  # given order
    assert (tmp_path / "docs" / "results_figures" / "split__curves.png").is_file()
    assert "](results_figures/split__curves.png)" in text


def test_no_runs_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no run under"):
        report.build_report([str(tmp_path)])
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        report.build_report([str(tmp_path / "missing")])


def test_task_progress_aligns_runs_with_different_task_lengths():
    import numpy as np

    # Tasks of 30 and 60 steps: the end of each task maps to 1 and 2.
    x = report.task_progress(np.array([10, 30, 45, 90]), [30], 90)
    np.testing.assert_allclose(x, [1 / 3, 1.0, 1.25, 2.0])


def test_runs_follow_the_comparison_results_order(compare_dir):
    rows = [{"benchmark": "split", "method": "joint"}, {"benchmark": "split", "method": "finetune"}]
    (compare_dir / "results.json").write_text(json.dumps(rows))
    runs = report.find_runs([str(compare_dir)])
    assert [os.path.relpath(r, compare_dir) for r in runs] == [
        os.path.join("split", "joint"), os.path.join("split", "finetune"),
        os.path.join("permuted", "finetune")]  # not in results.json: after, sorted


def test_methods_filter_and_order_rows(compare_dir):
    report.build_report([str(compare_dir)], methods=["joint", "finetune"])
    rows = json.loads((compare_dir / "report.json").read_text())
    assert [(r["benchmark"], r["method"]) for r in rows] == [
        ("permuted", "finetune"), ("split", "joint"), ("split", "finetune")]
    with pytest.raises(ValueError, match=r"no run of method\(s\) \['ewc'\]"):
        report.build_report([str(compare_dir)], methods=["ewc"])
