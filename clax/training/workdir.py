"""A run's workdir: one process at a time (an OS lock), one config (or recorded changes).

`WorkdirLock` holds an exclusive ``fcntl.flock`` on ``<workdir>/.lock`` for the whole run.
The kernel drops the lock when its process exits in any way (return, exception, kill -9),
so a dead run never blocks the next one; the file keeps the holder's pid, host and start
time, so a second process is refused with one line naming them, and a run that takes the
lock over from a killed one says so. On file systems without ``flock`` (some network
mounts) the lock falls back to that file's pid: a live pid on this host holds it.

In a multi-process run process 0 takes the lock and the others learn the outcome from it
(they share the workdir and would otherwise lock each other out).

`check_config` refuses a workdir whose checkpoints come from a different config, except
for keys the caller explicitly allows to change (``allow_changes``): those changes are
recorded in ``<workdir>/config_changes.json`` and returned, so a recovered run says what
was changed where.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import logging
import os
import socket
import sys
from collections.abc import Sequence
from typing import Any

import ml_collections

from clax import models as clax_models
from clax.core import registered_methods
from clax.training import config as config_lib
from clax.training import distributed

log = logging.getLogger("clax")

LOCK_FILE = ".lock"
CONFIG_FILE = "config.json"
CHANGES_FILE = "config_changes.json"


class WorkdirInUseError(RuntimeError):
    """Another live process holds the workdir's lock."""


def _holder(text: str) -> dict[str, Any]:
    try:
        info = json.loads(text)
        return info if isinstance(info, dict) else {}
    except ValueError:
        return {}


def _describe(info: dict[str, Any]) -> str:
    if not info:
        return "an unknown process"
    return (f"pid {info.get('pid', '?')} on host {info.get('host', '?')} "
            f"(started {info.get('started', '?')})")


def _pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


