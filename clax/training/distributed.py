"""Multi-process runs: start-up, the main process, host data onto global meshes, preemption.

One clax run on many hosts is one program run by every process (JAX's multi-controller
model): every process builds the same config, scenario and mesh over all global devices
(`jax.devices()`), calls the same jitted steps in the same order, and JAX's collectives
(NCCL on GPU, ICI/DCN on TPU, gloo on CPU) connect them. This module holds the few things
that differ from a one-process run:

* :func:`initialize` starts JAX's distributed runtime (before anything touches a device).
* :func:`is_main_process`: process 0 writes the workdir's files (config, metrics, plots);
  orbax checkpoints are written by all processes together.
* :func:`host_to_global` turns host arrays into global `jax.Array`\\ s: the whole array on
  every process (device-resident data, evaluation sets, index batches: each process has
  the small dataset), or only the rows of a batch this process feeds
  (:func:`process_rows`; the host-fed path reads only its share, for data that does not fit).
* :func:`to_host` reads results back (losses, evaluation sums) from arrays that span other
  processes' devices.
* :class:`PreemptionWatch`: SIGTERM asks the loop to checkpoint and stop, at the same
  point on every process.

In a one-process run each helper is the plain JAX call (``device_put``, ``device_get``).
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from clax._host import to_host  # noqa: F401  (re-exported: the driver reads results here)
from clax.typing import PyTree

log = logging.getLogger("clax")

__all__ = [
    "PreemptionWatch",
    "agree",
    "barrier",
    "host_to_global",
    "initialize",
    "is_main_process",
    "process_rows",
    "to_host",
]


# ------------------------------------------------------------------------- start-up


def _backends_initialized() -> bool:
    from jax._src import xla_bridge  # no public equivalent in jax 0.10
    return xla_bridge.backends_are_initialized()


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None,
               local_device_ids: int | Sequence[int] | None = None) -> None:
    """Starts JAX's distributed runtime for a multi-process run (``jax.distributed``).

    Call it once per process before anything touches a JAX device (``jax.devices()``, an
    array, a jitted call); `experiments.run` does, given ``--distributed`` or
    ``--coordinator_address``. A second call with the same (or no) arguments does nothing.

    With no arguments the cluster is detected by JAX (Cloud TPU pod slices, SLURM, Open
    MPI, Kubernetes indexed jobs; ``JAX_COORDINATOR_ADDRESS`` may name the coordinator).
    Otherwise pass all three of `coordinator_address` (``host:port`` of process 0, the same on every
    process), `num_processes` and this process's `process_id` in ``[0, num_processes)``.
    On CPU devices cross-process collectives use gloo (``jax_cpu_collectives_implementation``,
    unless already set to another implementation).

    Args:
      coordinator_address: ``host:port`` where process 0 serves the coordinator.
      num_processes: the number of processes of the run.
      process_id: this process's index.
      local_device_ids: restrict this process to these local devices (GPU ids).

    Raises:
      ValueError: on inconsistent arguments, a second call with different ones, or no
        cluster detected and no arguments.
      RuntimeError: if JAX devices were already used in this process.
    """
    if num_processes is not None and (isinstance(num_processes, bool)
                                      or not isinstance(num_processes, (int, np.integer))
                                      or num_processes < 1):
        raise ValueError(f"num_processes must be an int >= 1, got {num_processes!r}")
    if process_id is not None:
        if isinstance(process_id, bool) or not isinstance(process_id, (int, np.integer)):
            raise ValueError(f"process_id must be an int, got {process_id!r}")
        if num_processes is not None and not 0 <= process_id < num_processes:
            raise ValueError(f"process_id={process_id} is outside [0, num_processes="
                             f"{num_processes})")
    if coordinator_address is not None:
        host, _, port = str(coordinator_address).rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"coordinator_address must be host:port, got "
                             f"{coordinator_address!r}")
    if jax.distributed.is_initialized():
        from jax._src import distributed as jax_distributed
        state = jax_distributed.global_state
        asked = {"coordinator_address": coordinator_address, "num_processes": num_processes,
                 "process_id": process_id}
        running = {"coordinator_address": state.coordinator_address,
                   "num_processes": state.num_processes, "process_id": state.process_id}
        differ = [k for k, v in asked.items() if v is not None and v != running[k]]
        if differ:
            raise ValueError(
                "jax.distributed is already initialized with "
                + ", ".join(f"{k}={running[k]!r}" for k in differ) + "; asked for "
                + ", ".join(f"{k}={asked[k]!r}" for k in differ))
        return
    if _backends_initialized():
        raise RuntimeError(
            "clax.training.distributed.initialize must run before anything touches a JAX "
            "device (jax.devices(), an array, a jitted call); call it first thing in main()")
    if jax.config.jax_cpu_collectives_implementation is None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=None if num_processes is None else int(num_processes),
            process_id=None if process_id is None else int(process_id),
            local_device_ids=local_device_ids)
    except ValueError as e:
        if "should be defined" in str(e) or "must be defined" in str(e):
            raise ValueError(
                "no cluster detected (Cloud TPU, SLURM, Open MPI, Kubernetes); pass "
                "coordinator_address, num_processes and process_id (--coordinator_"
                f"address, --num_processes, --process_id): {e}") from None
        raise
    log.info("process %d of %d: %d local devices of %d (%s)", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count(),
             jax.default_backend())


def is_main_process() -> bool:
    """Whether this is process 0, the one that writes the workdir's files."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Waits until every process reaches the barrier `name` (nothing in one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def agree(value: bool) -> bool:
    """Process 0's `value` on every process (the value itself in a one-process run).

    For decisions only process 0 can take (it holds the workdir's lock): the others learn
    the outcome instead of waiting at a barrier that process 0 never reaches.
    """
    if jax.process_count() == 1:
        return bool(value)
    from jax.experimental import multihost_utils
    return bool(multihost_utils.broadcast_one_to_all(np.int32(bool(value))))


