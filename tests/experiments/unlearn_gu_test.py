"""The GU unlearning experiment's core on tiny data (digits, a few steps)."""

import numpy as np

from experiments.unlearn_gu import Config, markdown, run


def test_run_core_on_tiny_digits():
    cfg = Config(dataset="digits", max_train=400, widths=(32,), train_epochs=15, train_lr=3e-3,
                 modes=("class",), variants=("ga+gu",),
                 unlearn_batch=32, max_steps=40, eval_every=5, gu_k=4, unlearn_lr=1e-3)
    logs = []
    result = run(cfg, log=logs.append)
    assert set(result["modes"]) == {"class"}
    cls = result["modes"]["class"]
    assert cls["original"]["forget_train_acc"] > 0.8  # the class was learned
    assert cls["retrained"]["forget_test_acc"] == 0.0  # the reference never saw it
    assert [r["variant"] for r in cls["rows"]] == ["ga+gu"]
    for r in cls["rows"]:
        assert 0 < r["steps"] <= cfg.max_steps and r["steps"] % cfg.eval_every == 0
        assert r["forget_train_acc"] < cls["original"]["forget_train_acc"]
        if r["reached_target"]:
            assert r["forget_train_acc"] <= cls["target_forget_train_acc"]
        for key in ("retain_test_acc_gap", "mia_gap", "forget_train_acc_gap"):
            assert np.isfinite(r[key])
        np.testing.assert_allclose(r["retain_test_acc_gap"], r["retain_test_acc"]
                                   - cls["retrained"]["retain_test_acc"])
    assert cls["sizes"]["forget_train"] + cls["sizes"]["retain_train"] == 400
    table = markdown(result, "python -m experiments.unlearn_gu --dataset=digits", "cpu")
    assert "| ga+gu |" in table and "## forget mode: class" in table
    assert any("retrained" in line for line in logs)
