"""Frequent Directions sketch: numpy reference (CoSO's DoubleSVD), error bound, jit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clax.subspace.frequent_directions import (
    FrequentDirections,
    init_sketch,
    shrink,
    sketch_covariance,
    sketch_matrix,
    update_sketch,
)


class DoubleSVDReference:
    """numpy port of CoSO's ``DoubleSVD.increment_update`` (``quinn-ch/CoSO``).

    CoSO sketches the column space of a (d, m) matrix; clax passes rows (m, d), i.e. the
    transpose. ``sketch_matrix`` here is (d, ℓ), the transpose of clax's ``B``.
    """

    def __init__(self, rank, decay):
        self.rank, self.decay = rank, decay
        self.sketch_matrix = None
        self.sketch_sigma = None

    def increment_update(self, matrix):
        u, s, _ = np.linalg.svd(matrix, full_matrices=False)
        head = s[: self.rank + 1]
        shrunk = np.sqrt(np.maximum(head**2 - head[self.rank] ** 2, 0.0))
        update = u[:, : self.rank] @ np.diag(shrunk[: self.rank])
        if self.sketch_matrix is None:
            self.sketch_matrix, self.sketch_sigma = update, shrunk[: self.rank]
            return
        merged = np.concatenate([self.decay * self.sketch_matrix, update], axis=1)
        mu, ms, _ = np.linalg.svd(merged, full_matrices=False)
        mh = ms[: self.rank + 1]
        mshrunk = np.sqrt(np.maximum(mh**2 - mh[self.rank] ** 2, 0.0))
        self.sketch_matrix = mu[:, : self.rank] @ np.diag(mshrunk[: self.rank])
        self.sketch_sigma = mshrunk[: self.rank]


def _batches(seed, n, k, d, decay_spectrum=True):
    rng = np.random.default_rng(seed)
    # A decaying spectrum (like gradients): a few strong directions plus noise.
    mix = rng.normal(size=(d, d)) * (0.7 ** np.arange(d))[:, None] if decay_spectrum else None
    out = []
    for _ in range(n):
        x = rng.normal(size=(k, d))
        out.append((x @ mix if decay_spectrum else x).astype(np.float32))
    return out


@pytest.mark.parametrize("decay", [1.0, 0.5])
def test_matches_coso_double_svd_reference(decay):
    rank, d = 4, 12
    ref = DoubleSVDReference(rank, decay)
    sketch = init_sketch(d, rank)
    update = jax.jit(lambda s, a: update_sketch(s, a, decay=decay))
    for rows in _batches(0, 6, 9, d):
        ref.increment_update(rows.T.astype(np.float64))
        sketch = update(sketch, jnp.asarray(rows))
        np.testing.assert_allclose(sketch.sigma, ref.sketch_sigma, rtol=2e-4, atol=1e-4)
        # Singular vectors are defined up to sign: compare the covariances B Bᵀ.
        cov_ref = ref.sketch_matrix @ ref.sketch_matrix.T
        scale = np.abs(cov_ref).max()
        np.testing.assert_allclose(sketch_covariance(sketch) / scale, cov_ref / scale,
                                   atol=2e-5)
    d_ = np.asarray(sketch.directions)
    np.testing.assert_allclose(d_.T @ d_, np.eye(rank), atol=1e-5)


def test_error_bound_and_psd():
    """0 ⪯ AᵀA − BᵀB ⪯ (‖A‖² − ‖B‖²)/(ℓ+1) ≤ ‖A‖²/ℓ, for a stream of random batches."""
    rank, d = 5, 20
    sketch = init_sketch(d, rank)
    batches = _batches(1, 8, 7, d, decay_spectrum=False)
    for rows in batches:
        sketch = update_sketch(sketch, jnp.asarray(rows))
    a = np.concatenate(batches).astype(np.float64)
    b = np.asarray(sketch_matrix(sketch), np.float64)
    err = np.linalg.eigvalsh(a.T @ a - b.T @ b)
    fro_a, fro_b = np.sum(a**2), np.sum(b**2)
    tol = 1e-4 * fro_a
    assert err.min() >= -tol, err.min()
    assert err.max() <= (fro_a - fro_b) / (rank + 1) + tol
    assert err.max() <= fro_a / rank
    # Not vacuous: the bound is attained up to a modest factor for white noise.
    assert err.max() > 0.05 * fro_a / rank


def test_exact_when_rank_suffices():
    """Rows of rank < ℓ are captured exactly (no shrink: the (ℓ+1)-th value is 0)."""
    rng = np.random.default_rng(2)
    basis = np.linalg.qr(rng.normal(size=(10, 3)))[0]
    sketch = init_sketch(10, 4)
    a_all = []
    for _ in range(3):
        a = (rng.normal(size=(6, 3)) @ basis.T).astype(np.float32)
        a_all.append(a)
        sketch = update_sketch(sketch, jnp.asarray(a))
    a = np.concatenate(a_all)
    np.testing.assert_allclose(sketch_covariance(sketch), a.T @ a, atol=1e-3)
    assert float(sketch.sigma[3]) < 1e-3


def test_shrink_pads_missing_singular_values():
    v = jnp.eye(5)[:, :2]
    s = jnp.array([3.0, 2.0])
    vecs, sig = shrink(v, s, 3)  # only 2 values: the 4th counts as 0, the 3rd column is 0
    assert vecs.shape == (5, 3) and sig.shape == (3,)
    np.testing.assert_allclose(sig, [3.0, 2.0, 0.0])
    np.testing.assert_array_equal(vecs[:, 2], 0.0)
    _, sig = shrink(jnp.eye(5), jnp.array([5.0, 4.0, 3.0, 1.0, 0.5]), 2)
    np.testing.assert_allclose(sig, np.sqrt([25.0 - 9.0, 16.0 - 9.0]), rtol=1e-6)


def test_fixed_shapes_jit_no_retrace_and_pytree():
    sketch = init_sketch(8, 3)
    traces = []

    @jax.jit
    def step(s, a):
        traces.append(1)
        return update_sketch(s, a)

    for rows in _batches(3, 3, 5, 8):
        new = step(sketch, jnp.asarray(rows))
        assert jax.tree.map(jnp.shape, new) == jax.tree.map(jnp.shape, sketch)
        sketch = new
    assert len(traces) == 1
    assert isinstance(sketch, FrequentDirections)
    assert len(jax.tree.leaves(sketch)) == 2


def test_bad_input():
    with pytest.raises(ValueError, match="rank must be a positive int"):
        init_sketch(4, 0)
    with pytest.raises(TypeError, match=r"dim must be a positive int, got 4.0 \(float\)"):
        init_sketch(4.0, 2)
    with pytest.raises(ValueError, match=r"rows must have shape \(k, 4\)"):
        update_sketch(init_sketch(4, 2), jnp.zeros((3, 5)))