class WorkdirLock:
    """An exclusive lock on a workdir for one run (a context manager; reentrant no).

    Args:
      workdir: the run's directory (created if missing).

    Raises (on ``acquire`` / entering):
      WorkdirInUseError: another live process holds it (the message names its pid and
        host, and says how to proceed).
    """

    def __init__(self, workdir: str):
        self.workdir = os.path.abspath(workdir)
        self.path = os.path.join(self.workdir, LOCK_FILE)
        self._fd: int | None = None
        self.took_over: dict[str, Any] | None = None  # the dead holder's record, if any

    def acquire(self) -> WorkdirLock:
        if self._fd is not None:
            raise RuntimeError(f"the lock of {self.workdir} is already held by this object")
        os.makedirs(self.workdir, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            previous = _holder(os.pread(fd, 65536, 0).decode(errors="replace"))
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise self._in_use(previous) from None
            except OSError as e:  # no flock here (ENOLCK / EOPNOTSUPP): trust the pid file
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                if previous.get("host") == socket.gethostname() and _pid_alive(
                        previous.get("pid")) and previous.get("pid") != os.getpid():
                    raise self._in_use(previous) from None
            if previous:  # the file holds a record, yet nobody holds the lock: it died
                self.took_over = previous
                log.warning("workdir %s: the previous run (%s) ended without releasing its "
                            "lock (killed?); taking it over", self.workdir, _describe(previous))
            record = {"pid": os.getpid(), "host": socket.gethostname(),
                      "started": datetime.datetime.now().isoformat(timespec="seconds"),
                      "argv": sys.argv}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(record).encode(), 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def _in_use(self, info: dict[str, Any]) -> WorkdirInUseError:
        return WorkdirInUseError(
            f"workdir {self.workdir} is in use by {_describe(info)}; wait for that run to "
            "finish or stop it, or use another --workdir (two runs on one workdir would mix "
            "their checkpoints)")

    def release(self) -> None:
        """Clears the record and drops the lock (the file stays: see the module doc)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)  # an empty record: released cleanly, nothing to take over
        finally:
            os.close(fd)  # closing the descriptor drops the flock

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> WorkdirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


@contextlib.contextmanager
def locked(workdir: str | None):
    """Holds the workdir's lock for the block (nothing if `workdir` is None).

    Process 0 takes the lock; in a multi-process run the others wait for its outcome and
    raise the same error if it failed.
    """
    if workdir is None:
        yield None
        return
    lock, error = WorkdirLock(workdir), None
    if distributed.is_main_process():
        try:
            lock.acquire()
        except WorkdirInUseError as e:
            error = e
    ok = distributed.agree(error is None)
    if error is not None:
        raise error
    if not ok:
        raise WorkdirInUseError(f"workdir {os.path.abspath(workdir)} is in use by another "
                                "run (process 0 could not lock it)")
    try:
        yield lock
    finally:
        lock.release()


# ------------------------------------------------------------------------- the config


def _diff_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff_keys(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


def _get(tree: dict, key: str) -> Any:
    for part in key.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def _affects_run(key: str, config: dict) -> bool:
    """False for the subsections of models and methods the run does not use.

    ``config.method.<name>`` exists for every registered method, so registering a new one
    (or changing another method's defaults) must not make older workdirs unresumable.
    """
    parts = key.split(".")
    if len(parts) >= 2 and parts[0] in ("method", "model") and parts[1] != "name":
        # Only the per-model / per-method subsections are skipped; model.peft,
        # model.pretrained and model.multi_head always change the run.
        names = clax_models.MODELS if parts[0] == "model" else registered_methods()
        if parts[1] in names:
            return parts[1] == config.get(parts[0], {}).get("name")
    return True


def has_checkpoints(directory: str) -> bool:
    return os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))


def check_config(workdir: str, config: ml_collections.ConfigDict, *,
                 allow_changes: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Refuses to reuse a workdir whose checkpoints come from a different config.

    A workdir without checkpoints (a run that failed before its first save) takes the new
    config. Keys in `allow_changes` (dotted, e.g. ``"optimizer.learning_rate"``) may
    differ: each change is appended to ``config_changes.json`` and returned, so the caller
    can record it with the run's results (a recovery with a lower learning rate, say). In
    a multi-process run every process reads and checks the same files (raising the same
    error) and process 0 writes, after a barrier.

    Returns:
      the allowed changes made now: ``[{"key", "old", "new"}, ...]``.
    """
    path = os.path.join(workdir, CONFIG_FILE)
    current = json.loads(config.to_json_best_effort())
    allowed = set(allow_changes)
    unknown = sorted(k for k in allowed if _get(current, k) is None)
    if unknown:
        raise ValueError(f"allow_config_change names {unknown[0]!r}, which is not a key of "
                         "this config (dotted, e.g. optimizer.learning_rate)")
    changes: list[dict[str, Any]] = []
    unchanged = False
    if os.path.exists(path) and has_checkpoints(os.path.join(workdir, "checkpoints")):
        with open(path) as f:
            saved = json.load(f)
        diffs = [k for k in _diff_keys(saved, current)
                 if k not in config_lib.OPERATIONAL_KEYS and _affects_run(k, current)]
        refused = [k for k in diffs if k not in allowed]
        if refused:
            raise ValueError(
                f"workdir {workdir!r} holds a run with a different config (differing keys: "
                f"{', '.join(refused)}); use another --workdir to start a new run, or, to "
                "resume this one with the change (recorded with its results), "
                f"--allow_config_change={','.join(refused)}. Nothing in the workdir was "
                "changed.")
        changes = [{"key": k, "old": _get(saved, k), "new": _get(current, k)} for k in diffs]
        unchanged = saved == current
    distributed.barrier("clax_workdir_config_checked")  # nobody writes before all have read
    if not unchanged and distributed.is_main_process():
        os.makedirs(workdir, exist_ok=True)
        if changes:
            log_path = os.path.join(workdir, CHANGES_FILE)
            history = []
            if os.path.exists(log_path):
                with open(log_path) as f:
                    history = json.load(f)
            stamp = datetime.datetime.now().isoformat(timespec="seconds")
            history += [{**c, "time": stamp} for c in changes]
            _write_json(log_path, history)
            for c in changes:
                log.warning("workdir %s: config.%s changed from %r to %r for this resume "
                            "(recorded in %s)", workdir, c["key"], c["old"], c["new"],
                            CHANGES_FILE)
        _write_json(path, current)
    distributed.barrier("clax_workdir_config_written")
    return changes


def _write_json(path: str, value: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=2, sort_keys=True)
    os.replace(tmp, path)
