"""Frequent Directions: a fixed-size sketch of the row space of a stream of matrices.

Frequent Directions (Liberty, KDD 2013; Ghashami, Liberty, Phillips, Woodruff, SIAM J.
Comput. 2016) keeps ``ℓ`` weighted directions ``B`` whose covariance ``BᵀB`` tracks the
covariance ``AᵀA`` of every row seen so far. Here the sketch is stored factored, as
orthonormal ``directions`` (d, ℓ) and weights ``sigma`` (ℓ,), so ``BᵀB = U diag(σ²) Uᵀ``
with ``U = directions``, and the update is the variant of CoSO's ``DoubleSVD`` (Cheng et
al., NeurIPS 2025, code ``quinn-ch/CoSO`` ``coso/coso_projector.py``):

.. math::

   A_t = X S Vᵀ \\quad (\\text{SVD of the new rows, } s_i \\text{ sorted, } s_i = 0
   \\text{ beyond the rank}) \\\\
   N = V_{:, :ℓ}\\, \\mathrm{diag}\\big(\\sqrt{\\max(s_{1:ℓ}^2 - s_{ℓ+1}^2, 0)}\\big) \\\\
   [\\lambda B,\\ N] = U' S' W'ᵀ, \\quad
   B ← U'_{:, :ℓ}\\, \\mathrm{diag}\\big(\\sqrt{\\max(s'^2_{1:ℓ} - s'^2_{ℓ+1}, 0)}\\big)

with ``λ`` the decay (``db_decay``; 1 is plain FD). Both the compression of the new rows
and the merge shrink by the ``(ℓ+1)``-th squared singular value (0-based index ``ℓ``), as
CoSO does; Liberty's original buffer of ``2ℓ`` rows shrinks by the ``ℓ``-th, which doubles
the constant below.

Guarantee (``decay = 1``): with ``A`` all rows seen so far and ``B`` the sketch,

.. math::

   0 \\preceq AᵀA - BᵀB \\preceq \\frac{\\|A\\|_F^2 - \\|B\\|_F^2}{ℓ + 1}\\, I
   \\preceq \\frac{\\|A\\|_F^2}{ℓ}\\, I .

Each shrink by ``δ`` removes a PSD matrix of spectral norm ``δ`` and at least ``(ℓ+1)δ`` of
squared Frobenius mass (the top ``ℓ`` values lose ``δ`` each and the ``(ℓ+1)``-th, itself
``δ``, is dropped); the errors of all shrinks add up.

Shapes are static: ``ℓ`` and ``d`` are fixed when the sketch is created, the number of new
rows is fixed by the caller's array, so the update is jit-able and never recompiles.
Singular values that do not exist (fewer than ``ℓ + 1`` of them) count as zero: no shrink.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from clax._validation import check_positive_int

__all__ = [
    "FrequentDirections",
    "init_sketch",
    "shrink",
    "sketch_covariance",
    "sketch_matrix",
    "update_sketch",
    "update_sketch_from_svd",
]


class FrequentDirections(NamedTuple):
    """A Frequent Directions sketch of rows in ``R^d``; a pytree with fixed shapes.

    The sketch matrix is ``B = diag(sigma) @ directions.T`` (ℓ, d) (rows = weighted
    directions). Directions whose ``sigma`` is 0 carry no mass (they are whatever the SVD
    returned, or zero before any update).
    """

    directions: jax.Array  # float32 (d, ℓ): orthonormal columns (where sigma > 0)
    sigma: jax.Array  # float32 (ℓ,): non-increasing, >= 0


def init_sketch(dim: int, rank: int, dtype=jnp.float32) -> FrequentDirections:
    """An empty sketch of ``rank`` directions in ``R^dim`` (all zero).

    Raises:
        TypeError: If ``dim`` or ``rank`` is not an int.
        ValueError: If ``dim`` or ``rank`` is ``< 1``.
    """
    dim, rank = check_positive_int("dim", dim), check_positive_int("rank", rank)
    return FrequentDirections(
        directions=jnp.zeros((dim, rank), dtype), sigma=jnp.zeros((rank,), dtype)
    )


def sketch_matrix(sketch: FrequentDirections) -> jax.Array:
    """The sketch ``B`` (ℓ, d): row ``k`` is ``sigma[k] · directions[:, k]``."""
    return (sketch.directions * sketch.sigma).T


def sketch_covariance(sketch: FrequentDirections) -> jax.Array:
    """``BᵀB = U diag(σ²) Uᵀ`` (d, d), the sketch's estimate of ``AᵀA``."""
    weighted = sketch.directions * sketch.sigma
    return weighted @ weighted.T


