"""The grain host pipeline: exact batches, process shares, resumable state, the host-fed loop."""

import dataclasses
import json
import os
import threading

import jax
import numpy as np
import pytest

from clax.data import pipeline
from clax.data.text import language_modeling_arrays, pack_tokens
from clax.training import feed, loop, train_continual
from clax.training.checkpoint import Checkpointer
from clax.training.config import validate_config
from tests.training.helpers import tiny_config, tiny_scenario


def _arrays(n=50, seed=0):
    rng = np.random.default_rng(seed)
    x = {"image": rng.normal(size=(n, 3, 2)).astype(np.float32),
         "extra": rng.integers(0, 9, (n, 4)).astype(np.int16)}
    y = rng.integers(0, 5, n).astype(np.int32)
    return x, y, rng.integers(0, 3, n).astype(np.int32)


def _index_batches(n=50, batch_size=8, epoch=0):
    return feed.epoch_index_batches(n, batch_size, seed=3, task_index=1, epoch=epoch)


def _assert_batches(batches, x, y, task_ids, idx):
    batches = list(batches)
    assert len(batches) == len(idx)
    for b, rows in zip(batches, idx, strict=True):
        jax.tree.map(np.testing.assert_array_equal, b.x, jax.tree.map(lambda a, r=rows: a[r], x))
        np.testing.assert_array_equal(b.y, y[rows])
        np.testing.assert_array_equal(b.task_ids, task_ids[rows])
        assert b.y.dtype == y.dtype and b.x["extra"].dtype == np.int16


class _Counting(pipeline.ArraySource):
    """Records every example index it is asked to read."""

    def __init__(self, *args):
        super().__init__(*args)
        self.read, self._lock = [], threading.Lock()

    def gather(self, indices):
        with self._lock:
            self.read.extend(int(i) for i in indices)
        return super().gather(indices)


@pytest.mark.parametrize("prefetch", [0, 1, 3])
def test_in_memory_source_yields_each_row_in_order(prefetch):
    x, y, t = _arrays()
    idx = _index_batches()
    it = pipeline.batch_iterator(pipeline.ArraySource(x, y, t), idx, prefetch=prefetch)
    _assert_batches(it, x, y, t, idx)


def test_npy_source_is_memory_mapped_and_exact(tmp_path):
    x, y, t = _arrays()
    paths = {}
    for name, a in (("image", x["image"]), ("extra", x["extra"]), ("y", y), ("t", t)):
        paths[name] = str(tmp_path / f"{name}.npy")
        np.save(paths[name], a)
    source = pipeline.NpySource({"image": paths["image"], "extra": paths["extra"]},
                                paths["y"], paths["t"])
    assert isinstance(source.x["image"], np.memmap) and len(source) == 50
    idx = _index_batches()
    _assert_batches(pipeline.batch_iterator(source, idx), x, y, t, idx)
    one = source[7]  # grain's random-access protocol: one example, no batch axis
    np.testing.assert_array_equal(one.x["image"], x["image"][7])
    assert int(one.y) == y[7] and int(one.task_ids) == t[7]
    # A constant task id, and the source read by grain directly.
    const = pipeline.NpySource(paths["image"], paths["y"], task_ids=2)
    import grain
    assert [int(e.task_ids) for e in grain.MapDataset.source(const)[:3]] == [2, 2, 2]


def test_token_source_cuts_the_rows_of_pack_tokens(tmp_path):
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 1000, 203)
    seq_len = 8
    x, y = language_modeling_arrays(pack_tokens(ids, seq_len))  # the in-memory reference
    idx = feed.epoch_index_batches(len(x), 4, seed=0, task_index=0, epoch=0)
    np.save(tmp_path / "tokens.npy", ids.astype(np.uint16))
    for source in (pipeline.TokenSource(ids, seq_len),
                   pipeline.TokenSource(str(tmp_path / "tokens.npy"), seq_len, task_id=3),
                   pipeline.TokenSource(pack_tokens(ids, seq_len))):  # 2-D packed rows
        assert len(source) == len(x)
        for b, rows in zip(pipeline.batch_iterator(source, idx), idx, strict=True):
            np.testing.assert_array_equal(b.x, x[rows])
            np.testing.assert_array_equal(b.y, y[rows])
            assert b.x.dtype == b.y.dtype == np.int32
            assert (b.task_ids == source.task_id).all()
    # A loss mask turns the masked targets into -1 (no loss).
    mask = rng.random(len(ids)) > 0.3
    masked_y = language_modeling_arrays(pack_tokens(np.where(mask, ids, -1), seq_len))[1]
    masked = pipeline.TokenSource(ids, seq_len, loss_mask=mask)
    for b, rows in zip(pipeline.batch_iterator(masked, idx), idx, strict=True):
        np.testing.assert_array_equal(b.y, masked_y[rows])
        np.testing.assert_array_equal(b.x, x[rows])