# ----------------------------------------------------------------- host <-> global


def _is_global(x: Any) -> bool:
    return isinstance(x, jax.Array) and not x.is_fully_addressable


def host_to_global(tree: PyTree, sharding: Any, global_size: int | None = None) -> PyTree:
    """Global arrays of `sharding` (one sharding for every leaf) from host data.

    Args:
      tree: numpy arrays (or fully addressable jax arrays; global arrays are resharded).
        With `global_size` None, each leaf is the whole global array, the same on every
        process (a replicated dataset, or the global batch, of which each process places
        the rows its devices hold). Otherwise each leaf holds only this process's rows of
        a batch of `global_size` rows along the leading axis: ``process_rows(sharding,
        global_size)`` of it, in that order.
      sharding: a `jax.sharding.Sharding` over the run's mesh.
      global_size: the leading size of the global arrays when `tree` holds this
        process's rows only.

    In one process this is ``jax.device_put`` (the whole array; `global_size` must then be
    the local size). Across processes, ``jax.make_array_from_callback`` /
    ``jax.make_array_from_process_local_data``: no cross-process check or transfer (a
    ``jax.device_put`` of a host array onto a global sharding all-gathers the array to
    check every process passed the same).
    """
    def one(x):
        if _is_global(x):
            return jax.device_put(x, sharding)
        if global_size is not None:
            rows = np.shape(x)[0] if np.ndim(x) else None
            want = len(process_rows(sharding, global_size))
            if rows != want:
                raise ValueError(f"host_to_global: a leaf of shape {np.shape(x)} holds {rows} "
                                 f"rows; this process feeds {want} of the {global_size}")
        if jax.process_count() == 1:
            return jax.device_put(x, sharding)
        x = np.asarray(x)
        if global_size is None:
            return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
        return jax.make_array_from_process_local_data(sharding, x,
                                                      (int(global_size), *x.shape[1:]))

    return jax.tree.map(one, tree)


