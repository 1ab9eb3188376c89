"""The analytic-unlearning experiment on Split-Digits (offline, small expansion)."""

import pytest

from experiments import analytic_unlearning


@pytest.fixture(scope="module")
def summary():
    return analytic_unlearning.run(benchmark="split_digits", forget_class=3, buffer_size=64,
                                   repeats=1, batch_size=256)


def test_exact_unlearning_equals_refit_and_forgets_the_class(summary):
    w = summary["weights_vs_refit"]
    assert w["max_abs_diff"] < 1e-9 * max(1.0, w["max_abs_weight"])  # float64
    assert w["forgotten_column_max_abs"] == 0.0
    assert w["class_counts_equal"] and w["test_predictions_identical"] == 1.0
    acu, refit, before = (summary["metrics"][k] for k in ("acu", "refit", "before"))
    assert acu["forget_train_acc"] == 0.0 and acu["forget_test_acc"] == 0.0
    assert before["forget_test_acc"] > 0.8
    for key in ("retain_train_acc", "retain_test_acc", "mia"):
        assert acu[key] == pytest.approx(refit[key])
    assert summary["learning"]["acc"] > 0.6
    assert len(summary["learning"]["accuracy_matrix"]) == 5
    report = analytic_unlearning.markdown(summary, "python -m experiments.analytic_unlearning")
    assert report.startswith("`python -m experiments.analytic_unlearning`")
    assert "ACU (exact unlearning)" in report


def test_bad_arguments():
    with pytest.raises(ValueError, match="forget_class"):
        analytic_unlearning.run(benchmark="split_digits", forget_class=10)
    with pytest.raises(ValueError, match="class-incremental"):
        analytic_unlearning.run(benchmark="permuted_digits")
