"""Fast test of the SSD unlearning experiment's core on tiny offline data (digits)."""

import numpy as np

from experiments import unlearn_ssd


def test_run_forgets_and_reports_on_tiny_digits():
    s = unlearn_ssd.Settings(data="digits", train_subsample=400, test_subsample=150,
                             forget_classes=(3,), channels=(4,), hidden=16, epochs=4,
                             batch_size=32, learning_rate=3e-3)
    results = unlearn_ssd.run(s)
    (r,) = results["classes"]
    assert r["forget_class"] == 3 and r["num_forget_train"] > 0
    for model in ("original", "ssd", "retrain"):
        assert set(r[model]) == {"forget_train_acc", "retain_train_acc", "forget_test_acc",
                                 "retain_test_acc", "mia"}
        assert all(0.0 <= v <= 100.0 for v in r[model].values())
    # The retrained model never saw the class; SSD removed (some of) it.
    assert r["retrain"]["forget_test_acc"] == 0.0
    assert r["original"]["forget_train_acc"] > 50.0
    assert r["ssd"]["forget_train_acc"] < r["original"]["forget_train_acc"]
    # Per-layer counts cover every parameter and something was dampened.
    assert set(r["dampened"]) == set(r["total"]) == {
        "convs/0/bias", "convs/0/kernel", "fc/bias", "fc/kernel", "head/bias", "head/kernel"}
    assert 0 < r["num_dampened"] <= r["num_params"] == sum(r["total"].values())
    gap = r["ssd_gap_to_retrain"]
    np.testing.assert_allclose(gap["forget_test_acc_gap"],
                               r["ssd"]["forget_test_acc"] - r["retrain"]["forget_test_acc"],
                               atol=0.02)
    md = unlearn_ssd.markdown(results, "cmd", "cpu")
    assert md.startswith("`cmd`") and "| 3 | ssd |" in md and "fc/kernel" in md
