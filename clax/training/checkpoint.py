"""Orbax checkpoints of a whole run: train state plus JSON progress/results metadata.

Multi-process runs: every process creates the `Checkpointer` on the same directory (a
shared file system: one machine's disk, NFS, GCS) and calls `save` / `restore` together.
Orbax coordinates them: each process writes the shards its devices hold, process 0 the
metadata and the JSON, and a step is committed (renamed from its temporary folder) after
all have written; a restore gives every process its shards of the `like` shardings.

Integrity: every save also writes checksums of what it saved (two 32-bit sums per state
leaf, computed on the devices where the leaf lives, and a SHA-256 of the JSON metadata) in
the same atomic commit. A restore recomputes them on what it read; a checkpoint that does
not read back (a truncated or deleted file, random bytes) or reads back different values
(flipped bytes) is reported in one line and skipped for the next older one, and is moved
aside to ``<directory>.corrupt/`` (kept, never deleted).
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import os
import sys
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from clax import _host
from clax.training import distributed
from clax.typing import PyTree

log = logging.getLogger("clax")
INTEGRITY_VERSION = 1


class CorruptCheckpointError(ValueError):
    """A checkpoint that cannot be read back as it was saved (and no older good one)."""


def _path(keys) -> str:
    """A leaf's path as orbax stores it (every key a string; NamedTuple fields by name)."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                    for k in keys)


def _is_key(x) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _leaf_sums(x: jax.Array) -> jax.Array:
    """Two position-weighted sums, mod 2**32, of a leaf's bytes read as unsigned words.

    Integer sums are exact in any order, so the result does not depend on how the leaf
    is sharded (a checkpoint saved on 8 devices verifies on 1). Any change confined to one
    byte changes both sums: the word changes by d * 256**k (d != 0 mod 256, k < 4), times
    an odd weight, which is never 0 mod 2**32.
    """
    if _is_key(x):
        x = jax.random.key_data(x)
    if jnp.iscomplexobj(x):
        x = jnp.stack([jnp.real(x), jnp.imag(x)], axis=-1)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    size = x.dtype.itemsize
    if size >= 4:  # 8-byte types become (..., 2) words
        words = jax.lax.bitcast_convert_type(x, jnp.uint32)
    else:
        words = jax.lax.bitcast_convert_type(x, {2: jnp.uint16, 1: jnp.uint8}[size])
        words = words.astype(jnp.uint32)
    # Row-major position of every word, built from iotas (no reshape: stays sharded).
    index = jnp.zeros(words.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(words.ndim)):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis) * np.uint32(
            stride % 2**32)
        stride *= words.shape[axis]
    odd = index * np.uint32(2) + np.uint32(1)
    mixed = words ^ (index * np.uint32(0x9E3779B9))
    return jnp.stack([jnp.sum(words * odd, dtype=jnp.uint32),
                      jnp.sum(mixed * (index * np.uint32(0x85EBCA6B) | np.uint32(1)),
                              dtype=jnp.uint32)])


@jax.jit
def _all_sums(leaves: list) -> jax.Array:
    if not leaves:
        return jnp.zeros((0, 2), jnp.uint32)
    return jnp.stack([_leaf_sums(x) for x in leaves])


def state_checksums(state: PyTree) -> dict[str, list[int]]:
    """``{leaf path: [sum1, sum2]}`` of a state (computed on its devices, one transfer)."""
    paths_leaves = jax.tree_util.tree_leaves_with_path(state)
    sums = np.asarray(_host.to_host(_all_sums([x for _, x in paths_leaves])))
    return {_path(p): [int(a), int(b)] for (p, _), (a, b) in zip(paths_leaves, sums,
                                                                  strict=True)}


def meta_checksum(meta: dict) -> str:
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()


class Restored(NamedTuple):
    """What `Checkpointer.restore_good` read: the newest checkpoint that verified."""

    state: PyTree
    meta: dict
    number: int
    skipped: list[dict[str, Any]]  # [{"checkpoint": n, "reason": str}, ...], newest first


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


class _Mismatch(Exception):
    """Read back, but not what was saved (or a part is missing)."""