def test_two_processes_each_read_only_their_share():
    x, y, t = _arrays()
    idx = _index_batches(batch_size=8)
    sources = [_Counting(x, y, t) for _ in range(2)]
    shares = [list(pipeline.batch_iterator(s, idx, process_index=p, process_count=2))
              for p, s in enumerate(sources)]
    for k, rows in enumerate(idx):
        for p in range(2):
            np.testing.assert_array_equal(shares[p][k].y, y[rows[4 * p:4 * p + 4]])
        whole = jax.tree.map(lambda a, b: np.concatenate([a, b]), shares[0][k], shares[1][k])
        np.testing.assert_array_equal(whole.x["image"], x["image"][rows])
        np.testing.assert_array_equal(whole.task_ids, t[rows])
    # Every example of the epoch is read once in total, by exactly one process.
    assert sorted(sources[0].read + sources[1].read) == sorted(idx.reshape(-1).tolist())
    assert set(sources[0].read) == set(idx[:, :4].reshape(-1).tolist())


def test_state_round_trips_through_json_and_resumes_without_reading_the_past():
    x, y, t = _arrays(n=200)
    idx = _index_batches(n=200, batch_size=8)  # 25 batches
    at = int(np.random.default_rng(0).integers(1, len(idx)))
    first = pipeline.batch_iterator(pipeline.ArraySource(x, y, t), idx, prefetch=3)
    for _ in range(at):
        next(first)
    state = json.loads(json.dumps(first.get_state()))
    assert state == {"next_index": at}
    rest = list(first)

    source = _Counting(x, y, t)
    resumed = pipeline.batch_iterator(source, idx, prefetch=3)
    resumed.set_state(state)
    again = list(resumed)
    assert len(again) == len(rest) == len(idx) - at
    for a, b in zip(again, rest, strict=True):
        jax.tree.map(np.testing.assert_array_equal, a, b)
    assert sorted(source.read) == sorted(idx[at:].reshape(-1).tolist())  # nothing skipped read


def test_host_fed_loop_equals_device_resident_bit_for_bit():
    scenario = tiny_scenario()
    runs = [train_continual(tiny_config(device_resident=d, prefetch=p), scenario=scenario,
                            keep_state=True) for d, p in ((True, 2), (False, 2), (False, 0))]
    for other in runs[1:]:
        np.testing.assert_array_equal(other.accuracy_matrix, runs[0].accuracy_matrix)
        jax.tree.map(np.testing.assert_array_equal, other.state.params, runs[0].state.params)
        jax.tree.map(np.testing.assert_array_equal, other.state.opt_state,
                     runs[0].state.opt_state)


