"""The unlearning driver end to end on tiny data: every unlearner, files, resume, errors."""

import json

import jax
import numpy as np
import pytest

from clax.data.text import synthetic_token_domains
from clax.training import unlearn as unlearn_mod
from clax.training.unlearn import default_unlearn_config, forget_sets, train_original, unlearn
from tests.training.helpers import tiny_scenario


def tiny_unlearn_config(**unlearn_settings):
    c = default_unlearn_config()
    c.name = "tiny_unlearn"
    c.model.mlp.widths = (16,)
    c.optimizer.learning_rate = 1e-2
    c.train.epochs_per_task = 3
    c.train.batch_size = 32
    c.train.eval_batch_size = 128
    c.train.num_devices = 1
    u = c.unlearn
    u.forget, u.forget_classes = "classes", (0,)
    u.reference = "none"
    u.steps, u.eval_every = 20, 5
    u.batch_size = u.retain_batch_size = 16
    u.optimizer.learning_rate = 1e-2
    u.update(unlearn_settings)
    return c


@pytest.fixture(scope="module")
def scenario():
    return tiny_scenario("class_incremental", classes_per_task=4)  # one task, 4 classes


@pytest.fixture(scope="module")
def original(scenario):
    return train_original(tiny_unlearn_config(), scenario=scenario)


@pytest.mark.parametrize("name, hyper", [
    ("ga", {}),
    ("npo", {"beta": 0.5}),
    ("ga", {"gu": True, "retain_weight": 1.0}),
    ("npo", {"gu": True, "gu_subspace": "span", "gu_k": 4, "retain_weight": 1.0}),
])
def test_gradient_unlearners_forget_the_class(scenario, original, name, hyper):
    c = tiny_unlearn_config(name=name, target=0.05)
    c.unlearn[name].update(hyper)
    res = unlearn(c, scenario=scenario, original=original)
    before, after = res.original_metrics, res.metrics
    assert before["forget_train_acc"] > 0.9
    assert after["forget_train_acc"] <= 0.05 and res.reached_target
    assert after["forget_test_acc"] < before["forget_test_acc"] - 0.5
    assert 0 < res.steps <= 20 and res.steps % 5 == 0
    assert res.info["trace"][0] == {"step": 0, "forget_train_acc": before["forget_train_acc"],
                                    "loss": None}
    assert set(after) >= {"mia", "retain_test_acc", "retain_test_loss"}
    assert res.times["unlearn_s"] > 0 and res.reference_metrics is None


def test_ssd_dampens_and_the_alpha_search_reaches_its_target(scenario, original):
    c = tiny_unlearn_config(name="ssd", repeats=1)
    c.unlearn.ssd.update(search_target=0.0, fisher_batch_size=16)
    res = unlearn(c, scenario=scenario, original=original)
    info = res.info
    assert info["search"]["reached"] and res.metrics["forget_train_acc"] == 0.0
    assert 0 < info["num_dampened"] <= info["num_params"]
    assert set(info["dampened"]) == {"layers/0/kernel", "layers/0/bias", "head/kernel",
                                     "head/bias"}
    assert res.steps == 0 and res.reached_target is None
    assert res.times["unlearn_first_s"] > 0 and len(res.times["unlearn_repeats_s"]) == 1


def test_acu_is_the_exact_refit_and_refuses_other_models(scenario, original):
    c = tiny_unlearn_config(name="acu", reference="closed_form")
    c.method.name = "acil"
    c.method.acil.update(buffer_size=32, gamma=10.0)  # float32 memory: well conditioned
    res = unlearn(c, scenario=scenario)
    assert res.method == "acil" and res.info["classes_removed"] == [0]
    assert res.metrics["forget_train_acc"] == 0.0 and res.metrics["forget_test_acc"] == 0.0
    for key in ("retain_train_acc", "retain_test_acc", "mia"):
        assert res.metrics[key] == pytest.approx(res.reference_metrics[key])
    w, w_ref = (np.asarray(m.memory.weights, np.float64) for m in (res.state, res.reference))
    assert np.linalg.norm(w - w_ref) <= 1e-2 * np.linalg.norm(w_ref)
    assert res.original_metrics["forget_train_acc"] > 0.9
    # A model not trained with acil has no RLS memory; a gradient unlearner cannot touch an
    # acil model's memory.
    with pytest.raises(ValueError, match="needs a model trained with the continual method "
                                         "'acil'.*'finetune'"):
        unlearn(tiny_unlearn_config(name="acu"), scenario=scenario, original=original)
    with pytest.raises(ValueError, match="continual method 'acil' predicts from its memory"):
        unlearn(_with(c, name="ga", reference="none"), scenario=scenario)  # before training


def _with(config, **unlearn_settings):
    c = config.copy_and_resolve_references()
    c.unlearn.update(unlearn_settings)
    return c


