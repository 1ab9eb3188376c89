"""Fixed-capacity orthonormal bases of protected subspaces, grown with GPM's energy rule.

A :class:`SubspaceBasis` holds ``capacity`` columns of which the first ``rank`` are
orthonormal and the rest are exactly zero. Growing the basis writes new columns in place,
so its shape never changes: code that consumes it (a jitted training step, an optimizer
state, a checkpoint template) compiles once for the whole run.

The growth rule is Gradient Projection Memory's (Saha, Garg, Roy, "Gradient Projection
Memory for Continual Learning", ICLR 2021, https://arxiv.org/abs/2103.09762; code
``sahagobinda/GPM`` @1a238ec, ``update_GPM``), see :func:`grow_basis`.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from clax._validation import check_int, check_positive_int

ArrayLike = jax.typing.ArrayLike


class SubspaceBasis(NamedTuple):
    """An orthonormal basis stored at a fixed capacity; a pytree (jit/orbax friendly).

    Invariant: ``vectors[:, :rank]`` has orthonormal columns, ``vectors[:, rank:]`` is zero.
    Hence ``vectors @ vectors.T`` is the orthogonal projector onto the span, with no mask.
    """

    vectors: jax.Array  # (n, capacity) float32: orthonormal columns [:rank], zeros after
    rank: jax.Array  # int32 (): number of valid columns


def empty_basis(n: int, capacity: int | None = None, dtype: Any = jnp.float32) -> SubspaceBasis:
    """A basis of rank 0 in ``R^n`` that can hold up to ``capacity`` vectors.

    Args:
        n: Dimension of the ambient space (e.g. a Dense kernel's fan-in, or
            ``kh * kw * c_in`` for a conv kernel).
        capacity: Maximum rank, ``1 <= capacity <= n``; defaults to ``n``.
        dtype: Floating dtype of the vectors.

    Returns:
        A :class:`SubspaceBasis` with zero vectors of shape ``(n, capacity)`` and rank 0.

    Raises:
        TypeError: On a non-int ``n`` or ``capacity``.
        ValueError: On a non-positive ``n`` or a capacity outside ``[1, n]``.
    """
    n = check_positive_int("n", n)
    capacity = n if capacity is None else check_int("capacity", capacity, low=1, high=n)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"dtype must be a floating dtype, got {dtype!r}")
    return SubspaceBasis(
        vectors=jnp.zeros((n, int(capacity)), dtype), rank=jnp.zeros((), jnp.int32)
    )


def check_threshold(threshold: Any, name: str = "threshold") -> None:
    """Checks that ``threshold`` is a scalar in ``(0, 1)``; traced values are skipped.

    Args:
        threshold: A Python number or a concrete scalar array (a tracer is not checked).
        name: How the argument is called in the error message.

    Raises:
        TypeError: ``threshold`` is not a number (a bool, a str, ``None``, a bool array).
        ValueError: It is not a scalar, not finite, or outside ``(0, 1)``.
    """
    if isinstance(threshold, jax.core.Tracer):
        return
    try:
        value = np.asarray(threshold)
    except Exception:  # noqa: BLE001 - reported below with the offending value
        value = None
    if value is None or value.dtype == np.bool_ or not np.issubdtype(value.dtype, np.number):
        raise TypeError(f"{name} must be a scalar in (0, 1), got {threshold!r} "
                        f"({type(threshold).__name__})")
    if value.shape != () or not (math.isfinite(float(value)) and 0.0 < float(value) < 1.0):
        raise ValueError(f"{name} must be a scalar in (0, 1), got {threshold!r}")


def _check_basis(basis: Any, name: str = "basis") -> None:
    if not isinstance(basis, SubspaceBasis):
        raise TypeError(f"{name} must be a SubspaceBasis, got {type(basis).__name__}")
    if jnp.ndim(basis.vectors) != 2:
        raise ValueError(
            f"{name}.vectors must have shape (n, capacity), got {jnp.shape(basis.vectors)}"
        )
    if jnp.shape(basis.rank) != ():
        raise ValueError(f"{name}.rank must be a scalar, got shape {jnp.shape(basis.rank)}")


def _energy_counts(
    s_hat: jax.Array, total: jax.Array, threshold: jax.Array, first: jax.Array
) -> jax.Array:
    """Number of new directions GPM keeps, from the singular values of ``R̂``.

    ``first``: ``r = #{k : cumsum(S²)/‖R‖² [k] < ε}`` (Eq. 5; here ``R̂ = R``).
    Otherwise: starting from ``acc = (‖R‖² − ‖R̂‖²)/‖R‖²``, directions are added while
    ``acc < ε`` (Eq. 9), i.e. ``r = #{k : acc + Σ_{j<k} S_j²/‖R‖² < ε}``: the direction
    that crosses ε is included, unlike the first-task count.
    """
    safe_total = jnp.where(total > 0, total, 1.0)
    ratio = jnp.square(s_hat) / safe_total
    inclusive = jnp.cumsum(ratio)
    exclusive = inclusive - ratio
    acc0 = (total - jnp.sum(jnp.square(s_hat))) / safe_total
    r_first = jnp.sum(inclusive < threshold)
    r_next = jnp.sum(acc0 + exclusive < threshold)
    r = jnp.where(first, r_first, r_next)
    return jnp.where(total > 0, r, 0).astype(jnp.int32)


def _grow(
    vectors: jax.Array,
    rank: jax.Array,
    representation: jax.Array,
    threshold: jax.Array,
    first: jax.Array,
) -> tuple[SubspaceBasis, jax.Array]:
    hi = jax.lax.Precision.HIGHEST
    capacity = vectors.shape[1]
    work = jnp.promote_types(vectors.dtype, jnp.float32)
    m_basis = vectors.astype(work)
    r_mat = representation.astype(work)
    total = jnp.sum(jnp.square(r_mat))
    # Eq. 8: R̂ = R − M Mᵀ R (M's padding columns are zero, so no mask is needed).
    r_hat = r_mat - jnp.matmul(m_basis, jnp.matmul(m_basis.T, r_mat, precision=hi), precision=hi)
    u, s_hat, _ = jnp.linalg.svd(r_hat, full_matrices=False)  # u: (n, k), k = min(n, m)
    k = u.shape[1]
    r = _energy_counts(s_hat, total, threshold, first)
    # Columns [rank, rank + r) of the new basis come from u[:, :r]; truncated at capacity.
    cols = jnp.arange(capacity)
    src = cols - rank
    take = (src >= 0) & (src < r)
    # Re-orthogonalise the new directions against M once more ("twice is enough"): in
    # float32 the SVD of R̂ leaves O(eps·‖R‖/σ) components along M, which would accumulate
    # over tasks. Then normalise; the selected σ are > 0 so the norms are ~1.
    u = u - jnp.matmul(m_basis, jnp.matmul(m_basis.T, u, precision=hi), precision=hi)
    q, rr = jnp.linalg.qr(u)
    # QR keeps the span of every leading block of columns; undo its sign flips.
    signs = jnp.where(jnp.diagonal(rr) < 0, -1.0, 1.0).astype(work)
    u = q * signs[None, :]
    gathered = jnp.take(u, jnp.clip(src, 0, k - 1), axis=1)
    new_vectors = jnp.where(take[None, :], gathered, m_basis).astype(vectors.dtype)
    new_rank = jnp.minimum(rank + r, capacity).astype(jnp.int32)
    return SubspaceBasis(new_vectors, new_rank), r


_grow_jit = jax.jit(_grow)


def grow_basis(
    basis: SubspaceBasis,
    representation: ArrayLike,
    threshold: ArrayLike,
    *,
    first: ArrayLike | None = None,
) -> SubspaceBasis:
    """Adds to ``basis`` the directions of ``representation`` GPM's energy rule keeps.

    With ``M`` the current basis (``n × rank``), ``R`` the representation matrix
    (``n × m``: one column per sample, or per conv patch) and ``ε`` the threshold:

    * **First task** (``rank == 0``, Eq. 5): ``U, S = svd(R)`` and
      ``r = #{k : Σ_{j≤k} S_j² / ‖R‖²_F < ε}`` (strict ``<``: the component that crosses
      ``ε`` is excluded); ``M ← U[:, :r]``.
    * **Later tasks** (Eqs. 8-9): ``R̂ = R − M Mᵀ R``, ``U, S = svd(R̂)``, energy measured
      against the *unprojected* ``‖R‖²_F``: ``acc = (‖R‖² − ‖R̂‖²)/‖R‖²``, then columns
      ``U[:, i]`` are added while ``acc < ε`` (each adds ``S_i²/‖R‖²``), i.e.
      ``r = #{k : acc + Σ_{j<k} S_j²/‖R‖² < ε}``. ``M ← [M, U[:, :r]]``.
    * The result is truncated at ``capacity`` columns (GPM truncates at ``n``).

    This follows ``update_GPM`` in ``sahagobinda/GPM`` exactly for the counts. Two
    details: GPM picks the rule by "first task of the run", here by ``rank == 0`` unless
    ``first`` is given (they differ only for a layer whose first-task count was 0); and the
    new columns are re-orthogonalised against ``M`` (one more projection and a QR), which
    changes them only by float rounding but keeps ``MᵀM = I`` to ~1e-6 over many tasks. A
    zero representation adds nothing.

    Fixed shapes: the output has the input's shapes and dtypes, and ``threshold``,
    ``first`` and the rank may be traced, so growing does not recompile (a new ``m``
    does). Callable inside ``jax.jit``.

    Args:
        basis: The current basis.
        representation: ``R``, shape ``(n, m)`` with ``n`` the basis dimension.
        threshold: ``ε`` in ``(0, 1)`` (checked when concrete).
        first: Force the first-task (``True``) or incremental (``False``) rule; by default
            the first-task rule applies when ``basis.rank == 0``.

    Returns:
        The grown basis, same shapes and dtypes.

    Raises:
        TypeError: If ``basis`` is not a :class:`SubspaceBasis`.
        ValueError: If ``representation`` is not 2-D with ``n`` rows, or ``threshold`` is
            not in ``(0, 1)``.
    """
    _check_basis(basis)
    check_threshold(threshold)
    n = basis.vectors.shape[0]
    if jnp.ndim(representation) != 2 or jnp.shape(representation)[0] != n:
        raise ValueError(
            f"representation must have shape (n={n}, m) to fit basis.vectors of shape "
            f"{tuple(basis.vectors.shape)}, got {tuple(jnp.shape(representation))}"
        )
    if first is None:
        first = basis.rank == 0
    grown, _ = _grow_jit(
        basis.vectors,
        jnp.asarray(basis.rank, jnp.int32),
        jnp.asarray(representation),
        jnp.asarray(threshold, jnp.float32),
        jnp.asarray(first, jnp.bool_),
    )
    return grown


def project_out(
    basis: SubspaceBasis,
    g: ArrayLike,
    *,
    precision: jax.lax.PrecisionLike = jax.lax.Precision.HIGHEST,
) -> jax.Array:
    """Removes from ``g`` its component in the span of ``basis``: ``g − M (Mᵀ g)``.

    Args:
        basis: The basis (zero padding columns, see :class:`SubspaceBasis`).
        g: Array of shape ``(n, ...)``: the basis runs along axis 0 (a Dense kernel
            ``(in, out)``; reshape a conv kernel to ``(kh * kw * in, out)`` first).
        precision: Matmul precision; ``HIGHEST`` keeps the result orthogonal to ~1e-6 in
            float32 on accelerators whose default uses bf16/TF32 passes.

    Returns:
        The projected array, shape and dtype of ``g``.

    Raises:
        ValueError: If ``g``'s leading dimension is not the basis dimension.
    """
    g = jnp.asarray(g)
    n = basis.vectors.shape[0]
    if g.ndim < 1 or g.shape[0] != n:
        raise ValueError(
            f"g must have shape (n={n}, ...) to fit basis.vectors of shape "
            f"{tuple(basis.vectors.shape)}, got {tuple(g.shape)}"
        )
    flat = g.reshape(n, -1)
    m = basis.vectors.astype(jnp.promote_types(flat.dtype, basis.vectors.dtype))
    coeff = jnp.matmul(m.T, flat, precision=precision)
    out = flat - jnp.matmul(m, coeff, precision=precision)
    return out.astype(g.dtype).reshape(g.shape)


def projection_matrix(basis: SubspaceBasis) -> jax.Array:
    """The orthogonal projector ``P = M Mᵀ`` onto the span, shape ``(n, n)``."""
    m = basis.vectors
    return jnp.matmul(m, m.T, precision=jax.lax.Precision.HIGHEST)


def valid_mask(basis: SubspaceBasis) -> jax.Array:
    """Boolean ``(capacity,)``: which columns hold basis vectors (``index < rank``)."""
    return jnp.arange(basis.vectors.shape[1]) < basis.rank


def orthonormality_error(basis: SubspaceBasis) -> jax.Array:
    """``max |Vᵀ V − diag(mask)|`` over all columns, in float32.

    Zero for a valid basis: the first ``rank`` columns orthonormal, the padding zero.
    """
    v = basis.vectors.astype(jnp.float32)
    gram = jnp.matmul(v.T, v, precision=jax.lax.Precision.HIGHEST)
    target = jnp.diag(valid_mask(basis).astype(jnp.float32))
    return jnp.max(jnp.abs(gram - target))
