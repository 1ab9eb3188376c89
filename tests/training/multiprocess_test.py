"""Real multi-process runs (two processes, one 8-device mesh) and SIGTERM preemption.

The two-process tests start `_multiprocess_worker` twice (4 CPU devices each, gloo
collectives, jax.distributed on a free localhost port) and compare what both processes
end with against the same config run here, in one process on 8 devices. The SIGTERM test
stops `experiments.run` with the signal after its first checkpoint and reruns it.
"""

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from clax.training import distributed, train_continual
from clax.training.checkpoint import Checkpointer
from tests.training import _multiprocess_worker as worker

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _start_workers(out, cases, num_processes=2):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
               XLA_FLAGS=f"--xla_force_host_platform_device_count={8 // num_processes}")
    port = _free_port()
    return [subprocess.Popen(
        [sys.executable, "-m", "tests.training._multiprocess_worker", str(i),
         str(num_processes), str(port), str(out), ",".join(cases)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(num_processes)]


def _wait(procs, timeout=180):
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for i, (p, out) in enumerate(zip(procs, outs, strict=True)):
        lines = [line for line in out.splitlines() if not line.startswith("[Gloo]")]
        assert p.returncode == 0, f"process {i} exited {p.returncode}:\n" + "\n".join(lines[-40:])
    return outs


def _reference(name):
    """The case in this process, one process on 8 devices."""
    result = train_continual(worker.case_config(name), scenario=worker.scenario(),
                             keep_state=True)
    return result, worker.flat_params(distributed.to_host(result.state.params))


def _check_against(out, name, reference):
    result, params = reference
    got = [np.load(out / f"{name}.p{i}.npz") for i in range(2)]
    for metric, matrix in result.matrices.items():
        for g in got:
            np.testing.assert_allclose(g[f"matrix:{metric}"], matrix, atol=1e-5, rtol=0)
    for key, value in params.items():
        for g in got:
            np.testing.assert_allclose(g[f"param:{key}"], value, atol=1e-5, rtol=0)
    # The workdir's result files are written once, by process 0.
    assert [int(g["writes"]) for g in got] == [1, 0]
    with open(out / name / "metrics.json") as f:
        np.testing.assert_allclose(json.load(f)["accuracy_matrix"], result.accuracy_matrix,
                                   atol=1e-5)
    assert (out / name / "config.json").exists()
    return got


def test_two_processes_match_one_process(tmp_path):
    # ER device-resident on a 2 data x 4 fsdp mesh: parameters and replay buffer split
    # over fsdp, the data axis across the processes; continual evaluation on.
    # Then EWC with every parameter split across the two processes (1 data x 8 fsdp).
    procs = _start_workers(tmp_path, ["er_fsdp", "ewc_fsdp8"])
    references = {name: _reference(name) for name in ("er_fsdp", "ewc_fsdp8")}
    _wait(procs)
    for name, reference in references.items():
        _check_against(tmp_path, name, reference)


@pytest.mark.slow  # the default suite keeps the one-process SIGTERM test and two processes
def test_two_processes_stop_together_on_sigterm_and_resume(tmp_path):
    # EWC host-fed (each process feeds its half of every batch). Process 1 alone gets
    # SIGTERM after its first checkpoint: both stop at the same checkpoint (JAX's
    # preemption sync point); the rerun resumes and ends as an uninterrupted run.
    procs = _start_workers(tmp_path, ["ewc_host_preempt"])
    reference = _reference("ewc_host_preempt")
    _wait(procs)
    got = _check_against(tmp_path, "ewc_host_preempt", reference)
    assert int(got[0]["preempted_at"]) == int(got[1]["preempted_at"]) >= 1
    assert str(got[0]["preempted_message"]) == (
        f"preempted: saved checkpoint {int(got[0]['preempted_at'])}; rerun the same command "
        "to resume")


def test_kill_9_of_one_process_during_a_save_keeps_the_last_checkpoint(tmp_path):
    # A checkpoint every step; as soon as a save is in flight (orbax's temporary folder
    # appears) process 1 is killed with SIGKILL, then process 0 (blocked in a collective).
    # Every committed checkpoint must restore, and rerunning both processes must resume
    # and end as the uninterrupted run.
    procs = _start_workers(tmp_path, ["er_kill"])
    reference = _reference("er_kill")
    ckpts = tmp_path / "er_kill" / "checkpoints"
    deadline = time.monotonic() + 150
    in_flight = False
    while time.monotonic() < deadline and all(p.poll() is None for p in procs):
        names = os.listdir(ckpts) if ckpts.is_dir() else []
        committed = [n for n in names if n.isdigit()]
        if len(committed) >= 2 and any("tmp" in n for n in names):
            in_flight = True
            break
        time.sleep(0.002)
    procs[1].kill()
    time.sleep(1.0)
    procs[0].kill()
    for p in procs:
        p.wait()
    assert in_flight, "no save was caught in flight before the run ended"
    ckpt = Checkpointer(str(ckpts))
    latest = ckpt.latest()
    ckpt.close()
    assert latest is not None and latest >= 1
    outs = _wait(_start_workers(tmp_path, ["er_kill"]))
    assert f"resumed from checkpoint {latest} " in outs[0], outs[0][-2000:]
    _check_against(tmp_path, "er_kill", reference)


def test_row_shares_cover_the_batch():
    # One process: every row is this process's; the block helper sees one block.
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from clax.training import sharding as sharding_lib

    mesh = sharding_lib.make_mesh(2, 4, 1)
    s = NamedSharding(mesh, P(sharding_lib.BATCH_AXES))
    np.testing.assert_array_equal(distributed.process_rows(s, 32), np.arange(32))
    assert distributed.process_block(s, 32) == (0, 1)
    batch = np.arange(64.0).reshape(32, 2)
    placed = distributed.host_to_global(batch, s, global_size=32)
    np.testing.assert_array_equal(distributed.to_host(placed), batch)
    with pytest.raises(ValueError, match="holds 16 rows; this process feeds 32"):
        distributed.host_to_global(batch[:16], s, global_size=32)


def test_initialize_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"process_id=2 is outside \[0, num_processes=2\)"):
        distributed.initialize("localhost:1234", 2, 2)
    with pytest.raises(ValueError, match="num_processes must be an int >= 1"):
        distributed.initialize("localhost:1234", 0, 0)
    with pytest.raises(ValueError, match="coordinator_address must be host:port"):
        distributed.initialize("localhost", 2, 0)
    assert jax.device_count() == 8  # devices in use: initialize would now refuse
    with pytest.raises(RuntimeError, match="must run before anything touches a JAX device"):
        distributed.initialize("localhost:1234", 2, 0)


def test_preemption_watch_only_sets_a_flag_and_restores_the_handler():
    before = signal.getsignal(signal.SIGTERM)
    with distributed.PreemptionWatch() as watch:
        assert not watch.should_stop()
        os.kill(os.getpid(), signal.SIGTERM)  # handled: sets the flag, nothing else
        assert watch.should_stop() and watch.requested and watch.should_stop()
    assert signal.getsignal(signal.SIGTERM) is before
    with distributed.PreemptionWatch(enabled=False) as off:
        assert signal.getsignal(signal.SIGTERM) is before and not off.should_stop()


_SIGTERM_CONFIG = '''
from clax.training import default_config


def get_config():
    c = default_config()
    c.name = "sigterm"
    c.scenario.classes_per_task = 5  # digits: 2 tasks
    c.scenario.max_train_per_task = 128
    c.scenario.max_test_per_task = 64
    c.model.mlp.widths = (32,)
    c.method.name = "er"  # memory written every step: the buffer must resume exactly
    c.optimizer.learning_rate = 0.05
    c.train.epochs_per_task = 3
    c.train.batch_size = 32
    c.train.eval_batch_size = 64
    c.train.checkpoint_every_steps = 2
    return c
'''


def _launch(config_path, workdir):
    return subprocess.Popen(
        [sys.executable, "-m", "experiments.run", f"--config={config_path}",
         f"--workdir={workdir}"],
        cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)


def test_sigterm_saves_stops_and_resumes_bit_identically(tmp_path, caplog):
    config_path = tmp_path / "sigterm_config.py"
    config_path.write_text(_SIGTERM_CONFIG)
    workdir = tmp_path / "run"
    proc = _launch(config_path, workdir)
    first = workdir / "checkpoints" / "0" / "commit_success.txt"
    deadline = time.monotonic() + 120
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before its first checkpoint"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    line = out.strip().splitlines()[-1]
    assert line.startswith("preempted: saved checkpoint ") and line.endswith(
        "; rerun the same command to resume"), out
    stopped_at = int(line.split("checkpoint ")[1].split(";")[0])
    ckpt = Checkpointer(str(workdir / "checkpoints"))
    assert ckpt.latest() == stopped_at
    ckpt.close()
    assert not (workdir / "metrics.json").exists()

    # An uninterrupted run of the same config, then the rerun (what the same command
    # does, here: 8 devices, as the subprocess had).
    spec = importlib.util.spec_from_file_location("_sigterm_config", config_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    reference = train_continual(module.get_config(), keep_state=True)
    with caplog.at_level("INFO", logger="clax"):
        resumed = train_continual(module.get_config(), str(workdir), keep_state=True)
    assert f"resumed from checkpoint {stopped_at}" in caplog.text
    with open(workdir / "metrics.json") as f:
        assert json.load(f)["accuracy_matrix"] == reference.accuracy_matrix.tolist()
    for part in ("params", "opt_state", "memory", "step"):
        for a, b in zip(jax.tree.leaves(getattr(resumed.state, part)),
                        jax.tree.leaves(getattr(reference.state, part)), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