def test_workdir_files_and_a_second_run_restores_everything(tmp_path, scenario):
    c = tiny_unlearn_config(name="npo", reference="retrain", target_margin=0.0)
    first = unlearn(c, str(tmp_path), scenario=scenario)
    doc = json.loads((tmp_path / "unlearn_metrics.json").read_text())
    assert doc["unlearner"] == "npo" and doc["method"] == "finetune"
    assert doc["sizes"] == first.sizes and sum(first.sizes.values()) == 640
    assert doc["reference_metrics"]["forget_test_acc"] == 0.0  # never saw the class
    assert doc["gap"]["retain_test_acc_gap"] == pytest.approx(
        first.metrics["retain_test_acc"] - first.reference_metrics["retain_test_acc"])
    table = (tmp_path / "unlearn_metrics.md").read_text()
    assert "| unlearned (npo) |" in table and "| reference (retrained) |" in table
    for sub in ("original", "reference", "unlearn"):
        assert (tmp_path / sub / "checkpoints").is_dir()
    again = unlearn(c, str(tmp_path), scenario=scenario)  # restores, trains nothing
    assert again.metrics == first.metrics and again.steps == first.steps
    assert again.original.train_time_s == first.original.train_time_s
    # A different unlearning config is refused; the original can be shared instead.
    changed = _with(c)
    changed.unlearn.npo.beta = 1.0
    with pytest.raises(ValueError, match="differing keys: config.unlearn.npo"):
        unlearn(changed, str(tmp_path), scenario=scenario)
    shared = _with(c, name="ga", original_workdir=str(tmp_path / "original"),
                   reference="none", target_margin=-1.0)
    other = unlearn(shared, str(tmp_path / "ga"), scenario=scenario)
    assert other.original_metrics == first.original_metrics


def test_resume_mid_unlearning_equals_an_uninterrupted_run(tmp_path, scenario, original,
                                                           monkeypatch):
    c = tiny_unlearn_config(name="ga", steps=8, eval_every=2, checkpoint_every_steps=4)
    c.unlearn.ga.update(gu=True, retain_weight=1.0)
    whole = unlearn(c, str(tmp_path / "whole"), scenario=scenario, original=original)
    real, calls = unlearn_mod._run_chunk, []

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 3:  # after the checkpoint at step 4
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(unlearn_mod, "_run_chunk", interrupted)
    with pytest.raises(KeyboardInterrupt):
        unlearn(c, str(tmp_path / "cut"), scenario=scenario, original=original)
    monkeypatch.setattr(unlearn_mod, "_run_chunk", real)
    resumed = unlearn(c, str(tmp_path / "cut"), scenario=scenario, original=original)
    assert resumed.steps == whole.steps == 8
    for a, b in zip(jax.tree.leaves(resumed.state), jax.tree.leaves(whole.state), strict=False):
        if not jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            np.testing.assert_array_equal(a, b)
    assert resumed.metrics == whole.metrics
    assert resumed.info["trace"] == whole.info["trace"]


@pytest.mark.parametrize("settings, message", [
    ({"forget": "some"}, r"config.unlearn.forget must be one of \['classes', 'tasks', "),
    ({"forget_classes": (7,)}, r"config.unlearn.forget_classes must be a non-empty tuple of "
                               r"class ids in \[0, 4\), got \(7,\)"),
    ({"steps": 0}, "config.unlearn.steps must be a positive int, got 0"),
    ({"name": "gaa"}, r"config.unlearn.name must be one of \["),
    ({"reference": "closed_form"}, "'closed_form' needs an unlearner with a closed-form "
                                   "retrain"),
    ({"target_margin": 0.01}, "target_margin >= 0 stops at the reference's"),
    ({"forget": "fraction", "forget_fraction": 1.5},
     r"config.unlearn.forget_fraction must be a number in \(0.0, 1.0\), got 1.5"),
])
def test_bad_config_gives_one_clear_line(scenario, original, settings, message):
    with pytest.raises(ValueError, match=message) as e:
        unlearn(tiny_unlearn_config(**settings), scenario=scenario, original=original)
    assert "\n" not in str(e.value)


def test_unknown_key_lists_the_valid_ones(scenario, original):
    c = tiny_unlearn_config()
    with c.unlearn.unlocked():
        c.unlearn.stepz = 3
    with pytest.raises(ValueError, match="unknown key config.unlearn.stepz; valid keys of "
                                         "config.unlearn: .*steps"):
        unlearn(c, scenario=scenario, original=original)


def test_forget_sets_by_fraction_and_by_task():
    s = tiny_scenario("class_incremental", classes_per_task=2)  # two tasks
    u = tiny_unlearn_config(forget="fraction", forget_fraction=0.25).unlearn
    sets = forget_sets(u, s)
    assert sets.sizes()["forget_train"] == 128 and sets.forget_mask.sum() == 128
    assert sets.sizes()["forget_test"] == 64  # half the test set, at random
    by_task = forget_sets(tiny_unlearn_config(forget="tasks", forget_tasks=(1,)).unlearn, s)
    assert set(np.unique(by_task.forget_train.task_ids)) == {1}
    assert set(np.unique(by_task.retain_test.y)) == {0, 1}


def test_gradient_ascent_raises_a_language_models_forget_loss():
    c = tiny_unlearn_config(name="ga", forget="tasks", forget_tasks=(1,), steps=10)
    c.objective.name = "language_modeling"
    c.model.name = "causal_lm"
    c.model.causal_lm.update(dim=16, depth=1)
    c.optimizer.learning_rate = 3e-3
    c.train.epochs_per_task = 2
    c.unlearn.optimizer.learning_rate = 3e-3
    s = synthetic_token_domains(num_tasks=2, vocab_size=16, seq_len=8, num_train=128,
                                num_test=32)
    res = unlearn(c, scenario=s)
    before, after = res.original_metrics, res.metrics
    assert after["forget_train_loss"] > before["forget_train_loss"] + 0.5
    assert after["forget_test_perplexity"] > before["forget_test_perplexity"]
    assert "mia" not in after and "retain_train_token_accuracy" in after
    assert res.info["trace"][-1]["forget_train_loss"] == pytest.approx(
        after["forget_train_loss"], rel=1e-5)
