"""Fast test of the SSD unlearning experiment's core on tiny offline data (digits)."""

import numpy as np

from experiments import unlearn_ssd


def test_run_forgets_and_reports_on_tiny_digits():
    s = unlearn_ssd.Settings(data="digits", train_subsample=400, test_subsample=150,
                             forget_classes=(3,), channels=(4,), hidden=16, epochs=4,
                             batch_size=32, learning_rate=3e-3,
                             sweep_alphas=(10.0, 1e6), sweep_fisher_batch_sizes=(16,),
                             sweep_example_alphas=(5.0,))
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
    # α search: judged on forget-train accuracy; the kept α is the first that reached it.
    q = r["ssd_search"]
    assert q["reached"] and len(q["trace"]) >= 2
    assert q["metrics"]["forget_train_acc"] <= 100 * s.search_target + 1e-6
    assert q["trace"][-1]["alpha"] == q["alpha"]
    assert all(t["forget_train_acc"] > 100 * s.search_target for t in q["trace"][:-1])
    assert [t["alpha"] for t in q["trace"]] == sorted(
        (t["alpha"] for t in q["trace"]), reverse=True)
    # The sweep re-applies SSD from the same model: α = 1e6 selects (almost) nothing, so the
    # model keeps (nearly) its original accuracy; the sweep's α = 10, B = 16 differs from the
    # main run (B = 64) only in the Fisher batch size.
    points = [(q["granularity"], q["fisher_batch_size"], q["alpha"]) for q in r["sweep"]]
    assert points == [("batch", 16, 10.0), ("batch", 16, 1e6), ("example", 64, 5.0)]
    assert r["sweep"][1]["num_dampened"] < r["sweep"][0]["num_dampened"]
    assert r["sweep"][1]["forget_train_acc"] >= r["sweep"][0]["forget_train_acc"]
    md = unlearn_ssd.markdown(results, "cmd", "cpu")
    assert md.startswith("`cmd`") and "| 3 | ssd |" in md and "fc/kernel" in md
    assert "α search →" in md and "- class 3: 1000:" in md
    assert "| batch | 16 | 1e+06 |" in md and "| example | 64 | 5 |" in md
