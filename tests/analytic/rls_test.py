"""ACIL / G-ACIL / ACU recursive least squares against plain numpy ridge regression."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clax.analytic import rls
from tests.precision import U32, assert_relative_error, assert_within, ridge_rtol, ridge_system


def assert_ridge(weights, x, labels, num_classes, gamma, updates=1):
    """Float32 weights against float64 ridge on the same inputs: relative error within
    ``updates · κ(A)·√(n + d)·u`` (tests/precision.py)."""
    want = ridge(x, labels, num_classes, gamma)
    rtol = ridge_rtol(x, gamma, updates=updates)
    assert_relative_error(weights, want, rtol, "weights against ridge")


def ridge(x, labels, num_classes, gamma):
    """The reference: W = (XᵀX + γI)⁻¹ XᵀY in float64 numpy (Y one-hot, C columns)."""
    x = np.asarray(x, np.float64)
    y = np.eye(num_classes)[np.asarray(labels)] if len(labels) else np.zeros((0, num_classes))
    return np.linalg.solve(x.T @ x + gamma * np.eye(x.shape[1]), x.T @ y)


def data(n, d, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)).astype(np.float32)


def random_program(seed, n=240, d=10, num_classes=7, steps=14):
    """A shuffled sequence of learn/unlearn calls whose classes appear over time.

    Labels come from a range that grows with the example index (classes 0-1 first, later
    all 7), batches mix old and new classes (G-ACIL), and each unlearn call removes a random
    subset of what is currently learned (across learn batches). Returns the calls and the
    examples that remain.
    """
    rng = np.random.default_rng(seed)
    x = data(n, d, seed)
    labels = np.minimum(rng.integers(0, 2 + np.arange(n) * num_classes // n), num_classes - 1)
    order = rng.permutation(n)
    calls, learned, pos = [], [], 0
    for _ in range(steps):
        if learned and rng.random() < 0.4:
            k = int(rng.integers(1, min(_PAD, max(2, len(learned) // 3))))
            out = rng.choice(learned, size=k, replace=False)
            calls.append(("unlearn", out))
            learned = [i for i in learned if i not in set(out.tolist())]
        elif pos < n:
            k = int(rng.integers(5, 40))
            batch = order[pos:pos + k]
            pos += k
            calls.append(("learn", batch))
            learned += batch.tolist()
    return x, labels.astype(np.int32), calls, np.asarray(sorted(learned))


_PAD = 48
_learn = jax.jit(rls.learn)
_unlearn = jax.jit(rls.unlearn)


def run_program(state, x, labels, calls):
    """Runs the calls jitted, each padded to one shape (one compilation per function)."""
    for op, idx in calls:
        assert len(idx) <= _PAD
        rows = np.zeros(_PAD, np.int64)
        rows[:len(idx)] = idx
        mask = np.arange(_PAD) < len(idx)
        fn = _learn if op == "learn" else _unlearn
        state = fn(state, x[rows], labels[rows], mask=mask)
    return state


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_learn_unlearn_sequence_equals_ridge_float32(seed):
    gamma, num_classes = 1.0, 7
    x, labels, calls, kept = random_program(seed, num_classes=num_classes)
    state = run_program(rls.init(x.shape[1], num_classes, gamma=gamma), x, labels, calls)
    # One κ-amplified rounding error per learn/unlearn call (14 calls; measured ≤ 0.04 of
    # the bound). R = A⁻¹ carries the same error as the weights.
    assert_ridge(state.weights, x[kept], labels[kept], num_classes, gamma, updates=len(calls))
    a, _ = ridge_system(x[kept], np.zeros((len(kept), 1)), gamma)
    rtol = ridge_rtol(x[kept], gamma, updates=len(calls))
    assert_relative_error(state.inverse, np.linalg.inv(a), rtol, "R")
    np.testing.assert_array_equal(state.class_counts, np.bincount(labels[kept], minlength=7))
    assert int(state.num_examples) == len(kept)


@pytest.mark.parametrize("seed", [3, 4])
def test_learn_unlearn_sequence_equals_ridge_float64(seed):
    gamma, num_classes = 0.1, 7
    x, labels, calls, kept = random_program(seed, num_classes=num_classes)
    with jax.enable_x64(True):
        state = rls.init(x.shape[1], num_classes, gamma=gamma, dtype=jnp.float64)
        state = run_program(state, x.astype(np.float64), labels, calls)
        assert state.weights.dtype == jnp.float64
        # The same estimate at float64's unit roundoff, one more update for the float64
        # reference's own error: ≈ 5e-14 here.
        rtol = ridge_rtol(x[kept], gamma, updates=len(calls) + 1,
                          u=np.finfo(np.float64).eps / 2)
        assert_relative_error(state.weights, ridge(x[kept], labels[kept], num_classes, gamma),
                              rtol, "float64 weights against ridge")


def test_order_of_batches_does_not_matter():
    x, labels = data(120, 8), np.random.default_rng(0).integers(0, 5, 120).astype(np.int32)
    a = rls.init(8, 5, gamma=0.5)
    b = a
    for i in range(0, 120, 30):
        a = rls.learn(a, x[i:i + 30], labels[i:i + 30])
    for i in reversed(range(0, 120, 40)):
        b = rls.learn(b, x[i:i + 40], labels[i:i + 40])
    # 4 and 3 updates, each within its estimate of the exact weights: 7 between them.
    assert_relative_error(a.weights, b.weights, ridge_rtol(x, 0.5, updates=7), "the orders")
    assert_ridge(a.weights, x, labels, 5, 0.5, updates=4)


def test_random_buffer_layer_is_ridge_on_relu_expansion():
    x = data(150, 6)
    labels = np.random.default_rng(1).integers(0, 4, 150).astype(np.int32)
    state = rls.init(6, 4, gamma=0.3, buffer_size=32, key=jax.random.key(0))
    p = np.asarray(state.projection, np.float64)
    assert p.shape == (6, 32) and np.abs(p).max() <= 1 / np.sqrt(6)
    state = rls.learn(state, x, labels, batch_size=64)
    h = np.maximum(x @ p, 0)
    # The float32 embedding relu(x·P) is within √6·u of h, a perturbation the solve amplifies
    # by κ like its own rounding: the ridge estimate covers both.
    assert_ridge(state.weights, h, labels, 4, 0.3, updates=3)  # 150 rows in chunks of 64
    # predict is embed(x)·W with the state's own W: two float32 products, inner dimensions 6
    # and 32, whose rounding is at most γ_6 (|x|·|P|)·|W| + γ_32 |h|·|W| (γ_k ≤ k·2u).
    w = np.abs(np.asarray(state.weights, np.float64))
    bound = 2 * U32 * (6 * (np.abs(x) @ np.abs(p)) @ w + 32 * h @ w)
    assert_within(rls.predict(state, x), h @ np.asarray(state.weights, np.float64), bound,
                  "predict")


def test_mask_and_chunking_are_exact_and_jit_compiles_once():
    x = data(100, 5)
    labels = np.random.default_rng(2).integers(0, 3, 100).astype(np.int32)
    mask = np.arange(100) % 4 != 0
    learn = jax.jit(rls.learn, static_argnames="batch_size")
    s = learn(rls.init(5, 3, gamma=1.0), x, labels, mask=mask, batch_size=16)
    assert_ridge(s.weights, x[mask], labels[mask], 3, 1.0, updates=7)  # 7 chunks of 16 rows
    assert int(s.num_examples) == mask.sum()
    s = learn(s, x, labels, mask=~mask, batch_size=16)
    compiled = learn._cache_size()
    s = learn(s, x, labels, mask=np.zeros(100, bool), batch_size=16)  # same shapes, no-op
    assert learn._cache_size() == compiled, "recompiled for inputs of the same shapes"
    assert_ridge(s.weights, x, labels, 3, 1.0, updates=21)
    assert_relative_error(s.weights, rls.learn(rls.init(5, 3, gamma=1.0), x, labels).weights,
                          ridge_rtol(x, 1.0, updates=22), "chunked against one batch")


def test_unlearning_a_whole_class_zeroes_and_masks_it():
    x = data(90, 6)
    labels = np.repeat(np.arange(3), 30).astype(np.int32)
    state = rls.learn(rls.init(6, 5, gamma=1.0), x, labels)
    logits = np.asarray(rls.predict(state, x))
    assert (logits[:, 3:] == rls.UNSEEN_LOGIT).all()  # never-seen classes are masked
    state = rls.unlearn(state, x[labels == 1], labels[labels == 1], batch_size=8)
    assert int(state.class_counts[1]) == 0
    np.testing.assert_array_equal(np.asarray(state.weights)[:, 1], 0.0)
    assert (np.asarray(rls.predict(state, x)).argmax(1) != 1).all()
    keep = labels != 1
    assert_ridge(state.weights, x[keep], labels[keep], 5, 1.0, updates=5)  # 1 learn, 4 unlearn


def test_fit_is_ridge_from_scratch():
    x = data(130, 7)
    labels = np.random.default_rng(3).integers(0, 4, 130).astype(np.int32)
    old = rls.learn(rls.init(7, 6, gamma=0.2), data(20, 7, seed=9), np.zeros(20, np.int32))
    fitted = rls.fit(old, x, labels, chunk_size=32)  # old data is discarded
    assert_ridge(fitted.weights, x, labels, 6, 0.2)
    incremental = rls.learn(rls.init(7, 6, gamma=0.2), x, labels)
    # Each one solve away from the exact R = A⁻¹: two between them.
    assert_relative_error(fitted.inverse, incremental.inverse, ridge_rtol(x, 0.2, updates=2),
                          "R")
    np.testing.assert_array_equal(fitted.class_counts, incremental.class_counts)


# ----------------------------------------------------------------------------- bad input


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="gamma"):
        rls.init(4, 3, gamma=0.0)
    with pytest.raises(ValueError, match="gamma"):
        rls.init(4, 3, gamma=float("nan"))
    with pytest.raises(ValueError, match="num_classes"):
        rls.init(4, 0)
    with pytest.raises(ValueError, match="feature_dim"):
        rls.init(0, 3)
    with pytest.raises(TypeError, match=r"feature_dim must be a positive int, got 4.0 \(float"):
        rls.init(4.0, 3)
    with pytest.raises(TypeError, match=r"gamma must be a finite number > 0, got True \(bool"):
        rls.init(4, 3, gamma=True)
    with pytest.raises(ValueError, match="buffer_size"):
        rls.init(4, 3, buffer_size=0, key=jax.random.key(0))
    with pytest.raises(ValueError, match="key"):
        rls.init(4, 3, buffer_size=8)
    with pytest.raises(ValueError, match="enable_x64"):
        rls.init(4, 3, dtype=jnp.float64)
    state = rls.init(4, 3)
    with pytest.raises(ValueError, match=r"shape \(n, 4\)"):
        rls.learn(state, np.zeros((2, 5), np.float32), np.zeros(2, np.int32))
    with pytest.raises(ValueError, match=r"shape \(n, 4\)"):  # under jit too (static)
        jax.jit(rls.learn)(state, np.zeros((2, 5), np.float32), np.zeros(2, np.int32))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        rls.learn(state, np.zeros((2, 4), np.float32), np.array([0, 3], np.int32))
    with pytest.raises(ValueError, match="labels must have shape"):
        rls.learn(state, np.zeros((2, 4), np.float32), np.zeros(3, np.int32))
    with pytest.raises(TypeError, match="integer"):
        rls.learn(state, np.zeros((2, 4), np.float32), np.zeros(2, np.float32))


def test_unlearning_what_was_not_learned():
    x = data(60, 5)
    labels = (np.arange(60) % 2).astype(np.int32)
    state = rls.learn(rls.init(5, 4, gamma=1.0), x, labels)
    # Detected: a class never learned, or more examples of a class than were learned.
    with pytest.raises(ValueError, match="class 3"):
        rls.unlearn(state, x[:1], np.array([3], np.int32))
    with pytest.raises(ValueError, match="only 30 are learned"):
        rls.unlearn(state, np.concatenate([x, x[:2]]), np.concatenate([labels, [0, 0]]))
    # Detected: rows whose downdate is not positive-definite (far from the learned data).
    with pytest.raises(ValueError, match="not positive-definite"):
        rls.unlearn(state, 20 * x[:3], labels[:3])
    # Under jit nothing can raise: the same request gives non-finite weights.
    bad = jax.jit(rls.unlearn)(state, 20 * x[:3], labels[:3])
    assert not np.isfinite(np.asarray(bad.weights)).all()


def test_consistency_check_and_what_cannot_be_detected():
    gamma = 1.0
    x = np.zeros((3, 6), np.float32)
    x[:, :3] = data(3, 3)  # learned rows span the first 3 coordinates only
    labels = np.array([0, 1, 0], np.int32)
    state = rls.learn(rls.init(6, 2, gamma=gamma), x, labels)
    assert rls.inverse_is_consistent(state)
    assert rls.inverse_is_consistent(rls.unlearn(state, x[:2], labels[:2]))
    # Never learned, orthogonal to the data, small: the downdate stays positive-definite,
    # so unlearn accepts it, but R⁻¹ − γI is no longer PSD, which the O(d³) check detects.
    ghost = np.zeros((1, 6), np.float32)
    ghost[0, 5] = 0.5
    removed = rls.unlearn(state, ghost, labels[:1])
    assert not rls.inverse_is_consistent(removed)
    # Not detectable by either check: a never-learned row inside the learned span whose
    # removal keeps R⁻¹ − γI PSD (here a scaled-down copy of a learned row).
    silent = rls.unlearn(state, 0.1 * x[:1], labels[:1])
    assert rls.inverse_is_consistent(silent)
    assert np.abs(np.asarray(silent.weights) - np.asarray(state.weights)).max() > 1e-4
