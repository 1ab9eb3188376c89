"""One run per workdir: the OS lock, its holder in the refusal, take-over after kill -9."""

import json
import logging
import os
import socket
import subprocess
import sys

import pytest

from clax.training import WorkdirInUseError, WorkdirLock, train_continual
from clax.training.workdir import LOCK_FILE
from tests.training.helpers import tiny_config, tiny_scenario

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HOLD = ("import sys, time\n"
        "from clax.training.workdir import WorkdirLock\n"
        "WorkdirLock(sys.argv[1]).acquire()\n"
        "print('locked', flush=True)\n"
        "time.sleep(120)\n")


def hold_lock(workdir) -> subprocess.Popen:
    """Another process holding `workdir`'s lock (returns once it holds it)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(workdir)], cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu"),
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_process_is_refused_naming_the_holder_and_a_killed_one_is_taken_over(
        tmp_path, caplog):
    workdir = tmp_path / "run"
    holder = hold_lock(workdir)
    try:
        with pytest.raises(WorkdirInUseError,
                           match=rf"in use by pid {holder.pid} on host "
                                 rf"{socket.gethostname()} \(started .*use another --workdir"):
            train_continual(tiny_config(), str(workdir), scenario=tiny_scenario())
        assert sorted(os.listdir(workdir)) == [LOCK_FILE]  # refused before touching anything
    finally:
        holder.kill()  # SIGKILL: the kernel drops its lock, its record stays in the file
        holder.wait()
    with caplog.at_level(logging.WARNING, logger="clax"):
        train_continual(tiny_config(), str(workdir), scenario=tiny_scenario())
    assert f"previous run (pid {holder.pid}" in caplog.text and "taking it over" in caplog.text
    assert (workdir / LOCK_FILE).read_text() == ""  # released cleanly at the end


def test_the_lock_is_exclusive_in_one_process_and_released_on_errors(tmp_path):
    lock = WorkdirLock(tmp_path).acquire()
    record = json.loads((tmp_path / LOCK_FILE).read_text())
    assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
    with pytest.raises(WorkdirInUseError, match=f"pid {os.getpid()}"):
        WorkdirLock(tmp_path).acquire()
    lock.release()
    with WorkdirLock(tmp_path) as again:
        assert again.held and again.took_over is None  # a clean release leaves no record
    c = tiny_config()
    c.train.batch_size = 30  # refused after the lock was taken (mesh check in the build)
    c.train.num_devices = 8
    with pytest.raises(ValueError, match="divisible"):
        train_continual(c, str(tmp_path), scenario=tiny_scenario())
    WorkdirLock(tmp_path).acquire().release()  # the failed run released it
