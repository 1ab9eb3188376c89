"""The NaN guard checks the whole state before every save; blow-ups warn; recovery works."""

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clax.core import Method
from clax.training import NonFiniteLossError, NonFiniteStateError, train_continual
from clax.training.checkpoint import Checkpointer
from clax.training.health import growth_warning, suspects
from tests.training.helpers import tiny_config, tiny_scenario


def _every_checkpoint_finite(workdir, like):
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=100)
    numbers = ckpt.all_numbers()
    for n in numbers:
        state, _ = ckpt.restore(like, n)
        for part in (state.params, state.opt_state, state.memory):
            assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(part)
                       if jnp.issubdtype(np.asarray(x).dtype, jnp.inexact)), n
    ckpt.close()
    return numbers


def test_a_non_finite_memory_leaf_stops_the_run_before_it_is_saved(tmp_path):
    # The loss stays finite; only the method's memory goes bad (from step 5 on).
    method = Method(
        name="bad_memory",
        init_memory=lambda p: {"sum": jnp.zeros(())},
        update_memory=lambda m, ctx, out: {"sum": jnp.where(ctx.step >= 4, jnp.inf, 0.0)},
    )
    workdir = str(tmp_path / "run")
    config = tiny_config(checkpoint_every_steps=1, checkpoints_to_keep=100)
    with pytest.raises(NonFiniteStateError,
                       match=r"state.memory\['sum'\] became NaN/inf at step 5 \(task 0, epoch "
                             r"0\) \(1 non-finite leaves, in state.memory\).*Suspect settings: "
                             r"config.optimizer.learning_rate=0.1.*Checkpoint 3 .* is the last "
                             r"finite state"):
        train_continual(config, workdir, scenario=tiny_scenario(), method=method)
    like = Method(name="same_memory", init_memory=method.init_memory)
    fresh = train_continual(tiny_config(epochs_per_task=1), scenario=tiny_scenario(),
                            method=like, keep_state=True)
    assert _every_checkpoint_finite(workdir, fresh.state) == [0, 1, 2, 3]


def test_a_huge_learning_rate_is_named_and_nothing_non_finite_is_kept(tmp_path):
    workdir = str(tmp_path / "run")
    config = tiny_config(checkpoint_every_steps=1)
    config.optimizer.learning_rate = 1e39  # the first update overflows every parameter
    with pytest.raises(NonFiniteStateError,
                       match=r"state.params.* became NaN/inf at step 1 .*learning_rate=1e\+39"
                             r".*Nothing to resume \(no checkpoint was written yet\)"):
        train_continual(config, workdir, scenario=tiny_scenario())
    ckpts = os.path.join(workdir, "checkpoints")
    assert not os.path.isdir(ckpts) or not [d for d in os.listdir(ckpts) if d.isdigit()]


def test_an_ewc_blow_up_names_lambda_and_recovers_from_the_checkpoint_before_it(tmp_path):
    workdir = str(tmp_path / "run")
    config = tiny_config(checkpoint_every_steps=1, checkpoints_to_keep=100)
    config.method.name = "ewc"
    config.method.ewc.lam = 1e4  # lr * lam * F >> 2: the penalty's gradient steps diverge
    with pytest.raises(NonFiniteLossError) as e:
        train_continual(config, workdir, scenario=tiny_scenario())
    message = str(e.value)
    assert "config.method.ewc.lam=10000 (default 10.0)" in message, message
    assert "--allow_config_change=optimizer.learning_rate,method.ewc.lam" in message
    before = int(re.search(r"--resume_from_checkpoint=(\d+)", message).group(1))
    assert "parameters had exploded by step" in message and "\n" not in message

    fixed = tiny_config(checkpoint_every_steps=1, checkpoints_to_keep=100)
    fixed.method.name = "ewc"
    with pytest.raises(ValueError, match=r"differing keys: method.ewc.lam.*"
                                         r"--allow_config_change=method.ewc.lam"):
        train_continual(fixed, workdir, scenario=tiny_scenario())
    result = train_continual(fixed, workdir, scenario=tiny_scenario(), keep_state=True,
                             allow_config_change=["method.ewc.lam"],
                             resume_from_checkpoint=before)
    assert result.summary["acc"] > 0.4  # a finished, sane run
    [change] = result.config_changes
    assert (change["key"], change["old"], change["new"]) == ("method.ewc.lam", 1e4, 10.0)
    assert result.recovered and all(r["resumed_from"] == before for r in result.recovered)
    assert all(r["reason"] == "set aside by resume_from_checkpoint" for r in result.recovered)
    with open(os.path.join(workdir, "metrics.json")) as f:
        extra = json.load(f)["extra"]
    assert extra["config_changes"] == result.config_changes
    assert os.path.isdir(os.path.join(workdir, "checkpoints.set_aside", str(before + 1)))
    with open(os.path.join(workdir, "config_changes.json")) as f:
        assert json.load(f)[0]["key"] == "method.ewc.lam"


def test_exploding_parameters_that_stay_finite_warn_in_the_results(tmp_path):
    config = tiny_config()
    config.optimizer.learning_rate = 50.0
    result = train_continual(config, str(tmp_path), scenario=tiny_scenario())
    [warning] = result.warnings
    assert "parameters exploded" in warning and "learning_rate=50" in warning
    with open(tmp_path / "metrics.json") as f:
        assert json.load(f)["extra"]["warnings"] == [warning]
    sane = train_continual(tiny_config(), scenario=tiny_scenario())
    assert sane.warnings == []


def test_growth_warning_threshold_and_suspects():
    report = [("state.params['a']", True, 0.5e4), ("state.opt_state[0]", True, 1e9)]
    config = tiny_config()
    assert growth_warning(report, 1.0, config, "here") is None  # opt_state does not count
    report[0] = ("state.params['a']", True, 2e4)
    assert "max |θ| = 2e+04 in state.params['a']" in growth_warning(report, 1.0, config, "here")
    config.method.name = "ewc"
    config.method.ewc.lam = 7.0
    assert suspects(config) == ["config.optimizer.learning_rate=0.1",
                                "config.method.ewc.lam=7 (default 10.0)"]
