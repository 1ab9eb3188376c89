"""Replay buffers: algorithm R exactly and uniformly, CBRS balance, sampling, bad input."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from scipy import stats

from clax.core import Batch, DataSpec
from clax.replay import (
    balanced_insert,
    init_buffer,
    reservoir_draws,
    reservoir_insert,
    sample,
    stored,
)
from clax.training import data_mesh
from clax.training.checkpoint import Checkpointer

# Jitted once per shape and shared by the tests (eager dispatch is slow on CPU).
_insert = jax.jit(reservoir_insert)
_sample = jax.jit(sample, static_argnums=2)


def _stream(n, shape=(2,), num_classes=4, seed=0):
    """Examples whose input encodes their stream position: x[i] = i (every entry)."""
    rng = np.random.default_rng(seed)
    x = np.broadcast_to(np.arange(n, dtype=np.float32).reshape(-1, *(1,) * len(shape)),
                        (n, *shape)).copy()
    y = rng.integers(0, num_classes, n).astype(np.int32)
    t = (np.arange(n) * 3 // n).astype(np.int32)
    return Batch(x, y, t)


def _reference_reservoir(capacity, items, draws):
    """Algorithm R, one item at a time, with the given draws j_i ~ U{0..i}."""
    slots = [None] * capacity
    for n, (item, j) in enumerate(zip(items, draws, strict=False)):
        if n < capacity:
            slots[n] = item
        elif j < capacity:
            slots[j] = item
    return [s for s in slots if s is not None]


@pytest.mark.parametrize("batch_size", [1, 7, 64])
def test_reservoir_equals_one_at_a_time_algorithm_r(batch_size):
    capacity, n = 10, 64
    data = _stream(n)
    key = jax.random.key(3)
    state = init_buffer(capacity, (2,), num_logits=3)
    insert = jax.jit(reservoir_insert)
    draws = []
    for i, start in enumerate(range(0, n, batch_size)):
        sl = slice(start, start + batch_size)
        k = jax.random.fold_in(key, i)
        b = Batch(*(a[sl] for a in data))
        draws.append(np.asarray(reservoir_draws(k, jnp.arange(start, start + len(b.y)))))
        logits = np.repeat(b.x[:, :1], 3, axis=1)
        state = insert(state, b, k, logits=logits)
    expected = _reference_reservoir(capacity, list(range(n)), np.concatenate(draws))
    got = stored(state)
    np.testing.assert_array_equal(got["x"][:, 0], expected)
    np.testing.assert_array_equal(got["y"], data.y[expected])
    np.testing.assert_array_equal(got["task_ids"], data.task_ids[expected])
    np.testing.assert_array_equal(got["logits"][:, 0], expected)
    assert int(state.seen) == n and int(state.size) == capacity


def test_reservoir_mask_skips_rows():
    data = _stream(6)
    mask = np.array([True, False, True, False, False, True])
    state = _insert(init_buffer(4, (2,)), data, jax.random.key(0), mask=mask)
    assert int(state.seen) == 3 and int(state.size) == 3
    np.testing.assert_array_equal(stored(state)["x"][:, 0], [0, 2, 5])


def _chi_square_p(keep_counts, runs, capacity, n):
    """p-value that every item is kept with probability capacity/n.

    Each run keeps exactly `capacity` items, so the counts are (over runs) a sum of
    fixed-size uniform subsets: Var = runs·p(1-p)·n/(n-1) on an (n-1)-dimensional space.
    """
    p = capacity / n
    expected = runs * p
    stat = np.sum((keep_counts - expected) ** 2) / (runs * p * (1 - p) * n / (n - 1))
    return stats.chi2.sf(stat, df=n - 1)


def _keep_counts(insert_fn, runs, capacity, n, batch_size):
    """How often each of `n` streamed items ends in the buffer, over `runs` keys."""
    steps = -(-n // batch_size)
    pad = steps * batch_size - n
    x = np.arange(steps * batch_size, dtype=np.float32).reshape(steps, batch_size, 1)
    labels = np.zeros((steps, batch_size), np.int32)
    valid = (np.arange(steps * batch_size) < n).reshape(steps, batch_size)
    assert pad < batch_size

    @jax.jit
    def one_run(key):
        def body(state, inputs):
            i, xb, mb = inputs
            b = Batch(xb, labels[0], labels[0])
            return insert_fn(state, b, jax.random.fold_in(key, i), mask=mb), None

        state, _ = jax.lax.scan(body, init_buffer(capacity, (1,)),
                                (jnp.arange(steps), x, valid))
        return jnp.zeros(n, jnp.int32).at[state.x[:, 0].astype(jnp.int32)].add(1)

    keys = jax.random.split(jax.random.key(0), runs)
    return np.asarray(jax.vmap(one_run)(keys).sum(0))


def test_reservoir_is_uniform_chi_square():
    runs, capacity, n = 5000, 10, 50
    counts = _keep_counts(reservoir_insert, runs, capacity, n, batch_size=7)
    assert counts.sum() == runs * capacity
    assert _chi_square_p(counts, runs, capacity, n) > 1e-3


def test_chi_square_bound_rejects_an_off_by_one_reservoir():
    """The same bound fails for the classic bug j ~ U{0..n-1} (keeps late items too often)."""

    def biased(state, batch, key, mask):
        del mask  # batches of one row, all valid
        c = state.y.shape[0]
        n_i = state.seen + jnp.arange(batch.y.shape[0])
        j = jax.random.randint(key, n_i.shape, 0, jnp.maximum(n_i, 1))
        slots = jnp.where(n_i < c, n_i, j)
        x = state.x.at[slots].set(batch.x)  # batches of one row: no duplicate slots
        seen = state.seen + batch.y.shape[0]
        return state._replace(x=x, seen=seen, size=jnp.minimum(seen, c))

    runs, capacity, n = 5000, 10, 50
    counts = _keep_counts(biased, runs, capacity, n, batch_size=1)
    assert _chi_square_p(counts, runs, capacity, n) < 1e-3


def _water_fill(capacity, counts):
    """Max-min fair shares: small groups keep everything, the rest share equally."""
    counts = sorted(counts)
    out, left = [], capacity
    for i, c in enumerate(counts):
        share = left // (len(counts) - i)
        out.append(min(c, share))
        left -= out[-1]
    return sorted(out)


def test_class_balanced_keeps_the_balance():
    capacity = 60
    per_class = {0: 400, 1: 120, 2: 25, 3: 8}
    y = np.concatenate([np.full(n, c) for c, n in per_class.items()]).astype(np.int32)
    y = np.random.default_rng(0).permutation(y)
    n = len(y)
    data = Batch(np.arange(n, dtype=np.float32)[:, None], y, np.zeros(n, np.int32))
    state = init_buffer(capacity, (1,), num_groups=4)
    insert = jax.jit(functools.partial(balanced_insert, by="label"))
    for i, start in enumerate(range(0, n, 32)):
        b = Batch(*(a[start:start + 32] for a in data))
        state = insert(state, b, jax.random.fold_in(jax.random.key(1), i))
    got = stored(state)
    sizes = np.bincount(got["y"], minlength=4)
    np.testing.assert_array_equal(sizes, np.asarray(state.group_size))
    np.testing.assert_array_equal(np.asarray(state.group_seen), [per_class[c] for c in range(4)])
    assert sizes.sum() == capacity
    # The rare class is kept whole; the others share the rest within one slot
    # (max-min fair shares of 60 slots for 400/120/25/8 examples: 18/17/17/8).
    assert sizes[3] == 8
    assert sizes[:3].max() - sizes[:3].min() <= 1
    assert sorted(sizes.tolist()) == _water_fill(capacity, list(per_class.values()))
    # Every stored example is a real stream example with its own label.
    idx = got["x"][:, 0].astype(int)
    assert len(set(idx.tolist())) == capacity
    np.testing.assert_array_equal(got["y"], y[idx])


def test_per_task_buffer_gives_each_seen_task_an_equal_share():
    capacity, per_task = 30, 100
    state = init_buffer(capacity, (1,), num_groups=8)
    insert = jax.jit(functools.partial(balanced_insert, by="task"))
    for task in range(3):
        for i in range(0, per_task, 20):
            x = np.full((20, 1), task, np.float32)
            b = Batch(x, np.zeros(20, np.int32), np.full(20, task, np.int32))
            state = insert(state, b, jax.random.key(100 * task + i))
        sizes = np.bincount(stored(state)["task_ids"], minlength=8)[: task + 1]
        assert sizes.sum() == capacity
        assert sizes.max() - sizes.min() <= 1, (task, sizes)


@pytest.mark.parametrize("insert", [reservoir_insert, balanced_insert])
def test_batch_insert_equals_one_row_at_a_time(insert):
    """Sequential semantics: a batch gives what its rows inserted one by one give."""
    data = _stream(40, shape=(1,), num_classes=3, seed=5)
    mask = np.random.default_rng(1).random(40) < 0.8
    key = jax.random.key(7)
    insert = jax.jit(insert)
    whole = insert(init_buffer(12, (1,), num_groups=3), data, key, mask=mask)
    one = init_buffer(12, (1,), num_groups=3)
    for i in range(40):
        one = insert(one, Batch(*(a[i:i + 1] for a in data)), key, mask=mask[i:i + 1])
    assert int(whole.seen) == mask.sum()
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 whole, one)


def test_sample_returns_only_stored_items_and_respects_where():
    data = _stream(7)
    state = _insert(init_buffer(16, (2,), num_logits=2), data, jax.random.key(0),
                    logits=np.stack([data.x[:, 0]] * 2, 1))
    s = _sample(state, jax.random.key(1), 500)
    idx = np.asarray(s.index)
    assert idx.min() >= 0 and idx.max() < 7
    assert len(set(idx.tolist())) == 7  # 500 draws from 7 slots: all of them appear
    np.testing.assert_array_equal(np.asarray(s.batch.x)[:, 0], idx)
    np.testing.assert_array_equal(np.asarray(s.batch.y), data.y[idx])
    np.testing.assert_array_equal(np.asarray(s.logits)[:, 1], idx)
    assert float(s.weight) == 1.0
    where = np.asarray(state.task_ids) == 2  # only slots whose task id is 2
    s = _sample(state, jax.random.key(2), 200, where=where)
    assert set(np.asarray(s.index).tolist()) == set(np.flatnonzero(where[:7]).tolist())


def test_sampling_an_empty_buffer():
    state = init_buffer(4, (2,))
    with pytest.raises(ValueError, match="buffer is empty"):
        sample(state, jax.random.key(0), 3)
    s = _sample(state, jax.random.key(0), 3)  # inside jit: no error, weight 0
    assert float(s.weight) == 0.0 and s.batch.x.shape == (3, 2)
    full = _insert(state, _stream(2), jax.random.key(0))
    with pytest.raises(ValueError, match="no filled slot matches"):
        sample(full, jax.random.key(0), 3, where=np.zeros(4, bool))
    assert float(sample(full, jax.random.key(0), 3, where=np.zeros(4, bool),
                        allow_empty=True).weight) == 0.0


@pytest.mark.parametrize("capacity,error", [(0, ValueError), (-1, ValueError),
                                            (2.5, TypeError), (True, TypeError)])
def test_bad_capacity(capacity, error):
    # clax._validation: a value of the wrong type is a TypeError, out of range a ValueError.
    with pytest.raises(error, match="capacity must be a positive int"):
        init_buffer(capacity, (2,))


def test_shape_mismatches_are_named():
    state = init_buffer(4, (2,))
    with pytest.raises(ValueError, match=r"batch.x has shape \(3, 5\).*\(2,\)"):
        reservoir_insert(state, Batch(np.zeros((3, 5)), np.zeros(3, np.int32),
                                      np.zeros(3, np.int32)), jax.random.key(0))
    with pytest.raises(ValueError, match="task_ids"):
        reservoir_insert(state, Batch(np.zeros((3, 2)), np.zeros(3, np.int32),
                                      np.zeros(2, np.int32)), jax.random.key(0))
    with pytest.raises(ValueError, match="stores none"):
        reservoir_insert(state, _stream(3), jax.random.key(0), logits=np.zeros((3, 2)))
    with_logits = init_buffer(4, (2,), num_logits=5)
    with pytest.raises(ValueError, match="pass logits"):
        reservoir_insert(with_logits, _stream(3), jax.random.key(0))
    with pytest.raises(ValueError, match=r"logits must have shape \(3, 5\)"):
        reservoir_insert(with_logits, _stream(3), jax.random.key(0), logits=np.zeros((3, 4)))
    with pytest.raises(ValueError, match="num_groups"):
        balanced_insert(state, _stream(3), jax.random.key(0))
    with pytest.raises(ValueError, match="where must be"):
        sample(state._replace(size=jnp.ones((), jnp.int32)), jax.random.key(0), 2,
               where=np.ones(3, bool))


def test_sharded_batch_equals_single_device():
    mesh = data_mesh(8)
    data = _stream(64)
    state = init_buffer(24, (2,), num_groups=4)
    sharded = jax.device_put(data, NamedSharding(mesh, P("data")))
    replicated = jax.device_put(state, NamedSharding(mesh, P()))

    @jax.jit
    def both(state, batch):
        a = reservoir_insert(state, batch, jax.random.key(0))
        b = balanced_insert(state, batch, jax.random.key(1))
        return a, b

    one = jax.device_put(state, jax.devices()[0]), jax.device_put(data, jax.devices()[0])
    got = both(replicated, sharded)
    want = both(*one)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 got, want)


def test_orbax_round_trip(tmp_path):
    for state in (init_buffer(5, (2,)), init_buffer(5, (2,), num_logits=3, num_groups=2)):
        logits = None if state.logits is None else np.ones((3, 3), np.float32)
        state = _insert(state, _stream(3), jax.random.key(0), logits=logits)
        ckpt = Checkpointer(str(tmp_path / f"c{state.logits is None}"))
        ckpt.save(state, {})
        restored, _ = ckpt.restore(state)
        ckpt.close()
        assert jax.tree.structure(restored) == jax.tree.structure(state)
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                     restored, state)


# ------------------------------------------------------------------ any example pytree

L, V = 6, 11
_SDS = jax.ShapeDtypeStruct
# A language model's example: token ids (L,) and next-token targets (L,), logits (L, V).
_TOKENS = Batch(x=_SDS((L,), jnp.int32), y=_SDS((L,), jnp.int32), task_ids=_SDS((), jnp.int32))
_LOGITS = _SDS((L, V), jnp.float32)


def _token_stream(n, seed=0, num_tasks=2):
    """Token sequences whose first token is the stream position; targets -1 at the end."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, V, (n, L)).astype(np.int32)
    x[:, 0] = np.arange(n)
    y = np.concatenate([x[:, 1:], np.full((n, 1), -1, np.int32)], axis=1)
    t = (np.arange(n) * num_tasks // n).astype(np.int32)
    return Batch(x, y, t)


def _rows(data, sl):
    return Batch(*(a[sl] for a in data))


def test_token_buffer_layout():
    state = init_buffer(8, example=_TOKENS, outputs=_LOGITS, num_groups=2)
    layout = {k: (v.shape, v.dtype) for k, v in state._asdict().items() if v is not None}
    assert layout["x"] == ((8, L), jnp.int32) and layout["y"] == ((8, L), jnp.int32)
    assert layout["task_ids"] == ((8,), jnp.int32)
    assert layout["logits"] == ((8, L, V), jnp.float32)


def test_token_sequences_are_stored_and_sampled_exactly():
    data = _token_stream(10)
    z = np.random.default_rng(1).normal(size=(10, L, V)).astype(np.float32)
    state = init_buffer(16, example=_TOKENS, outputs=_LOGITS)
    state = _insert(state, _rows(data, slice(0, 4)), jax.random.key(0), logits=z[:4])
    state = _insert(state, _rows(data, slice(4, 10)), jax.random.key(1), logits=z[4:])
    got = stored(state)
    # Under capacity, algorithm R fills the slots in stream order.
    assert got["x"].dtype == np.int32 and got["y"].dtype == np.int32
    np.testing.assert_array_equal(got["x"], data.x)
    np.testing.assert_array_equal(got["y"], data.y)  # the -1 "no loss" targets included
    np.testing.assert_array_equal(got["task_ids"], data.task_ids)
    np.testing.assert_array_equal(got["logits"], z)
    s = _sample(state, jax.random.key(2), 64)
    idx = np.asarray(s.index)
    assert s.batch.x.dtype == jnp.int32 and s.batch.y.shape == (64, L)
    np.testing.assert_array_equal(np.asarray(s.batch.x), data.x[idx])
    np.testing.assert_array_equal(np.asarray(s.batch.y), data.y[idx])
    np.testing.assert_array_equal(np.asarray(s.batch.task_ids), data.task_ids[idx])
    np.testing.assert_array_equal(np.asarray(s.logits), z[idx])


@pytest.mark.parametrize("by", [None, "task"])
def test_token_insert_past_capacity_keeps_whole_rows(by):
    """Past capacity, the batch insert equals row-at-a-time insertion, and every slot holds
    one stream example whole (inputs, targets, task id and outputs of the same row)."""
    n = 24
    data = _token_stream(n, num_tasks=3)
    z = np.broadcast_to(np.arange(n, dtype=np.float32)[:, None, None], (n, L, V)).copy()
    if by is None:
        insert = jax.jit(reservoir_insert)
    else:
        insert = jax.jit(functools.partial(balanced_insert, by=by))
    empty = init_buffer(5, example=_TOKENS, outputs=_LOGITS, num_groups=3)
    key = jax.random.key(4)
    whole = insert(empty, data, key, logits=z)
    one = empty
    for i in range(n):
        one = insert(one, _rows(data, slice(i, i + 1)), key, logits=z[i:i + 1])
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 whole, one)
    got = stored(whole)
    pos = got["x"][:, 0]
    assert len(set(pos.tolist())) == 5
    np.testing.assert_array_equal(got["x"], data.x[pos])
    np.testing.assert_array_equal(got["y"], data.y[pos])
    np.testing.assert_array_equal(got["task_ids"], data.task_ids[pos])
    np.testing.assert_array_equal(got["logits"][:, 0, 0], pos)
    if by == "task":  # three tasks of 8 examples share 5 slots within one
        sizes = np.bincount(got["task_ids"], minlength=3)
        assert sizes.max() - sizes.min() <= 1


