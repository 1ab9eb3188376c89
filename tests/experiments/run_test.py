"""The launcher end to end (subprocesses, as a user runs it)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(*args, timeout=300):
    env = dict(os.environ, XLA_FLAGS="", PYTHONPATH=ROOT)
    return subprocess.run(
        [sys.executable, "-m", "experiments.run", *args], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=timeout,
    )


def test_main_job_compares_one_method_of_each_family():
    from experiments.configs.digits_compare import get_config

    methods = get_config().compare.methods.split(",")
    assert methods == ["finetune", "ewc", "gpm", "er", "acil", "ema", "joint"]


@pytest.mark.slow
def test_main_job_runs_every_method(tmp_path):
    proc = _run("--config=experiments/configs/digits_compare.py", f"--workdir={tmp_path}",
                "--config.train.epochs_per_task=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "results.json").read_text())
    assert len(rows) == 14 and all(r["acc"] is not None for r in rows)


def test_compare_mode_prints_table_and_writes_results(tmp_path):
    # Two methods keep this under a minute; the full main job is the slow test above.
    proc = _run("--config=experiments/configs/digits_compare.py", f"--workdir={tmp_path}",
                "--config.train.epochs_per_task=1", "--config.compare.methods=finetune,joint")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "| benchmark | method | ACC | BWT | FWT | Forgetting | train time (s) |" in out
    for cell in ("split_digits/finetune", "split_digits/joint", "permuted_digits/finetune",
                 "permuted_digits/joint"):
        assert f"{cell}: task 5/5" in out  # per-task progress lines
        with open(tmp_path / cell / "metrics.json") as f:
            assert len(json.load(f)["accuracy_matrix"]) == 5
    rows = json.loads((tmp_path / "results.json").read_text())
    assert [(r["benchmark"], r["method"]) for r in rows] == [
        ("split_digits", "finetune"), ("split_digits", "joint"),
        ("permuted_digits", "finetune"), ("permuted_digits", "joint")]
    assert (tmp_path / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unknown_config_key_lists_valid_keys(tmp_path):
    proc = _run("--config=experiments/configs/split_digits.py", f"--workdir={tmp_path}",
                "--config.train.epocs_per_task=2")
    assert proc.returncode != 0
    assert "unknown config key config.train.epocs_per_task" in proc.stderr
    assert "epochs_per_task" in proc.stderr.split("valid keys")[1]


def test_missing_dataset_folder_names_the_path(tmp_path):
    missing = tmp_path / "no_such_dir"
    proc = _run("--config=experiments/configs/split_digits.py", f"--workdir={tmp_path / 'w'}",
                "--config.data.source=fashion_mnist", f"--config.data.root={missing}")
    assert proc.returncode != 0
    assert str(missing) in proc.stderr and "dataset-fashion-mnist" in proc.stderr
    assert not (tmp_path / "w" / "checkpoints").exists()


def test_a_second_run_on_a_busy_workdir_is_one_line_naming_the_holder(tmp_path):
    from tests.training.workdir_test import hold_lock

    holder = hold_lock(tmp_path)
    try:
        proc = _run("--config=experiments/configs/split_digits.py", f"--workdir={tmp_path}")
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode != 0
    [line] = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert f"is in use by pid {holder.pid} on host" in line
    assert not (tmp_path / "checkpoints").exists()
