"""Orbax checkpoints of a whole run: train state plus JSON progress/results metadata.

Multi-process runs: every process creates the `Checkpointer` on the same directory (a
shared file system: one machine's disk, NFS, GCS) and calls `save` / `restore` together.
Orbax coordinates them: each process writes the shards its devices hold, process 0 the
metadata and the JSON, and a step is committed (renamed from its temporary folder) after
all have written; a restore gives every process its shards of the `like` shardings.
"""

from __future__ import annotations

import os

import jax
import numpy as np
import orbax.checkpoint as ocp

from clax.typing import PyTree


def _path(keys) -> str:
    """A leaf's path as orbax stores it (every key a string; NamedTuple fields by name)."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                    for k in keys)


def _is_key(x) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


class _Manager(ocp.CheckpointManager):
    """Orbax's manager, minus its own preemption check.

    Orbax asks ``multihost_utils.reached_preemption_sync_point(checkpoint number)`` on
    every save, but JAX's sync point is one counter per process: the loop's
    `clax.training.distributed.PreemptionWatch` passes its own call count, and orbax's
    numbers in between would move the point the processes agree on (possibly behind the
    loop's count, never reached). The loop saves on preemption itself.
    """

    def reached_preemption(self, step: int) -> bool:  # noqa: ARG002
        return False


class Checkpointer:
    """Saves (state, meta) pairs under `directory`, numbered 0, 1, 2, ...

    `meta` is a JSON-serializable dict (data position, results so far). Saves are
    committed atomically by orbax (written to a temporary folder and renamed), so an
    interrupted save never replaces the last good checkpoint.

    With ``async_save=True`` a save returns once the state is copied off the devices and
    the files are written in the background while training goes on (the steps may then
    donate the state's buffers); the next save, `latest`, `restore` and `close` wait for
    it. A kill during the background write loses only that checkpoint.
    """

    def __init__(self, directory: str, *, max_to_keep: int = 2, async_save: bool = False):
        self.directory = os.path.abspath(directory)
        self.async_save = bool(async_save)
        self._manager = _Manager(
            self.directory,
            # Handlers named up front, so a fresh manager can read a checkpoint's metadata.
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "meta": ocp.JsonCheckpointHandler()},
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, enable_async_checkpointing=self.async_save,
                create=True,
                cleanup_tmp_directories=True,  # leftovers of a save interrupted by a crash
            ),
        )

    def wait(self) -> None:
        """Blocks until a background save (``async_save``) is committed."""
        self._manager.wait_until_finished()

    def latest(self) -> int | None:
        """Number of the newest committed checkpoint, or None."""
        self.wait()
        return self._manager.latest_step()

    def save(self, state: PyTree, meta: dict) -> int:
        """Saves a new checkpoint after the latest one; returns its number."""
        latest = self.latest()
        number = 0 if latest is None else latest + 1
        self._manager.save(
            number,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
        )
        if not self.async_save:
            self.wait()
        return number

    def restore(self, like: PyTree, number: int | None = None) -> tuple[PyTree, dict]:
        """Restores checkpoint `number` (default latest) into the structure of `like`.

        `like` gives the tree structure, shapes, dtypes and shardings (e.g. a freshly
        initialised state); its values are not used.
        """
        self.wait()
        number = self.latest() if number is None else number
        if number is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        self._check_fits(number, like)
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        restored = self._manager.restore(
            number,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
            ),
        )
        return restored.state, restored.meta

    def _check_fits(self, number: int, like: PyTree) -> None:
        """One line naming the first leaf where checkpoint `number` and `like` differ."""
        try:
            saved = self._manager.item_metadata(number)["state"]
        except Exception:  # noqa: BLE001  (no readable metadata: orbax's own error follows)
            return
        if saved is None:
            return
        disk = {_path(p): getattr(x, "shape", None)
                for p, x in jax.tree_util.tree_leaves_with_path(saved)}
        here = {_path(p): np.shape(jax.random.key_data(x) if _is_key(x) else x)
                for p, x in jax.tree_util.tree_leaves_with_path(like)}
        problem = None
        for path in here:
            if path not in disk:
                problem = f"{path} is not in the checkpoint"
            elif disk[path] is not None and tuple(disk[path]) != tuple(here[path]):
                problem = (f"{path} has shape {tuple(disk[path])} in the checkpoint, "
                           f"{tuple(here[path])} in this run")
            if problem:
                break
        if problem is None:
            extra = sorted(set(disk) - set(here))
            if extra:
                problem = f"the checkpoint has {extra[0]}, which this run's state lacks"
        if problem:
            raise ValueError(
                f"checkpoint {number} in {self.directory} does not fit this run's state: "
                f"{problem} (written by another model, method or configuration; use "
                "another --workdir)")

    def close(self):
        self.wait()
        self._manager.close()
