"""Continual evaluation in the training loop: every seen task every ρ steps, one jitted call."""

import json
import os

import numpy as np
import pytest

from clax import metrics as clax_metrics
from clax.core import ModelFns
from clax.training import StepFns, build_method, build_model, data_mesh, loop, train_continual
from clax.training.config import build_optimizer
from tests.training.helpers import tiny_config, tiny_scenario


def test_every_seen_task_every_rho_steps_with_metrics_in_the_run_directory(tmp_path):
    scenario = tiny_scenario()  # 2 class-incremental tasks
    rho = 3
    config = tiny_config(eval_every_steps=rho, eval_subsample=20)
    workdir = str(tmp_path / "run")
    result = train_continual(config, workdir, scenario=scenario)

    steps_per_task = [config.train.epochs_per_task * (len(t.y_train) // 32)
                      for t in scenario.tasks]
    assert result.task_boundaries == [0, steps_per_task[0]]
    total = sum(steps_per_task)
    by_step = {}
    for c in result.curves:
        by_step.setdefault(c["step"], []).append(c)
    assert sorted(by_step) == list(range(rho, total + 1, rho))
    for step, points in by_step.items():
        current = 0 if step <= steps_per_task[0] else 1
        assert {p["train_task"] for p in points} == {current}
        assert sorted(p["eval_task"] for p in points) == list(range(current + 1))  # seen only
        for p in points:  # accuracies of a 20-example subsample
            assert round(p["value"] * 20) == pytest.approx(p["value"] * 20)

    # Stability-gap metrics next to the task-end metrics, in the result and in metrics.json.
    expected = clax_metrics.stability_summary(result.curves)
    for key, value in expected.items():
        assert result.summary[key] == (pytest.approx(value) if value is not None else None)
    assert result.summary["min_acc"] is not None
    with open(os.path.join(workdir, "metrics.json")) as f:
        saved = json.load(f)
    assert saved["summary"]["wc_acc"] == pytest.approx(expected["wc_acc"])
    extra = saved["extra"]
    assert extra["eval_every_steps"] == rho and extra["eval_subsample"] == 20
    assert extra["num_evaluations"] == len(by_step) and extra["total_steps"] == total
    assert extra["eval_time_s"] == pytest.approx(result.eval_time_s) and result.eval_time_s > 0
    assert extra["eval_overhead"] == pytest.approx(result.eval_time_s / result.train_time_s)
    assert len(result.task_eval_time_s) == 2
    assert sum(result.task_eval_time_s) == pytest.approx(result.eval_time_s)

    curves = clax_metrics.read_run_curves(workdir)
    assert curves["task_boundaries"] == [steps_per_task[0]]
    assert sorted(curves["points"]) == sorted(
        (c["step"], c["train_task"], c["eval_task"], c["value"]) for c in result.curves)
    assert os.path.isfile(os.path.join(workdir, "accuracy_curves.png"))


def test_one_call_for_all_seen_tasks_matches_per_task_evaluation():
    scenario = tiny_scenario("permuted", num_tasks=3)
    config = tiny_config()
    model = build_model(config, scenario)
    fns_model, params, model_state = ModelFns.split(model)
    method = build_method(config)
    steps = StepFns(fns_model, method, method.optimizer(build_optimizer(config.optimizer)),
                    data_mesh(1))
    state = steps.init_state(params, model_state, 0)
    one_call = loop._ContinualEvaluator(steps, scenario, 64, 50, seed=0)
    per_task = loop._Evaluator(steps, scenario, 64, 50, seed=0)
    for seen in (1, 2, 3):
        for metric in ("accuracy", "loss"):
            np.testing.assert_allclose(one_call.evaluate(state, range(seen), metric),
                                       per_task.evaluate(state, range(seen))[metric],
                                       rtol=1e-6)
    assert (one_call.evaluate(state, [2, 0], "accuracy")
            == per_task.evaluate(state, [2, 0])["accuracy"])
    assert steps.evaluate_tasks._cache_size() == 1  # any number of tasks: one compilation


@pytest.mark.parametrize("rho", [-1, -10])
def test_bad_rho_is_refused_before_training(rho):
    with pytest.raises(ValueError, match=r"eval_every_steps must be a non-negative int"):
        train_continual(tiny_config(eval_every_steps=rho), scenario=tiny_scenario())


def test_without_continual_evaluation_nothing_is_timed_or_summarized():
    result = train_continual(tiny_config(epochs_per_task=1), scenario=tiny_scenario())
    assert result.curves == [] and result.eval_time_s == 0.0
    assert "min_acc" not in result.summary
