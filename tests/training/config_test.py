"""Every bad config value is one clear line naming the key, before the workdir is touched."""

import json
import os

import numpy as np
import pytest

from clax.training import default_config, train_continual
from clax.training.config import validate_config
from tests.training.helpers import tiny_config, tiny_scenario


@pytest.mark.parametrize("key, value, error, match", [
    ("train.checkpoints_to_keep", 0, ValueError,
     r"config.train.checkpoints_to_keep must be a positive int, got 0 \(at least the newest"),
    ("train.batch_size", 0, ValueError, "config.train.batch_size must be a positive int"),
    ("train.eval_batch_size", 0, ValueError, "config.train.eval_batch_size must be a positive"),
    ("train.epochs_per_task", 0, ValueError, r"epochs_per_task must be a positive int.*untrained"),
    ("train.epochs_per_task", -2, ValueError, "epochs_per_task must be a positive int"),
    ("train.checkpoint_every_steps", -1, ValueError,
     "checkpoint_every_steps must be a non-negative int, got -1"),
    ("seed", -1, ValueError, "config.seed must be a non-negative int, got -1"),
    ("optimizer.learning_rate", float("inf"), ValueError, "learning_rate must be a finite"),
])
def test_bad_values_name_the_key(key, value, error, match):
    c = default_config()
    section, _, name = key.rpartition(".")
    (c[section] if section else c)[name] = value
    with pytest.raises(error, match=match):
        validate_config(c)


def test_a_config_without_a_section_says_which():
    c = default_config()
    del c["train"]
    with pytest.raises(ValueError, match=r"config lacks section\(s\) train; start from "):
        validate_config(c)


def test_a_bad_value_leaves_a_finished_workdir_untouched(tmp_path):
    workdir = str(tmp_path / "run")
    train_continual(tiny_config(), workdir, scenario=tiny_scenario())
    before = {f: os.path.getmtime(os.path.join(workdir, f)) for f in os.listdir(workdir)}
    with pytest.raises(ValueError, match="eval_batch_size"):
        train_continual(tiny_config(eval_batch_size=0), workdir, scenario=tiny_scenario())
    assert {f: os.path.getmtime(os.path.join(workdir, f)) for f in os.listdir(workdir)} == before
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["train"]["eval_batch_size"] == 64


def test_settings_that_do_not_change_results_do_not_block_a_resume(tmp_path):
    workdir = str(tmp_path / "run")
    first = train_continual(tiny_config(), workdir, scenario=tiny_scenario())
    again = train_continual(tiny_config(checkpoint_every_steps=3, device_resident=False),
                            workdir, scenario=tiny_scenario())
    np.testing.assert_array_equal(first.accuracy_matrix, again.accuracy_matrix)
