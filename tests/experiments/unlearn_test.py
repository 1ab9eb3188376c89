"""The unlearning launcher end to end (subprocesses, as a user runs it)."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(*args, timeout=300):
    env = dict(os.environ, XLA_FLAGS="", PYTHONPATH=ROOT)
    return subprocess.run(
        [sys.executable, "-m", "experiments.unlearn", *args], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=timeout,
    )


def test_digits_config_unlearns_and_writes_the_table(tmp_path):
    proc = _run("--config=experiments/configs/unlearn_digits.py", f"--workdir={tmp_path}",
                "--config.train.epochs_per_task=3", "--config.unlearn.reference=none",
                "--config.unlearn.target_margin=-1", "--config.unlearn.target=0.1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "unlearn_digits: step 0/200" in proc.stdout  # progress lines
    assert "| unlearned (ga) |" in proc.stdout
    doc = json.loads((tmp_path / "unlearn_metrics.json").read_text())
    assert doc["unlearner"] == "ga" and doc["reached_target"]
    assert doc["metrics"]["forget_train_acc"] <= 0.1


def test_bad_config_value_is_one_line(tmp_path):
    proc = _run("--config=experiments/configs/unlearn_digits.py", f"--workdir={tmp_path}",
                "--config.unlearn.forget=some")
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert lines[-2].startswith("error: config.unlearn.forget must be one of")
    assert lines[-1] == "(rerun with --traceback for the full stack)"
    assert not (tmp_path / "original").exists()  # refused before training


def test_unknown_config_key_lists_valid_keys(tmp_path):
    proc = _run("--config=experiments/configs/unlearn_digits.py", f"--workdir={tmp_path}",
                "--config.unlearn.stepz=3")
    assert proc.returncode != 0
    assert "unknown config key config.unlearn.stepz" in proc.stderr
    assert "steps" in proc.stderr.split("valid keys")[1]