def test_balanced_by_label_needs_scalar_int_labels():
    state = init_buffer(6, example=_TOKENS, num_groups=2)
    with pytest.raises(ValueError, match=r"by='label' needs scalar int labels.*by='task'"):
        balanced_insert(state, _token_stream(3), jax.random.key(0), by="label")
    float_labels = init_buffer(6, example=_TOKENS._replace(y=_SDS((), jnp.float32)),
                               num_groups=2)
    with pytest.raises(ValueError, match="scalar int labels"):
        balanced_insert(float_labels, Batch(np.zeros((3, L), np.int32), np.zeros(3, np.float32),
                                            np.zeros(3, np.int32)), jax.random.key(0))


def test_pytree_inputs_and_named_mismatches():
    example = Batch(x={"image": _SDS((2, 2), jnp.float32), "length": _SDS((), jnp.int32)},
                    y=_SDS((), jnp.int32), task_ids=_SDS((), jnp.int32))
    state = init_buffer(4, example=example)
    x = {"image": np.arange(12, dtype=np.float32).reshape(3, 2, 2),
         "length": np.array([5, 6, 7], np.int32)}
    state = _insert(state, Batch(x, np.array([0, 1, 2], np.int32), np.zeros(3, np.int32)),
                    jax.random.key(0))
    got = stored(state)
    np.testing.assert_array_equal(got["x"]["image"], x["image"])
    np.testing.assert_array_equal(got["x"]["length"], x["length"])
    s = sample(state, jax.random.key(1), 5)
    idx = np.asarray(s.index)
    np.testing.assert_array_equal(np.asarray(s.batch.x["image"]), x["image"][idx])
    np.testing.assert_array_equal(np.asarray(s.batch.x["length"]), x["length"][idx])
    y, t = np.zeros(3, np.int32), np.zeros(3, np.int32)
    with pytest.raises(ValueError, match="batch.x must have the structure"):
        reservoir_insert(state, Batch({"image": x["image"]}, y, t), jax.random.key(0))
    with pytest.raises(ValueError, match=r"batch.x\['image'\] has shape \(3, 4\).*\(3, 2, 2\)"):
        reservoir_insert(state, Batch({**x, "image": np.zeros((3, 4))}, y, t),
                         jax.random.key(0))


