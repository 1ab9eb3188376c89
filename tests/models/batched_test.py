"""Padded batched inference (clax/models/batched.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clax.models.batched import batched_apply, padded_batches


def test_padded_batches_pad_the_last_batch_with_its_last_row():
    x = np.arange(10).reshape(5, 2)
    out = list(padded_batches({"x": x, "y": np.arange(5)}, batch_size=2))
    assert [n for _, n in out] == [2, 2, 1]
    assert all(b["x"].shape == (2, 2) and b["y"].shape == (2,) for b, _ in out)
    np.testing.assert_array_equal(out[-1][0]["x"], [[8, 9], [8, 9]])
    np.testing.assert_array_equal(out[-1][0]["y"], [4, 4])


def test_batched_apply_matches_one_call_and_compiles_once():
    traces = []

    @jax.jit
    def fn(batch):
        traces.append(batch["x"].shape)
        h = batch["x"] @ jnp.ones((3, 4)) + batch["t"][:, None]
        return {"h": h, "s": h.sum(1)}

    rng = np.random.default_rng(0)
    x = {"x": rng.normal(size=(7, 3)).astype(np.float32), "t": np.arange(7, dtype=np.float32)}
    out = batched_apply(fn, x, batch_size=3)  # batches of 3, 3, 1 (padded to 3)
    want = {"h": x["x"] @ np.ones((3, 4)) + x["t"][:, None]}
    assert isinstance(out["h"], np.ndarray) and out["h"].shape == (7, 4)
    np.testing.assert_allclose(out["h"], want["h"], rtol=1e-5)
    np.testing.assert_allclose(out["s"], want["h"].sum(1), rtol=1e-5)
    assert traces == [(3, 3)]  # one shape for every batch
    batched_apply(fn, {k: v[:2] for k, v in x.items()}, batch_size=3)
    assert traces == [(3, 3)]  # fewer rows than a batch: padded too, no new compile


def test_batched_apply_single_array_and_empty_input():
    fn = jax.jit(lambda a: 2 * a[:, :1])
    np.testing.assert_array_equal(batched_apply(fn, np.arange(6.0).reshape(3, 2), batch_size=8),
                                  [[0.0], [4.0], [8.0]])
    empty = batched_apply(fn, np.zeros((0, 2), np.float32), batch_size=4)
    assert empty.shape == (0, 1) and empty.dtype == np.float32


def test_batched_apply_checks():
    fn = jax.jit(lambda a: a)
    with pytest.raises(TypeError, match=r"batch_size must be a positive int, got 2.0 \(float\)"):
        batched_apply(fn, np.zeros((3, 2)), batch_size=2.0)
    with pytest.raises(ValueError, match="batch_size must be a positive int, got 0"):
        batched_apply(fn, np.zeros((3, 2)), batch_size=0)
    with pytest.raises(ValueError, match="same leading"):
        batched_apply(fn, (np.zeros((3, 2)), np.zeros((4,))), batch_size=2)
    with pytest.raises(ValueError, match="fn must return arrays with 2 rows"):
        batched_apply(jax.jit(lambda a: a[:1]), np.zeros((3, 2)), batch_size=2)