def process_rows(sharding: Any, global_size: int) -> np.ndarray:
    """The rows (leading-axis indices) of a global array of `global_size` rows that this
    process's devices hold under `sharding`, ascending: what `host_to_global` expects of a
    process's share. All rows in a one-process run.

    On a mesh whose batch axes follow the process order (CPU, and GPU hosts), process
    ``p`` of ``P`` holds the contiguous block ``[p*B/P, (p+1)*B/P)``; on TPU slices the
    device order can differ, so feed what this returns rather than assuming the block.
    """
    rows: set[int] = set()
    for index in sharding.addressable_devices_indices_map((int(global_size),)).values():
        rows.update(range(*index[0].indices(int(global_size))))
    return np.asarray(sorted(rows), np.int64)


def process_block(sharding: Any, global_size: int) -> tuple[int, int] | None:
    """``(i, n)`` if this process's rows are block ``i`` of ``n`` equal contiguous blocks
    of the `global_size` rows (what a pipeline with ``process_index=i, process_count=n``
    reads), else None (feed `process_rows` explicitly)."""
    rows = process_rows(sharding, global_size)
    n_rows = len(rows)
    if n_rows == 0 or int(global_size) % n_rows:
        return None
    start = int(rows[0])
    if start % n_rows or not np.array_equal(rows, np.arange(start, start + n_rows)):
        return None
    return start // n_rows, int(global_size) // n_rows


# ---------------------------------------------------------------------- preemption


# Calls of reached_preemption_sync_point in this process: one counter for the process's
# life (JAX's sync point is a call number; a second run in the same process must not meet
# the first run's point again).
_sync_calls = 0


def _preemption_sync_manager() -> Any:
    if not jax.distributed.is_initialized():
        return None
    from jax._src import distributed as jax_distributed
    return jax_distributed.global_state.preemption_sync_manager


class PreemptionWatch:
    """SIGTERM (a scheduler's preemption notice) -> a stop request at a sync point.

    Use as a context manager around the training loop and call :meth:`should_stop` at the
    points where the loop could checkpoint and stop (between chunks of steps), the same
    calls in the same order on every process. It returns True at the same call on every
    process once any process got SIGTERM, and keeps returning True after that.

    * With ``jax.distributed`` initialized (its preemption service is on by default) JAX's
      own SIGTERM notifier and ``multihost_utils.reached_preemption_sync_point`` decide:
      the processes agree on the next sync point after the notice through the coordination
      service, with no collective per call (the counter passed is the number of calls in
      this process, the same on every process as they run the same program).
    * Otherwise a Python SIGTERM handler that only sets a flag (installed by the main
      thread, the previous handler restored on exit); across processes without the
      preemption service, the flag is all-gathered at each call (a tiny collective).

    Nothing happens in the handler itself; a chunk in flight runs to its end first.
    """

    def __init__(self, enabled: bool = True):
        self._enabled = enabled
        self._flag = False
        self._stop = False
        self._previous: Any = None
        self._installed = False
        self._jax_sync = False

    def _handler(self, signum, frame):  # noqa: ARG002
        self._flag = True

    def __enter__(self) -> PreemptionWatch:
        if not self._enabled:
            return self
        self._jax_sync = _preemption_sync_manager() is not None
        if not self._jax_sync and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handler)
            self._installed = True
        return self

    def __exit__(self, *exc) -> None:
        if self._installed:
            # None: the previous handler was not Python's (it cannot be put back).
            previous = signal.SIG_DFL if self._previous is None else self._previous
            signal.signal(signal.SIGTERM, previous)
            self._installed = False

    @property
    def requested(self) -> bool:
        """Whether a stop was agreed (by an earlier :meth:`should_stop`)."""
        return self._stop

    def should_stop(self) -> bool:
        """One sync point: whether every process should checkpoint and stop now."""
        global _sync_calls
        if self._stop or not self._enabled:
            return self._stop
        if self._jax_sync:
            from jax.experimental import multihost_utils
            self._stop = bool(multihost_utils.reached_preemption_sync_point(_sync_calls))
            _sync_calls += 1
        elif jax.process_count() > 1:
            from jax.experimental import multihost_utils
            flags = multihost_utils.process_allgather(np.int32(self._flag))
            self._stop = bool(np.max(flags))
        else:
            self._stop = self._flag
        return self._stop