def test_shorthand_and_spec_call_forms_agree():
    spec = DataSpec.for_classifier((2,), 3)
    shorthand = init_buffer(5, (2,), num_logits=3, num_groups=2)
    from_spec = init_buffer(5, example=spec.example, outputs=spec.output, num_groups=2)
    def layout(s):
        return jax.tree.map(lambda a: (a.shape, a.dtype), s)
    assert layout(shorthand) == layout(from_spec)
    assert init_buffer(5, (2,), input_dtype=jnp.uint8).x.dtype == jnp.uint8


@pytest.mark.parametrize("kwargs,error,match", [
    ({}, ValueError, "needs input_shape"),
    ({"input_shape": (2,), "example": _TOKENS}, ValueError, "not both"),
    ({"example": _TOKENS, "num_logits": 3}, ValueError, "not both"),
    ({"input_shape": (2,), "num_logits": 3, "outputs": _LOGITS}, ValueError,
     "num_logits or outputs"),
    ({"input_shape": (2, -1)}, ValueError, "input_shape must be"),
    ({"example": (1, 2, 3)}, TypeError, "example must be a clax.core.Batch"),
    ({"example": _TOKENS._replace(x=[5])}, TypeError,
     r"example.x\[0\] must be a jax.ShapeDtypeStruct"),
    ({"example": _TOKENS._replace(task_ids=_SDS((2,), jnp.int32))}, ValueError,
     "example.task_ids must be a scalar int"),
    ({"example": _TOKENS, "outputs": 3}, TypeError, "outputs must be a jax.ShapeDtypeStruct"),
])
def test_init_buffer_argument_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        init_buffer(4, **kwargs)