def _reason(e: Exception) -> str:
    """The first line of an orbax/tensorstore error, shortened."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    text = text.split(" See full TensorStore details")[0]  # a repr of the whole spec follows
    text = text if len(text) <= 160 else text[:157] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


@contextlib.contextmanager
def _quiet_leftovers():
    """Silences the "Exception ignored in <coroutine ...>" lines of a failed orbax read.

    When one array of a checkpoint cannot be read, orbax's other reads in flight are
    abandoned and Python prints each one's error at garbage collection; the failure is
    already reported in one line, so those leftovers are collected here, quietly.
    """
    hook = sys.unraisablehook
    sys.unraisablehook = lambda unraisable: None
    try:
        yield
    finally:
        gc.collect()
        sys.unraisablehook = hook


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
                           "meta": ocp.JsonCheckpointHandler(),
                           "integrity": ocp.JsonCheckpointHandler()},
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
        integrity = {"version": INTEGRITY_VERSION, "state": state_checksums(state),
                     "meta": meta_checksum(meta)}
        self._manager.save(
            number,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta),
                integrity=ocp.args.JsonSave(integrity),
            ),
        )
        if not self.async_save:
            self.wait()
        return number

    def all_numbers(self) -> list[int]:
        """The committed checkpoints' numbers, oldest first."""
        self.wait()
        return sorted(self._manager.all_steps())

    def restore(self, like: PyTree, number: int | None = None) -> tuple[PyTree, dict]:
        """Restores checkpoint `number` (default: the newest good one) into `like`'s structure.

        `like` gives the tree structure, shapes, dtypes and shardings (e.g. a freshly
        initialised state); its values are not used. Without `number` a checkpoint that
        fails verification is skipped for the next older one (see `restore_good`).

        Raises:
          FileNotFoundError: no checkpoint.
          ValueError: the checkpoint was written for another state (one line naming the
            first leaf that differs).
          CorruptCheckpointError: `number` (or, without it, every checkpoint) does not
            read back as saved.
        """
        if number is None:
            restored = self.restore_good(like)
            return restored.state, restored.meta
        self.wait()
        self._check_fits(number, like)
        try:
            return self._restore_verified(number, like)
        except (CorruptCheckpointError, _Mismatch) as e:
            raise CorruptCheckpointError(f"checkpoint {number} in {self.directory}: {e}") \
                from None
        except Exception as e:  # noqa: BLE001  (orbax/tensorstore raise many types)
            raise CorruptCheckpointError(f"checkpoint {number} in {self.directory} cannot "
                                         f"be read: {_reason(e)}") from None

    def restore_good(self, like: PyTree) -> Restored:
        """The newest checkpoint that reads back as saved, skipping (and moving aside)
        newer ones that do not; each skip is logged in one line and returned."""
        numbers = self.all_numbers()
        if not numbers:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        self._check_fits(numbers[-1], like)
        skipped = []
        for number in reversed(numbers):
            try:
                with _quiet_leftovers():
                    state, meta = self._restore_verified(number, like)
            except _Mismatch as e:
                reason = str(e)
            except Exception as e:  # noqa: BLE001  (a file orbax cannot read)
                reason = f"cannot be read: {_reason(e)}"
            else:
                if skipped:
                    self._move_aside([s["checkpoint"] for s in skipped])
                return Restored(state, meta, number, skipped)
            skipped.append({"checkpoint": number, "reason": reason})
            older = [n for n in numbers if n < number]
            log.warning("checkpoint %d in %s is unusable (%s); %s", number, self.directory,
                        reason, f"falling back to checkpoint {older[-1]}" if older
                        else "no older checkpoint")
        raise CorruptCheckpointError(
            f"no usable checkpoint in {self.directory}: "
            + "; ".join(f"{s['checkpoint']} {s['reason']}" for s in skipped)
            + ". Nothing was changed; use another --workdir to start again")

    def _restore_verified(self, number: int, like: PyTree) -> tuple[PyTree, dict]:
        step_dir = os.path.join(self.directory, str(number))
        if not os.path.isdir(os.path.join(step_dir, "state")):
            raise _Mismatch("its state/ folder is missing")
        verify = os.path.isdir(os.path.join(step_dir, "integrity"))
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        items = {"state": ocp.args.StandardRestore(abstract), "meta": ocp.args.JsonRestore()}
        if verify:
            items["integrity"] = ocp.args.JsonRestore()
        restored = self._manager.restore(number, args=ocp.args.Composite(**items))
        if not verify:
            log.warning("checkpoint %d in %s has no checksums (written by an older clax): "
                        "restored without verification", number, self.directory)
            return restored.state, restored.meta
        saved = restored.integrity
        if meta_checksum(restored.meta) != saved.get("meta"):
            raise _Mismatch("its progress metadata (meta/) differs from what was saved")
        now = state_checksums(restored.state)
        for path, sums in saved.get("state", {}).items():
            if now.get(path) != sums:
                raise _Mismatch(f"state leaf {path} differs from what was saved (checksum)")
        return restored.state, restored.meta

    def set_aside_after(self, number: int) -> list[int]:
        """Moves every checkpoint newer than `number` to ``<directory>.set_aside/`` (kept),
        so that the next restore and save continue from `number`; returns their numbers.

        For going back past checkpoints that are readable but bad (parameters that had
        already exploded). Raises ValueError if `number` is not a committed checkpoint.
        """
        numbers = self.all_numbers()
        if number not in numbers:
            raise ValueError(f"resume_from_checkpoint={number}: {self.directory} holds "
                             f"checkpoints {numbers or 'none'}")
        newer = [n for n in numbers if n > number]
        if newer:
            self._move_aside(newer, ".set_aside", "set aside (resume_from_checkpoint)")
        return newer

    def _move_aside(self, numbers: list[int], suffix: str = ".corrupt",
                    why: str = "unusable") -> None:
        """Moves checkpoints to ``<directory><suffix>/`` (process 0; every process reloads)."""
        if distributed.is_main_process():
            aside = self.directory + suffix
            os.makedirs(aside, exist_ok=True)
            for number in numbers:
                target, copy = os.path.join(aside, str(number)), 0
                while os.path.exists(target):  # a number reused after an earlier fallback
                    copy += 1
                    target = os.path.join(aside, f"{number}.{copy}")
                os.replace(os.path.join(self.directory, str(number)), target)
            log.warning("moved %s checkpoint(s) %s to %s (kept)", why,
                        ", ".join(map(str, numbers)), aside)
        distributed.barrier("clax_checkpoints_moved_aside")
        self._manager.reload()

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
