"""Tests for clax.subspace.basis against a numpy transcription of GPM's ``update_GPM``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clax.subspace import (
    SubspaceBasis,
    empty_basis,
    grow_basis,
    orthonormality_error,
    project_out,
    projection_matrix,
)

ATOL = 1e-5  # float32 SVD / matmul tolerance used throughout
N, M = 12, 6  # one shape for most tests: each new shape compiles grow_basis again


def update_gpm_reference(feature, activation, threshold, first):
    """``sahagobinda/GPM`` @1a238ec ``main_pmnist.py::update_GPM`` for one layer (float64)."""
    activation = np.asarray(activation, np.float64)
    if first:
        u, s, _ = np.linalg.svd(activation, full_matrices=False)
        sval_ratio = s**2 / (s**2).sum()
        r = np.sum(np.cumsum(sval_ratio) < threshold)
        return u[:, :r], r
    _, s1, _ = np.linalg.svd(activation, full_matrices=False)
    sval_total = (s1**2).sum()
    act_hat = activation - feature @ feature.T @ activation
    u, s, _ = np.linalg.svd(act_hat, full_matrices=False)
    sval_hat = (s**2).sum()
    sval_ratio = s**2 / sval_total
    accumulated_sv = (sval_total - sval_hat) / sval_total
    r = 0
    for ii in range(sval_ratio.shape[0]):
        if accumulated_sv < threshold:
            accumulated_sv += sval_ratio[ii]
            r += 1
        else:
            break
    if r == 0:
        return feature, 0
    ui = np.hstack((feature, u[:, :r]))
    return (ui[:, : ui.shape[0]] if ui.shape[1] > ui.shape[0] else ui), r


def low_rank_matrix(rng, n, m, decay=0.8):
    """A matrix with a decaying spectrum, so energy thresholds cut at distinct ranks."""
    q1, _ = np.linalg.qr(rng.normal(size=(n, n)))
    q2, _ = np.linalg.qr(rng.normal(size=(m, m)))
    k = min(n, m)
    s = decay ** np.arange(k) * (1 + 0.1 * rng.uniform(size=k))
    return (q1[:, :k] * np.sort(s)[::-1]) @ q2[:, :k].T


def assert_same_span(a, b):
    np.testing.assert_allclose(a @ a.T, b @ b.T, atol=1e-4)


@pytest.mark.parametrize("threshold", [0.5, 0.9, 0.97])
def test_matches_gpm_reference_over_tasks(threshold):
    rng = np.random.default_rng(0)
    n, m = N, M
    basis = empty_basis(n)
    feature = np.zeros((n, 0))
    for t in range(5):
        rep = low_rank_matrix(rng, n, m).astype(np.float32)
        feature, _ = update_gpm_reference(feature, rep, threshold, first=t == 0)
        basis = grow_basis(basis, rep, threshold)
        rank = int(basis.rank)
        assert rank == feature.shape[1], f"task {t}: rank {rank} vs GPM {feature.shape[1]}"
        v = np.asarray(basis.vectors, np.float64)
        assert_same_span(v[:, :rank], feature)
        np.testing.assert_array_equal(v[:, rank:], 0.0)
        assert float(orthonormality_error(basis)) < ATOL


def test_first_task_count_is_strict():
    # Energies 4, 1, 1, 1, 1 of 8: cumulative 0.5, 0.625, 0.75, 0.875, 1 (exact in binary).
    rep = np.diag([2.0, 1.0, 1.0, 1.0, 1.0]).astype(np.float32)
    assert int(grow_basis(empty_basis(5), rep, 0.625).rank) == 1  # 0.625 is not < 0.625
    assert int(grow_basis(empty_basis(5), rep, 0.63).rank) == 2
    assert int(grow_basis(empty_basis(5), rep, 0.49).rank) == 0


def test_incremental_count_includes_the_crossing_direction():
    basis = grow_basis(empty_basis(5), np.diag([2.0, 0.0, 0.0, 0.0, 0.0]).astype(np.float32),
                       0.5)
    assert int(basis.rank) == 0  # first-task rule: 1.0 is not < 0.5
    basis = grow_basis(empty_basis(5), np.eye(5, 2, dtype=np.float32) * [1.0, 0.01], 0.99995)
    assert int(basis.rank) == 1  # M = e0
    # R: energy 0.5 on e0 (already covered), 0.125 on each of e1..e4.
    rep = np.diag([2.0, 1.0, 1.0, 1.0, 1.0]).astype(np.float32)
    # acc = 0.5 < 0.55 -> add one (0.625) -> stop: the crossing direction is included.
    assert int(grow_basis(basis, rep, 0.55).rank) == 2
    # acc = 0.5 < 0.7 -> 0.625 -> 0.75: two directions.
    assert int(grow_basis(basis, rep, 0.7).rank) == 3
    # Already explained: acc = 0.5 is not < 0.45, nothing is added.
    assert int(grow_basis(basis, rep, 0.45).rank) == 1
    # The same matrix under the first-task rule (no basis) keeps fewer: 0.5, 0.625 < 0.7.
    assert int(grow_basis(empty_basis(5), rep, 0.7).rank) == 2


def test_existing_columns_are_kept():
    rng = np.random.default_rng(1)
    b1 = grow_basis(empty_basis(N), rng.normal(size=(N, M)).astype(np.float32), 0.9)
    b2 = grow_basis(b1, rng.normal(size=(N, M)).astype(np.float32), 0.9)
    r1 = int(b1.rank)
    np.testing.assert_array_equal(np.asarray(b2.vectors[:, :r1]), np.asarray(b1.vectors[:, :r1]))


def test_capacity_truncation():
    rng = np.random.default_rng(2)
    basis = empty_basis(12, capacity=5)
    ref = np.zeros((12, 0))
    for t in range(3):
        rep = rng.normal(size=(12, 6)).astype(np.float32)
        ref, _ = update_gpm_reference(ref, rep, 0.99, first=t == 0)
        ref = ref[:, :5]
        basis = grow_basis(basis, rep, 0.99)
        assert basis.vectors.shape == (12, 5)
        assert int(basis.rank) == ref.shape[1] <= 5
        assert_same_span(np.asarray(basis.vectors[:, : int(basis.rank)], np.float64), ref)
    assert int(basis.rank) == 5
    assert float(orthonormality_error(basis)) < ATOL


def test_full_capacity_stays_orthonormal_over_many_tasks():
    rng = np.random.default_rng(3)
    basis = empty_basis(N)
    for _ in range(8):
        basis = grow_basis(basis, rng.normal(size=(N, M)).astype(np.float32), 0.97)
        assert float(orthonormality_error(basis)) < ATOL
    assert int(basis.rank) == N


def test_zero_representation_adds_nothing():
    basis = grow_basis(empty_basis(N), np.zeros((N, M), np.float32), 0.9)
    assert int(basis.rank) == 0
    np.testing.assert_array_equal(np.asarray(basis.vectors), 0.0)


def test_jit_traced_threshold_and_rank_no_recompile():
    rng = np.random.default_rng(4)
    traces = []

    @jax.jit
    def grow(basis, rep, threshold):
        traces.append(1)
        return grow_basis(basis, rep, threshold)

    basis = empty_basis(N)
    for thr in [0.9, 0.95, 0.97]:
        basis = grow(basis, rng.normal(size=(N, M)).astype(np.float32), jnp.float32(thr))
    assert len(traces) == 1
    assert basis.vectors.shape == (N, N) and basis.rank.dtype == jnp.int32
    assert 0 < int(basis.rank) <= N


def test_project_out_removes_the_span_and_keeps_the_complement():
    rng = np.random.default_rng(5)
    basis = grow_basis(empty_basis(N), rng.normal(size=(N, M)).astype(np.float32), 0.9)
    assert 0 < int(basis.rank) < N
    g = rng.normal(size=(N, 7)).astype(np.float32)
    out = project_out(basis, g)
    v = np.asarray(basis.vectors)
    assert np.abs(v.T @ np.asarray(out)).max() < ATOL
    p = np.asarray(projection_matrix(basis))
    np.testing.assert_allclose(np.asarray(out), g - p @ g, atol=ATOL)
    # A gradient already orthogonal to the span is unchanged.
    np.testing.assert_allclose(np.asarray(project_out(basis, out)), np.asarray(out), atol=ATOL)
    # Trailing axes are flattened: (n, a, b) works like (n, a*b).
    g3 = g[:, :6].reshape(N, 2, 3)
    np.testing.assert_allclose(np.asarray(project_out(basis, g3)).reshape(N, 6),
                               np.asarray(out[:, :6]), atol=ATOL)


def test_bad_input_errors():
    basis = empty_basis(6, 4)
    with pytest.raises(ValueError, match=r"representation must have shape \(n=6, m\).*\(5, 3\)"):
        grow_basis(basis, np.zeros((5, 3)), 0.9)
    for bad in (0.0, 1.0, 1.5, -0.1, float("nan"), np.array([0.5, 0.5])):
        with pytest.raises(ValueError, match="threshold must be a scalar in"):
            grow_basis(basis, np.zeros((6, 3)), bad)
    for bad in (True, "0.9", None):
        with pytest.raises(TypeError, match=r"threshold must be a scalar in \(0, 1\), got"):
            grow_basis(basis, np.zeros((6, 3)), bad)
    with pytest.raises(TypeError, match="basis must be a SubspaceBasis"):
        grow_basis(np.zeros((6, 4)), np.zeros((6, 3)), 0.9)
    with pytest.raises(ValueError, match=r"capacity must be an int in \[1, 6\], got 7"):
        empty_basis(6, 7)
    with pytest.raises(ValueError, match="n must be a positive int"):
        empty_basis(0)
    with pytest.raises(TypeError, match=r"n must be a positive int, got 6.0 \(float\)"):
        empty_basis(6.0)
    with pytest.raises(TypeError, match=r"capacity must be an int in \[1, 6\], got 2.0"):
        empty_basis(6, 2.0)
    with pytest.raises(ValueError, match=r"g must have shape \(n=6, ...\)"):
        project_out(basis, np.zeros((5, 2)))


def test_basis_is_a_pytree():
    basis = empty_basis(3, 2)
    leaves = jax.tree.leaves(basis)
    assert len(leaves) == 2
    assert isinstance(jax.tree.map(lambda x: x, basis), SubspaceBasis)