def shrink(vectors: jax.Array, sigma: jax.Array, rank: int) -> tuple[jax.Array, jax.Array]:
    """Keeps ``rank`` directions and shrinks their squared weights by the next one.

    Args:
        vectors: (d, k) orthonormal columns (singular vectors), sorted by ``sigma``.
        sigma: (k,) singular values, non-increasing.
        rank: Directions to keep, ``ℓ``. Missing values (``k <= ℓ``) count as zero, and
            missing columns are zero.

    Returns:
        ``(vectors[:, :ℓ], sqrt(max(sigma[:ℓ]² − sigma[ℓ]², 0)))``, shapes (d, ℓ), (ℓ,).
    """
    k = vectors.shape[1]
    if sigma.shape != (k,):
        raise ValueError(f"sigma must have shape ({k},) to match vectors {vectors.shape}, "
                         f"got {sigma.shape}")
    if k < rank + 1:
        sigma = jnp.pad(sigma, (0, rank + 1 - k))
    if k < rank:
        vectors = jnp.pad(vectors, ((0, 0), (0, rank - k)))
    head = sigma[: rank + 1]
    shrunk = jnp.sqrt(jnp.maximum(head[:rank] ** 2 - head[rank] ** 2, 0.0))
    return vectors[:, :rank], shrunk


def update_sketch_from_svd(
    sketch: FrequentDirections,
    vectors: jax.Array,
    sigma: jax.Array,
    *,
    decay: float | jax.Array = 1.0,
) -> FrequentDirections:
    """Adds new rows given by their SVD ``A_t = X diag(sigma) vectorsᵀ`` to the sketch.

    For callers that already have the SVD of the new rows (CoSO uses the same SVD for its
    low-rank projector). Both steps shrink by the ``(ℓ+1)``-th squared singular value.

    Args:
        sketch: The current sketch, directions (d, ℓ).
        vectors: (d, k) right singular vectors of the new rows (orthonormal columns).
        sigma: (k,) their singular values, non-increasing.
        decay: Weight ``λ`` of the old sketch in the merge (CoSO's ``db_decay``).

    Returns:
        The updated sketch (same shapes and dtypes).
    """
    d, rank = sketch.directions.shape
    if vectors.ndim != 2 or vectors.shape[0] != d:
        raise ValueError(f"vectors must have shape ({d}, k) for a sketch of dimension {d}, "
                         f"got {vectors.shape}")
    dtype = sketch.directions.dtype
    new_vectors, new_sigma = shrink(vectors.astype(dtype), sigma.astype(dtype), rank)
    merged = jnp.concatenate(
        [decay * sketch.directions * sketch.sigma, new_vectors * new_sigma], axis=1
    )  # (d, 2ℓ)
    u, s, _ = jnp.linalg.svd(merged, full_matrices=False)
    directions, weights = shrink(u, s, rank)
    return FrequentDirections(directions=directions.astype(dtype), sigma=weights.astype(dtype))


def update_sketch(
    sketch: FrequentDirections, rows: jax.Array, *, decay: float | jax.Array = 1.0
) -> FrequentDirections:
    """Adds the rows of ``rows`` (k, d) to the sketch (CoSO's ``increment_update``).

    Args:
        sketch: The current sketch, directions (d, ℓ).
        rows: (k, d) new rows (e.g. a gradient whose rows live in the sketched space).
        decay: Weight ``λ`` of the old sketch (1: plain Frequent Directions).

    Returns:
        The updated sketch (same shapes and dtypes); jit-able.

    Raises:
        ValueError: If ``rows`` is not 2-D with ``d`` columns.
    """
    d = sketch.directions.shape[0]
    if rows.ndim != 2 or rows.shape[1] != d:
        raise ValueError(f"rows must have shape (k, {d}) for a sketch of dimension {d}, "
                         f"got {rows.shape}")
    _, s, vh = jnp.linalg.svd(rows.astype(jnp.float32), full_matrices=False)
    return update_sketch_from_svd(sketch, vh.T, s, decay=decay)