def test_token_buffer_orbax_round_trip(tmp_path):
    state = init_buffer(5, example=_TOKENS, outputs=_LOGITS, num_groups=2)
    state = _insert(state, _token_stream(3), jax.random.key(0),
                    logits=np.ones((3, L, V), np.float32))
    ckpt = Checkpointer(str(tmp_path / "tokens"))
    ckpt.save(state, {})
    restored, _ = ckpt.restore(state)
    ckpt.close()
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 restored, state)


@pytest.mark.parametrize("jit", [False, True])
def test_float_values_for_integer_fields_are_refused(jit):
    # Float labels used to be cast silently into the int32 label field (1.7 -> 1), float
    # task ids too; the dtype is known at trace time, so jit refuses them as well.
    state = init_buffer(4, (2,))
    insert = jax.jit(reservoir_insert) if jit else reservoir_insert
    x, t = np.zeros((3, 2), np.float32), np.zeros(3, np.int32)
    with pytest.raises(TypeError, match=r"^batch.y has dtype float32, but this buffer "
                                        r"stores it as int32"):
        insert(state, Batch(x, np.array([0.0, 1.7, 2.0], np.float32), t), jax.random.key(0))
    with pytest.raises(TypeError, match=r"^batch.task_ids has dtype float(32|64).*as int32"):
        insert(state, Batch(x, np.zeros(3, np.int32), np.zeros(3)), jax.random.key(0))
    tokens = init_buffer(4, example=Batch(x={"ids": _SDS((2,), jnp.int32)}, y=_SDS((), jnp.int32),
                                          task_ids=_SDS((), jnp.int32)), num_groups=2)
    with pytest.raises(TypeError, match=r"^batch.x\['ids'\] has dtype float32"):
        balanced_insert(tokens, Batch({"ids": x}, np.zeros(3, np.int32), t), jax.random.key(0),
                        by="task")


