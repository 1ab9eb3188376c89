"""Gradient Projection Memory's projection as an optax transform.

Saha, Garg, Roy, "Gradient Projection Memory for Continual Learning", ICLR 2021
(https://arxiv.org/abs/2103.09762; code ``sahagobinda/GPM`` @1a238ec, ``train_projected``).
Bases are :class:`clax.subspace.SubspaceBasis` values grown at task ends with
:func:`clax.subspace.grow_basis`; they arrive at every step as the ``bases=`` extra arg.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from clax._validation import check_choice, check_positive_int
from clax.params.paths import align_to, is_masked, masked_paths, path_str, plain_path
from clax.subspace.basis import SubspaceBasis
from clax.typing import PyTree
from kernels.projection import project_out_fused

IMPLEMENTATIONS = ("xla", "pallas")

MISSING_BASES_MSG = (
    "subspace_projection needs the bases as a keyword extra arg: "
    "tx.update(grads, state, params, bases=...) (a dict mirroring the params with a "
    "SubspaceBasis at each projected leaf, or {'layers/0/kernel': basis, ...})"
)


def one_dimensional(params: PyTree) -> PyTree:
    """Mask of the 1-D leaves (biases, normalisation scales and offsets).

    GPM zeroes their gradients after the first task. In clax models a multi-head
    classifier's bias is ``(T, C)``, so task heads are not selected.
    """
    return jax.tree.map(lambda p: jnp.ndim(p) == 1, params)


def _is_basis(x: Any) -> bool:
    return isinstance(x, SubspaceBasis)


def bases_by_path(bases: Any) -> dict[str, SubspaceBasis]:
    """``{"layers/0/kernel": basis}`` from nested or flat (tuple / str keyed) bases.

    Args:
        bases: A (partial) mirror of the params with :class:`SubspaceBasis` leaves, or a
            flat mapping from path tuples or ``"a/b/c"`` strings to bases.

    Returns:
        The bases keyed by :func:`clax.params.paths.path_str`.

    Raises:
        TypeError: If a leaf is not a ``SubspaceBasis``.
    """
    pairs = jax.tree_util.tree_flatten_with_path(bases, is_leaf=_is_basis)[0]
    out: dict[str, SubspaceBasis] = {}
    for path, leaf in pairs:
        if not _is_basis(leaf):
            raise TypeError(
                f"bases[{path_str(path)!r}] must be a SubspaceBasis, got {type(leaf).__name__}"
                " (pass SubspaceBasis(vectors, rank) values, e.g. from clax.subspace)"
            )
        key = plain_path(path)
        if len(key) == 1 and isinstance(key[0], tuple):  # {("layers", 0, "kernel"): b}
            key = key[0]
        out[path_str(key)] = leaf
    return out


def _as_matrix(name: str, g: jax.Array, basis: SubspaceBasis) -> tuple[int, int]:
    """``(n, cols)``: the leaf read as its ``(fan-in, out)`` matrix, checked against the basis.

    The basis acts on the input-feature axis: ``n`` must be the product of every axis but
    the last (``in`` for a Dense kernel ``(in, out)``, ``kh·kw·in`` for a conv kernel
    ``(kh, kw, in, out)``). A basis whose length only matches a leading axis (``kh`` or
    ``kh·kw`` of a conv kernel) is refused, not projected along that axis. A concrete rank
    must lie in ``[0, capacity]`` (a traced one cannot be checked).
    """
    if jnp.ndim(basis.vectors) != 2:
        raise ValueError(f"basis for parameter {name!r} must have vectors of shape (n, "
                         f"capacity), got {tuple(jnp.shape(basis.vectors))}")
    n, capacity = (int(d) for d in basis.vectors.shape)
    fan_in = math.prod(g.shape[:-1])
    if g.ndim < 2 or n != fan_in:
        expected = (f"the fan-in {fan_in} (the product of every axis but the last: in for "
                    "a Dense kernel (in, out), kh*kw*in for a conv kernel (kh, kw, in, out))"
                    if g.ndim >= 2 else "a leaf with >= 2 dims (a Dense or conv kernel)")
        raise ValueError(
            f"basis for parameter {name!r} does not fit it: basis.vectors has shape "
            f"{tuple(basis.vectors.shape)} (basis dimension n={n}), but the parameter has "
            f"shape {tuple(g.shape)}; n must equal {expected}"
        )
    rank = basis.rank
    if not isinstance(rank, jax.core.Tracer):
        if jnp.shape(rank) != ():
            raise ValueError(f"basis for parameter {name!r}: rank must be a scalar, got "
                             f"shape {jnp.shape(rank)}")
        r = int(rank)
        if not 0 <= r <= capacity:
            raise ValueError(f"basis for parameter {name!r}: rank must be in [0, capacity]"
                             f" = [0, {capacity}] (the basis holds {capacity} columns), got "
                             f"{r}")
    return n, math.prod(g.shape) // n


def bucket_sizes(capacity: int, rank_buckets: int) -> tuple[int, ...]:
    """Column counts of the projection branches: ``ceil(capacity·k/B)``, k = 1..B."""
    sizes = sorted({max(1, math.ceil(capacity * k / rank_buckets)) for k in
                    range(1, rank_buckets + 1)})
    return tuple(sizes)


def _project(g: jax.Array, basis: SubspaceBasis, n: int, cols: int, sizes: tuple[int, ...],
             precision: Any, implementation: str = "xla") -> jax.Array:
    """``g − V[:, :c] (V[:, :c]ᵀ g)`` with ``c`` the smallest bucket ≥ rank (0: identity)."""
    flat = g.reshape(n, cols)
    dtype = jnp.promote_types(flat.dtype, basis.vectors.dtype)
    v_all = basis.vectors.astype(dtype)

    def branch(c: int) -> Callable[[jax.Array], jax.Array]:
        def f(x: jax.Array) -> jax.Array:
            v = v_all[:, :c]
            if implementation == "pallas":
                # The fused kernel of kernels/projection.py; the Pallas interpreter on CPU.
                interpret = jax.default_backend() == "cpu"
                return project_out_fused(v, x.astype(dtype), interpret=interpret).astype(
                    x.dtype)
            coeff = jnp.matmul(v.T, x.astype(dtype), precision=precision)
            return (x - jnp.matmul(v, coeff, precision=precision)).astype(x.dtype)
        return f

    branches = [lambda x: x] + [branch(c) for c in sizes]
    # Branch 0 for rank 0, else 1 + #{sizes < rank}: the first bucket that holds the rank.
    index = jnp.where(
        basis.rank > 0, 1 + jnp.sum(jnp.asarray(sizes) < basis.rank), 0
    ).astype(jnp.int32)
    index = jnp.minimum(index, len(sizes))
    out = jax.lax.switch(index, branches, flat)
    return out.reshape(g.shape)


def subspace_projection(
    *,
    freeze_mask: PyTree | Callable[[PyTree], PyTree] | None = None,
    rank_buckets: int = 4,
    precision: jax.lax.PrecisionLike = jax.lax.Precision.HIGHEST,
    implementation: str = "xla",
) -> optax.GradientTransformationExtraArgs:
    """Removes from each update leaf its component in a protected input subspace (GPM).

    For a kernel ``W`` with a basis ``M`` (``n × r``, orthonormal columns) of the input
    space of the layer, the update ``G`` (``n × out``; a conv kernel ``(kh, kw, in, out)``
    is read as ``(kh·kw·in, out)``, the patch order of :mod:`clax.subspace.representations`)
    becomes

    .. math::

        G \\leftarrow G - M (M^\\top G) = (I - M M^\\top)\\, G,

    so ``Mᵀ G = 0``: for every old input ``x`` in the span of ``M`` the layer's output
    ``xᵀ W`` does not move. This is GPM's ``G ← G − reshape(G, (out, −1)) @ (M Mᵀ)`` for
    PyTorch's ``(out, in)`` weights, written for Flax's ``(in, out)`` layout (Saha, Garg,
    Roy, "Gradient Projection Memory for Continual Learning", ICLR 2021). Leaves without a
    basis pass through unchanged; ``rank = 0`` is the identity.

    Where to put it. As the first transform, ``optax.chain(subspace_projection(),
    optax.sgd(lr))``, it projects the raw gradient, as GPM does; with plain SGD (GPM's
    optimizer, no momentum) the update is then exactly orthogonal too. With momentum or
    Adam only the *gradient* is orthogonal: momentum mixes in earlier (differently
    projected) gradients and Adam rescales coordinates, so the update leaves the
    complement. For an exactly orthogonal *update*, put the transform after the optimizer:
    ``optax.chain(optax.adam(lr), subspace_projection())`` (``optimizer=clax.after(...)``
    in a `Method`).

    Cost. A leaf costs two ``n × c × out`` matmuls, where ``c`` is the basis size rounded
    up to a multiple of ``capacity / rank_buckets`` (one ``lax.switch`` branch per bucket,
    so the rank can grow without recompiling and the cost follows the rank, not the
    capacity); nothing at rank 0.

    Trees are matched by parameter path, not by container: ``bases`` and ``freeze_mask``
    may be pure dicts while the params and updates are the ``nnx.State`` that
    ``nnx.Optimizer`` passes (``optimizer.update(model, grads, bases=memory)``).

    Parameter-efficient training. Inside ``clax.params.train_only(tx, mask)``
    (``optax.partition``) the transform sees only the trainable leaves, the frozen ones as
    ``optax.MaskedNode``: bases kept for every kernel (:func:`clax.methods.gpm.gpm_memory`
    over the full params) then project the trainable kernels, and the bases at masked
    leaves are ignored (those leaves pass through and get the partition's zero update).
    A basis at any other path that is not a leaf of the updates is an error.

    Freezing (GPM's 1-D rule). With ``freeze_mask`` (a static pytree of bools like the
    params, or a callable ``params -> mask``, e.g. :func:`one_dimensional`), the selected
    leaves are set to zero while the ``freeze`` extra arg is true. By default ``freeze`` is
    "some basis has rank > 0", i.e. after the first task's bases were built, which is
    GPM's "zero BatchNorm/bias gradients for every task after the first".

    Args:
        freeze_mask: Leaves to zero once frozen; None freezes nothing.
        rank_buckets: Number of column buckets (``>= 1``); 1 always multiplies by the whole
            capacity (except at rank 0).
        precision: Matmul precision (``HIGHEST``: orthogonal to ~1e-6 in float32 even where
            the default precision uses bf16/TF32 passes).
        implementation: ``"xla"`` (two matmuls) or ``"pallas"`` (the fused kernel of
            ``kernels/projection.py``, float32 accumulation; run by the Pallas interpreter
            on CPU, where it is slow and only checks correctness; not yet checked or timed
            on a GPU).

    Returns:
        An ``optax.GradientTransformationExtraArgs`` (stateless: ``optax.EmptyState``).
        ``update(updates, state, params=None, *, bases, freeze=None)``: ``bases`` is a
        (partial) mirror of the params with a :class:`~clax.subspace.SubspaceBasis` at each
        projected leaf, or a flat ``{"layers/0/kernel": basis}`` / ``{path tuple: basis}``
        mapping; ``freeze`` an optional bool scalar (may be traced).

    Raises:
        TypeError: On a non-int ``rank_buckets``.
        ValueError: On ``rank_buckets < 1``; at update time, if ``bases`` is missing,
            names a path that is neither a leaf of the updates nor masked out in them
            (``optax.MaskedNode``), or has a basis whose dimension ``n`` is not its leaf's
            fan-in (the product of every axis but the last; the path, ``n`` and the
            expected fan-in are named), or a concrete rank outside ``[0, capacity]``
            (traced ranks are not checked).

    Examples:
        >>> import jax.numpy as jnp, optax, clax.subspace as cs
        >>> params = {"w": jnp.ones((3, 2))}
        >>> # Inputs along e0 (80% of the energy) and e1: a 0.9 threshold keeps e0 only.
        >>> reps = jnp.array([[2.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
        >>> basis = cs.grow_basis(cs.empty_basis(3), reps, 0.9)
        >>> tx = subspace_projection()
        >>> updates, _ = tx.update(params, tx.init(params), params, bases={"w": basis})
        >>> updates["w"]  # the protected input coordinate gets no update
        Array([[0., 0.],
               [1., 1.],
               [1., 1.]], dtype=float32)
    """
    rank_buckets = check_positive_int("rank_buckets", rank_buckets)
    implementation = check_choice("implementation", implementation, IMPLEMENTATIONS)

    def init_fn(params: PyTree) -> optax.EmptyState:
        del params
        return optax.EmptyState()

    def update_fn(
        updates: PyTree,
        state: optax.EmptyState,
        params: PyTree | None = None,
        *,
        bases: Any = None,
        freeze: Any = None,
        **extra_args: Any,
    ) -> tuple[PyTree, optax.EmptyState]:
        del extra_args
        if bases is None:
            raise ValueError(MISSING_BASES_MSG)
        by_path = bases_by_path(bases)
        pairs, treedef = jax.tree_util.tree_flatten_with_path(updates)
        names = [path_str(p) for p, _ in pairs]
        # Inside train_only / optax.partition the updates hold only the trainable leaves
        # (an optax.MaskedNode at each frozen one): the bases of frozen leaves are skipped.
        masked = frozenset(path_str(m) for m in masked_paths(updates))
        unknown = sorted(name for name in set(by_path) - set(names)
                         if not is_masked(name, masked))
        if unknown:
            raise ValueError(
                f"bases has a basis for {unknown[0]!r}, which is not a leaf of the updates; "
                f"leaves: {', '.join(names[:20])}{' ...' if len(names) > 20 else ''}"
            )
        out = []
        for name, (_, g) in zip(names, pairs, strict=True):
            basis = by_path.get(name)
            if basis is None:
                out.append(g)
                continue
            n, cols = _as_matrix(name, g, basis)
            sizes = bucket_sizes(basis.vectors.shape[1], rank_buckets)
            out.append(_project(g, basis, n, cols, sizes, precision, implementation))
        updates = jax.tree_util.tree_unflatten(treedef, out)

        if freeze_mask is not None:
            if freeze is None:
                ranks = [jnp.asarray(b.rank) for b in by_path.values()]
                active = jnp.any(jnp.stack(ranks) > 0) if ranks else jnp.asarray(False)
            else:
                active = jnp.asarray(freeze, jnp.bool_)
            mask = freeze_mask(params if params is not None else updates) if callable(
                freeze_mask) else freeze_mask
            # By path: a pure-dict mask fits the nnx.State updates of nnx.Optimizer too.
            mask = align_to(mask, updates, names=("freeze_mask", "the updates"),
                            check_shapes=False)
            updates = jax.tree.map(
                lambda g, m: jnp.where(active, jnp.zeros_like(g), g) if m else g,
                updates, mask,
            )
        return updates, state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