def test_host_fed_run_resumed_mid_epoch_is_bit_identical(tmp_path, monkeypatch):
    scenario = tiny_scenario()
    config = tiny_config(device_resident=False, checkpoint_every_steps=4, epochs_per_task=3)
    reads = {"n": 0}
    real_gather = pipeline.ArraySource.gather

    def counted(self, indices):
        reads["n"] += 1
        return real_gather(self, indices)

    monkeypatch.setattr(pipeline.ArraySource, "gather", counted)
    reference = train_continual(config, scenario=scenario, keep_state=True)
    reference_reads, reads["n"] = reads["n"], 0

    workdir = str(tmp_path / "run")
    real_chunk = loop._train_chunk
    chunks = {"n": 0}

    def killed(*args, **kwargs):  # the process dies after a mid-epoch checkpoint of task 1
        chunks["n"] += args[5] == 1
        if chunks["n"] == 3:
            raise KeyboardInterrupt("simulated kill")
        return real_chunk(*args, **kwargs)

    monkeypatch.setattr(loop, "_train_chunk", killed)
    with pytest.raises(KeyboardInterrupt):
        train_continual(config, workdir, scenario=scenario)
    monkeypatch.setattr(loop, "_train_chunk", real_chunk)
    _, meta = Checkpointer(os.path.join(workdir, "checkpoints")).restore(reference.state)
    assert (meta["task"], meta["epoch"]) == (1, 0) and meta["step_in_epoch"] > 0  # mid-epoch
    resumed = train_continual(config, workdir, scenario=scenario, keep_state=True)

    np.testing.assert_array_equal(resumed.accuracy_matrix, reference.accuracy_matrix)
    for part in ("params", "opt_state"):
        jax.tree.map(np.testing.assert_array_equal, getattr(resumed.state, part),
                     getattr(reference.state, part))
    # Killed + resumed read exactly the reference's batches: none read twice or skipped.
    assert reads["n"] == reference_reads


def test_host_fed_run_on_memory_mapped_tasks_equals_the_in_memory_run(tmp_path):
    scenario = tiny_scenario()
    tasks = []
    for task in scenario.tasks:  # each task's training arrays only on disk, memory-mapped
        np.save(tmp_path / f"x{task.id}.npy", task.x_train)
        np.save(tmp_path / f"y{task.id}.npy", task.y_train)
        source = pipeline.NpySource(str(tmp_path / f"x{task.id}.npy"),
                                    str(tmp_path / f"y{task.id}.npy"))
        tasks.append(task._replace(x_train=source.x, y_train=source.y))
    on_disk = dataclasses.replace(scenario, tasks=tuple(tasks))
    assert isinstance(on_disk.tasks[0].x_train, np.memmap)
    a = train_continual(tiny_config(), scenario=scenario, keep_state=True)
    b = train_continual(tiny_config(device_resident=False), scenario=on_disk, keep_state=True)
    np.testing.assert_array_equal(a.accuracy_matrix, b.accuracy_matrix)
    jax.tree.map(np.testing.assert_array_equal, a.state.params, b.state.params)


def test_changing_prefetch_still_resumes(tmp_path):
    scenario = tiny_scenario()
    workdir = str(tmp_path / "run")
    c = tiny_config(device_resident=False, epochs_per_task=1)
    train_continual(c, workdir, scenario=scenario)
    c.train.prefetch = 0  # operational: not a different run
    train_continual(c, workdir, scenario=scenario)


def test_bad_input_names_the_argument(tmp_path):
    x, y, t = _arrays(n=20)
    source = pipeline.ArraySource(x, y, t)
    with pytest.raises(ValueError, match="example index 23 but the source has 20 examples"):
        pipeline.batch_iterator(source, np.arange(24).reshape(3, 8))
    with pytest.raises(ValueError, match=r"batch size 6, not divisible by process_count=4"):
        pipeline.batch_iterator(source, np.arange(12).reshape(2, 6), process_count=4)
    with pytest.raises(ValueError, match="process_index must be an int in"):
        pipeline.batch_iterator(source, np.arange(8).reshape(1, 8), process_index=2,
                                process_count=2)
    with pytest.raises(ValueError, match=r"index_batches must be \(steps, batch_size\) ints"):
        pipeline.batch_iterator(source, np.arange(8))
    missing = str(tmp_path / "nope.npy")
    with pytest.raises(ValueError, match=r"NpySource x file '.*nope.npy' does not exist"):
        pipeline.NpySource(missing, missing)
    with pytest.raises(ValueError, match=r"TokenSource tokens file '.*nope.npy' does not exist"):
        pipeline.TokenSource(missing, 4)
    with pytest.raises(ValueError, match="prefetch must be a non-negative int"):
        pipeline.batch_iterator(source, np.arange(8).reshape(1, 8), prefetch=-1)
    with pytest.raises(ValueError, match="x has 20 examples but y has 3"):
        pipeline.ArraySource(x, y[:3])
    c = tiny_config(prefetch=-1)
    with pytest.raises(ValueError, match="config.train.prefetch must be a non-negative int"):
        validate_config(c)