def test_integer_values_that_do_not_fit_the_field_are_refused():
    # int8 storage receiving 300 used to wrap to 44; in-range values of a wider dtype (numpy
    # int64) and bools are still accepted.
    example = Batch(x=_SDS((2,), jnp.float32), y=_SDS((), jnp.int8), task_ids=_SDS((), jnp.int32))
    state = init_buffer(4, example=example)
    x, t = np.zeros((2, 2), np.float32), np.zeros(2, np.int32)
    with pytest.raises(ValueError, match=r"^batch.y has values in \[1, 300\], outside the range "
                                         r"\[-128, 127\] of the buffer's int8 storage"):
        reservoir_insert(state, Batch(x, np.array([1, 300]), t), jax.random.key(0))
    with pytest.raises(ValueError, match=r"batch.y has values in \[-200, 3\]"):
        reservoir_insert(state, Batch(x, jnp.array([-200, 3]), t), jax.random.key(0))
    with pytest.raises(ValueError, match=r"^batch.task_ids has values in \[0, 4294967296\]"):
        reservoir_insert(state, Batch(x, np.array([1, 2]), np.array([0, 2**32])),
                         jax.random.key(0))
    state = reservoir_insert(state, Batch(x, np.array([-128, 127]), np.array([True, False])),
                             jax.random.key(0))
    np.testing.assert_array_equal(stored(state)["y"], [-128, 127])
    assert stored(state)["y"].dtype == np.int8
