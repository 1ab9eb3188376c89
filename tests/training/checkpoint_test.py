"""Checkpoint integrity: checksums at save, verified at restore, fallback past corruption."""

import logging
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from clax.training import CorruptCheckpointError
from clax.training.checkpoint import Checkpointer, state_checksums
from experiments.faults import corrupt


def _state(offset=0.0):
    rng = np.random.default_rng(0)
    return {"w": jnp.asarray(rng.normal(size=(32, 48)) + offset, jnp.float32),
            "h": jnp.asarray(rng.normal(size=(16,)), jnp.bfloat16),
            "n": jnp.arange(5, dtype=jnp.int32), "key": jax.random.key(3),
            "mask": jnp.asarray([True, False, True])}


@pytest.mark.parametrize("kind", ["truncate", "random", "flip", "delete_state", "delete_meta"])
def test_a_corrupt_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, kind, caplog):
    directory = str(tmp_path / "checkpoints")
    ckpt = Checkpointer(directory, max_to_keep=3)
    ckpt.save(_state(), {"task": 1})
    ckpt.save(_state(1.0), {"task": 2})
    ckpt.close()
    corrupt(os.path.join(directory, "1"), kind)
    ckpt = Checkpointer(directory, max_to_keep=3)
    with caplog.at_level(logging.WARNING, logger="clax"):
        restored = ckpt.restore_good(_state())
    assert restored.number == 0 and restored.meta == {"task": 1}
    assert [s["checkpoint"] for s in restored.skipped] == [1]
    assert state_checksums(restored.state) == state_checksums(_state())
    np.testing.assert_array_equal(restored.state["w"], _state()["w"])
    lines = [r.getMessage() for r in caplog.records]
    assert any(m.startswith(f"checkpoint 1 in {directory} is unusable") and
               "falling back to checkpoint 0" in m and "\n" not in m for m in lines), lines
    # Moved aside, not deleted; the next save follows the good one.
    assert os.path.isdir(directory + ".corrupt/1") and ckpt.all_numbers() == [0]
    assert ckpt.save(_state(2.0), {"task": 3}) == 1
    ckpt.close()


def test_an_explicit_number_is_verified_and_no_good_checkpoint_is_one_line(tmp_path):
    directory = str(tmp_path / "checkpoints")
    ckpt = Checkpointer(directory)
    ckpt.save(_state(), {"task": 1})
    ckpt.close()
    corrupt(os.path.join(directory, "0"), "flip")
    ckpt = Checkpointer(directory)
    with pytest.raises(CorruptCheckpointError, match=r"checkpoint 0 .*: state leaf w differs"):
        ckpt.restore(_state(), 0)
    with pytest.raises(CorruptCheckpointError, match=r"no usable checkpoint in .*: 0 state leaf w "
                                                     r"differs.*Nothing was changed") as e:
        ckpt.restore(_state())
    assert "\n" not in str(e.value)
    assert ckpt.all_numbers() == [0] and not os.path.exists(directory + ".corrupt")


def test_checkpoints_without_checksums_restore_with_a_warning(tmp_path, caplog):
    directory = str(tmp_path / "checkpoints")
    ckpt = Checkpointer(directory)
    ckpt.save(_state(), {"task": 1})
    ckpt.close()
    shutil.rmtree(os.path.join(directory, "0", "integrity"))  # as an older clax wrote them
    with caplog.at_level(logging.WARNING, logger="clax"):
        state, meta = Checkpointer(directory).restore(_state())
    assert meta == {"task": 1} and "without verification" in caplog.text
    np.testing.assert_array_equal(state["w"], _state()["w"])


@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16, np.int8, np.uint16, np.bool_])
def test_every_single_byte_change_changes_both_sums(dtype):
    rng = np.random.default_rng(0)
    x = np.asarray(rng.normal(size=(7, 9)) * 50).astype(dtype)
    if dtype == np.bool_:
        x = rng.random((7, 9)) > 0.5
    base = state_checksums({"x": jnp.asarray(x)})["x"]
    raw = x.view(np.uint8).reshape(-1)
    for position in rng.choice(raw.size, 20, replace=False):
        for delta in (1, 0x80, int(rng.integers(1, 256))):
            changed = raw.copy()
            changed[position] ^= delta
            y = changed.view(x.dtype).reshape(x.shape)
            if dtype == np.bool_:
                y = changed.astype(bool).reshape(x.shape)  # bools are 0/1 bytes
                if np.array_equal(y, x):
                    continue
            sums = state_checksums({"x": jnp.asarray(y)})["x"]
            assert sums[0] != base[0] and sums[1] != base[1], (position, delta)
    # A permutation of the same values changes the sums (positions are weighted).
    assert state_checksums({"x": jnp.asarray(x[::-1])})["x"] != base


def test_checksums_do_not_depend_on_the_sharding():
    mesh = jax.make_mesh((4, 2), ("a", "b"))
    state = _state()
    sharded = {**state, "w": jax.device_put(state["w"], NamedSharding(mesh, P("a", "b")))}
    assert len(sharded["w"].sharding.device_set) == 8
    assert state_checksums(sharded) == state_checksums(state)
