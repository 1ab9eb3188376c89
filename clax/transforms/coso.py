"""CoSO: Continuous Subspace Optimization for continual learning, as an optax transform.

Cheng et al., "Continuous Subspace Optimization for Continual Learning", NeurIPS 2025;
official code ``quinn-ch/CoSO`` (``coso/coso_projector.py``: ``DoubleSVD``,
``CoSOProjector``; ``coso/adamw.py``: ``CoSOAdamW``; ``models/coso.py``: the task-boundary
reset). The update rule is in :func:`coso`; the task-boundary merge in
:func:`merge_sketch` and :func:`coso_task_end`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from clax._validation import check_positive_int, check_real
from clax.params.paths import (
    align_to,
    is_masked,
    leaves_by_path,
    masked_paths,
    path_str,
    plain_path,
    strip_variables,
)
from clax.subspace.basis import SubspaceBasis, check_threshold, empty_basis
from clax.subspace.frequent_directions import (
    FrequentDirections,
    init_sketch,
    update_sketch_from_svd,
)
from clax.typing import PyTree

MaskOrFn = PyTree | Callable[[PyTree], PyTree] | None

__all__ = [
    "CoSOState",
    "coso",
    "coso_bases",
    "coso_mask",
    "coso_task_end",
    "merge_sketch",
    "reset_coso_state",
]

_HI = jax.lax.Precision.HIGHEST


class CoSOState(NamedTuple):
    """State of :func:`coso`; a pytree. Per-leaf fields are trees shaped like the params
    with ``None`` at leaves that do not use CoSO."""

    count: jax.Array  # int32 (): steps since the task started; 0 = fresh inner state + refresh
    projectors: PyTree  # per CoSO leaf: float32 (n, r), P (orthonormal columns; 0 before use)
    sketches: PyTree  # per CoSO leaf: FrequentDirections (n, ℓ) of this task's gradients
    inner: optax.OptState  # inner optimizer state over the proxy tree (low-rank (m, r) leaves)


def coso_mask(params: PyTree, mask: MaskOrFn = None) -> PyTree:
    """Resolves ``mask`` to a tree of bools (True = the leaf uses CoSO).

    Args:
        params: Parameter (or gradient) tree.
        mask: None (every leaf with ``ndim >= 2``), a bool tree shaped like ``params``,
            or a callable ``params -> bool tree``.

    Returns:
        A tree of Python bools shaped like ``params``.

    Raises:
        TypeError: If a mask leaf is not a bool (naming its path).
        ValueError: If a leaf marked True has fewer than 2 dimensions (naming its path), or
            the mask tree does not match ``params``.
    """
    if mask is None:
        resolved = jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)
    else:
        resolved = mask(params) if callable(mask) else mask
    pairs, treedef = jax.tree_util.tree_flatten_with_path(params)
    try:
        flags = treedef.flatten_up_to(resolved)
    except (ValueError, TypeError):
        # Matched by path: a pure-dict mask against the nnx.State of nnx.Optimizer, or a
        # mask over every parameter against the trainable part train_only hands over.
        try:
            flags = treedef.flatten_up_to(align_to(
                resolved, params, ("the coso mask", "the params"), check_shapes=False))
        except ValueError as e:
            raise ValueError("coso mask must be a tree of bools shaped like the params "
                             f"(matched by parameter path): {e}") from e
    for (path, p), flag in zip(pairs, flags, strict=False):
        if not isinstance(flag, (bool, jnp.bool_)) and not (
            hasattr(flag, "dtype") and flag.shape == () and flag.dtype == bool
        ):
            raise TypeError(f"coso mask at {path_str(path)!r} must be a bool, got {flag!r} "
                            f"({type(flag).__name__})")
        if bool(flag) and jnp.ndim(p) < 2:
            raise ValueError(
                f"coso mask selects {path_str(path)!r} of shape {jnp.shape(p)}; CoSO needs a "
                "weight with >= 2 dims (a Dense (in, out) or conv (kh, kw, in, out) kernel)"
            )
    return treedef.unflatten([bool(f) for f in flags])


def _matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """(m, n): a kernel (..., out) as a matrix (fan-in, out); conv patches are (kh, kw, in)."""
    m = 1
    for d in shape[:-1]:
        m *= d
    return m, shape[-1]


def coso_bases(params: PyTree, *, mask: MaskOrFn = None, capacity: int | None = None) -> PyTree:
    """Empty historical bases: a :class:`SubspaceBasis` of dimension ``out`` per CoSO leaf.

    Args:
        params: Parameter tree.
        mask: Which leaves use CoSO (see :func:`coso_mask`).
        capacity: Columns per basis (default and maximum: the leaf's output dimension).

    Returns:
        A tree shaped like ``params``: an empty ``SubspaceBasis`` (n, min(capacity, n))
        at CoSO leaves (``n`` = last axis of the kernel), ``None`` elsewhere.
    """
    flags = coso_mask(params, mask)

    def make(p, flag):
        if not flag:
            return None
        n = jnp.shape(p)[-1]
        return empty_basis(n, n if capacity is None else min(capacity, n))

    return jax.tree.map(make, params, flags)


def _entry(x) -> bool:
    """The per-leaf entries of CoSO's trees: ``None`` (not a CoSO leaf), a basis, a sketch."""
    return x is None or isinstance(x, (SubspaceBasis, FrequentDirections))


def _per_leaf(treedef, updates: PyTree, tree: PyTree, what: str) -> list:
    """`tree`'s entry at each leaf of the updates, matched by parameter path.

    A pure dict fits the ``nnx.State`` that ``nnx.Optimizer`` passes, and a tree over every
    parameter (the method's bases) fits the updates of only the trainable ones (inside
    ``clax.params.train_only`` / ``optax.partition``: ``optax.MaskedNode`` at the frozen
    leaves, which pass through). Every leaf of the updates needs an entry.
    """
    try:
        aligned = align_to(tree, updates, (what, "the gradients"), check_shapes=False,
                           extra="drop", is_leaf=_entry)
    except ValueError as e:
        raise ValueError(f"coso: {what} must be a tree shaped like the gradients "
                         f"(matched by parameter path): {e}") from e
    return treedef.flatten_up_to(aligned)


def _check_basis(path, basis, shape) -> None:
    _, n = _matrix_shape(shape)
    if not isinstance(basis, SubspaceBasis):
        raise TypeError(
            f"coso: bases at {path_str(path)!r} must be a SubspaceBasis for the CoSO weight "
            f"of shape {shape}, got {type(basis).__name__} (build bases with coso_bases)"
        )
    vshape = tuple(jnp.shape(basis.vectors))
    if len(vshape) != 2 or vshape[0] != n or vshape[1] > n:
        raise ValueError(
            f"coso: basis at {path_str(path)!r} has vectors of shape {vshape}; the weight of "
            f"shape {shape} needs (n={n}, capacity <= {n}) (its output dimension)"
        )


def _projector(v: jax.Array, s: jax.Array, previous: jax.Array, rtol: float) -> jax.Array:
    """``P`` from the top singular vectors ``v`` (n, r), with two fixes of SVD arbitrariness.

    * Sign: a singular vector's sign is arbitrary (LAPACK's choice can flip between two
      nearly equal matrices). Each column is signed to agree with the same column of the
      previous ``P`` (so Adam's moments, which are not rotated, keep accumulating the same
      coordinate), or at a task's first refresh so that its largest entry is positive.
    * Rank: columns whose singular value is at most ``rtol·σ₁`` are zeroed. Adam's
      per-coordinate normalisation gives every kept direction a step of about the learning
      rate whatever its singular value, and a direction of a tiny (or zero) singular value
      is ill-determined (it moves by ``‖δG‖/gap`` for a rounding-level change ``δG`` of the
      gradient, and is arbitrary at 0), so keeping it turns rounding noise into full-size
      steps. With a zeroed column Adam sees an exact 0 there and leaves it alone.
    """
    overlap = jnp.sum(previous * v, axis=0)
    peak = jnp.take_along_axis(v, jnp.argmax(jnp.abs(v), axis=0)[None, :], axis=0)[0]
    sign = jnp.where(overlap != 0, jnp.sign(overlap), jnp.where(peak < 0, -1.0, 1.0))
    keep = (s > rtol * s[0]).astype(v.dtype)
    return v * (sign * keep)[None, :]


def coso(
    *,
    proj_rank: int = 16,
    sketch_rank: int = 32,
    update_interval: int = 1,
    sketch_decay: float = 1.0,
    rank_rtol: float = 1e-2,
    inner: optax.GradientTransformation | None = None,
    scale: float = 1.0,
    mask: MaskOrFn = None,
) -> optax.GradientTransformationExtraArgs:
    r"""CoSO's projected low-rank inner optimizer (Cheng et al., NeurIPS 2025).

    For each CoSO weight (a Dense kernel ``(in, out)``, or a conv kernel
    ``(kh, kw, in, out)`` viewed as ``(kh·kw·in, out)``) with gradient ``G`` (m × n) and
    historical basis ``Q`` (n × q, the ``bases=`` extra arg), each step:

    .. math::

       G &← G - (G Q) Qᵀ && \text{(orthogonal to the previous tasks, output side)} \\
       \text{if } k \bmod \text{update\_interval} = 0:\ & G = X S Vᵀ,\
          P ← V_{:, :r},\ \text{FD sketch} ← \text{FD}(\text{sketch}, G) \\
       g &= G P \quad (m × r) && \text{(low-rank gradient)} \\
       u &= \text{inner}(g) \quad && \text{(Adam: } \hat m / (\sqrt{\hat v} + ε)) \\
       \text{update} &= \text{scale} · u Pᵀ && (m × n,\ \text{reshaped to the kernel})

    ``k`` counts the steps since the task started (``CoSOState.count``). The Frequent
    Directions sketch (:mod:`clax.subspace.frequent_directions`, CoSO's ``DoubleSVD``)
    reuses the step's SVD: the rows of ``G`` (output-space vectors) are compressed to
    ``ℓ = sketch_rank`` directions and merged with ``sketch_decay ·`` the old sketch. At
    the task end :func:`coso_task_end` appends the sketch's energy-threshold directions to
    ``Q`` (:func:`merge_sketch`) and resets the sketch, ``P`` and the count; the inner
    state is re-initialised by the first update that sees ``count == 0``. Leaves not
    selected by ``mask`` get the plain inner optimizer (CoSO trains its
    classifier head with plain AdamW).

    Mapping from the PyTorch code (``W`` is ``(out, in)`` there, ``(in, out)`` here): the
    projection ``G − Q(QᵀG)`` on the row (output) space becomes ``G − (GQ)Qᵀ``, and
    ``P = U[:, :r]`` of ``svd(G_torch)`` is ``V[:, :r]`` of ``svd(G)``. As in the code:
    the historical projection comes before the SVD (``P`` and the sketch live in the
    complement of ``Q``), the SVD is refreshed every ``update_interval`` steps (CoSO's
    ``update_proj_gap``, 1 in every config) and always at a task's first step, and the
    Adam moments are **not** rotated when ``P`` changes (plain GaLore behaviour).

    Differences from the code: (1) Adam's ``ε`` is added to the bias-corrected
    ``sqrt(v̂)`` (optax) instead of the raw ``sqrt(v)`` (HF AdamW); with ``eps=1e-6`` this
    is negligible. (2) The learning rate, schedule and weight decay are not part of this
    transform: it returns the Adam direction, so chain it with ``optax.sgd(lr)`` (or
    ``scale_by_learning_rate``), as the clax training loop does with
    ``config.optimizer``; ``scale`` multiplies the output. (3) Ranks larger than the
    matrix are clipped (``r = min(proj_rank, m, n)``, ``ℓ = min(sketch_rank, n)``) and
    missing singular values count as zero, where the PyTorch code raises. (4) Two fixes
    of the SVD's arbitrariness in ``P`` (the sketch is unaffected): each column's sign is
    aligned with the previous ``P`` (a task's first refresh: largest entry positive), so
    the unrotated Adam moments keep accumulating the same coordinate instead of a sign that
    LAPACK may flip from one step to the next; and columns with ``σ_j <= rank_rtol·σ₁`` are
    zeroed (ill-determined directions that Adam's normalisation would otherwise turn into
    full-size steps of rounding noise; they carry less than ``rank_rtol²`` of the energy
    each). Both matter mostly for small layers with a few dominant directions; with
    ``rank_rtol=0`` only the sign alignment remains.

    Relation to :func:`optax.contrib.scale_by_galore`: the plumbing is the same (an inner
    gradient transformation run on a tree of low-rank "proxy" gradients, projected back),
    but GaLore cannot be reused as is: it picks the projection side by shape (left if
    ``m >= n``) while CoSO always projects on the output side, it takes the SVD of the raw
    gradient (CoSO needs it after the historical projection) and does not expose the
    singular values the sketch needs, and it has no historical basis nor task reset.

    Fixed shapes: ``r``, ``ℓ`` and the basis capacity are static, the refresh is a
    ``lax.cond`` on the traced count, so one compilation serves the whole run.

    Example::

        tx = optax.chain(coso(proj_rank=8, sketch_rank=16), optax.sgd(1e-3))
        state, bases = tx.init(params), coso_bases(params)
        updates, state = tx.update(grads, state, params, bases=bases)  # each step
        ...
        bases, coso_state = coso_task_end(bases, state[0], threshold=0.98)  # task end
        state = (coso_state, *state[1:])

    Args:
        proj_rank: ``r``, rank of the low-rank gradient (CoSO: 15 on CIFAR-100, 50 on
            ImageNet-R, for 768-wide weights).
        sketch_rank: ``ℓ``, directions in the FD sketch (CoSO: 100 / 120).
        update_interval: Steps between SVD refreshes of ``P`` and the sketch (CoSO: 1).
        sketch_decay: Weight of the old sketch in each FD merge, in ``(0, 1]`` (CoSO's
            configs: 1.0).
        rank_rtol: Columns of ``P`` whose singular value is ``<= rank_rtol·σ₁`` are zeroed
            (difference 4 above); 0 keeps every column but exact zeros.
        inner: Gradient transformation run in the low-rank space (and on the other
            leaves); it is called with ``params=None``. Default
            ``optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-6)``, CoSO's AdamW without the
            learning rate.
        scale: Factor applied to the output updates.
        mask: Which leaves use CoSO: None (every leaf with ``ndim >= 2``), a bool tree or a
            callable ``params -> bool tree``.

    Returns:
        An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs the keyword
        extra arg ``bases``: a tree shaped like the params with a
        :class:`~clax.subspace.basis.SubspaceBasis` ``(out, capacity)`` at every CoSO leaf
        and ``None`` elsewhere (see :func:`coso_bases`). The bases (and a static ``mask``)
        are matched to the gradients by parameter path: pure dicts fit the ``nnx.State``
        of ``nnx.Optimizer``, and bases over every parameter fit the trainable part that
        ``clax.params.train_only(tx, mask)`` (``optax.partition``) hands the transform
        (``optax.MaskedNode`` at the frozen leaves, which pass through; their bases are
        neither read nor, in :func:`coso_task_end`, grown). Every gradient leaf needs an
        entry (a basis or ``None``).

    Raises:
        TypeError: On a hyperparameter of the wrong type (e.g. a float ``proj_rank``); at
            update time, if a CoSO weight's basis is not a ``SubspaceBasis``.
        ValueError: On hyperparameters out of range (or a non-finite ``scale``); at update
            time on a missing ``bases`` or one that does not fit its weight (naming the
            parameter path and shapes).

    References:
        Cheng et al., "Continuous Subspace Optimization for Continual Learning",
        NeurIPS 2025. Zhao et al., "GaLore", https://arxiv.org/abs/2403.03507. Liberty,
        "Simple and Deterministic Matrix Sketching", KDD 2013.
    """
    proj_rank = check_positive_int("proj_rank", proj_rank)
    sketch_rank = check_positive_int("sketch_rank", sketch_rank)
    update_interval = check_positive_int("update_interval", update_interval)
    sketch_decay = check_real("sketch_decay", sketch_decay, 0.0, 1.0, low_open=True,
                              high_open=False)
    scale = check_real("scale", scale, -math.inf, math.inf, low_open=True, high_open=True)
    rank_rtol = check_real("rank_rtol", rank_rtol, 0.0, 1.0, low_open=False, high_open=True)
    if inner is None:
        inner = optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-6)

    def ranks(shape):
        m, n = _matrix_shape(shape)
        return m, n, min(proj_rank, m, n), min(sketch_rank, n)

    def proxies(tree: PyTree, flags: PyTree) -> PyTree:
        def proxy(p, flag):
            if not flag:
                return jnp.zeros(jnp.shape(p), jnp.result_type(p))
            m, _, r, _ = ranks(jnp.shape(p))
            return jnp.zeros((m, r), jnp.float32)

        return jax.tree.map(proxy, tree, flags)

    def init_fn(params: PyTree) -> CoSOState:
        # nnx.Optimizer initialises with an nnx.State of nnx.Param: build the state from
        # the arrays (as its updates come), not inside the Param wrappers, where a sketch
        # (a NamedTuple) would be one wrapped value that nnx.update turns into an nnx.State.
        # (The projectors and low-rank moments do not have the parameters' shapes either.)
        params = strip_variables(params)
        flags = coso_mask(params, mask)

        def projector(p, flag):
            if not flag:
                return None
            _, n, r, _ = ranks(jnp.shape(p))
            return jnp.zeros((n, r), jnp.float32)

        def sketch(p, flag):
            if not flag:
                return None
            _, n, _, ell = ranks(jnp.shape(p))
            return init_sketch(n, ell)

        return CoSOState(
            count=jnp.zeros((), jnp.int32),
            projectors=jax.tree.map(projector, params, flags),
            sketches=jax.tree.map(sketch, params, flags),
            inner=inner.init(proxies(params, flags)),
        )

    def update_fn(
        updates: PyTree, state: CoSOState, params: PyTree | None = None, *, bases: PyTree = None,
        **extra_args,
    ) -> tuple[PyTree, CoSOState]:
        del params, extra_args
        if bases is None:
            raise ValueError(
                "coso: missing keyword extra arg `bases` (a tree shaped like the params with a "
                "SubspaceBasis at every CoSO weight, None elsewhere; see coso_bases): call "
                "tx.update(grads, state, params, bases=...)"
            )
        flags = coso_mask(updates, mask)
        pairs, treedef = jax.tree_util.tree_flatten_with_path(updates)
        flag_list = treedef.flatten_up_to(flags)
        basis_list = _per_leaf(treedef, updates, bases, "bases")
        proj_list = _per_leaf(treedef, updates, state.projectors, "state.projectors")
        sketch_list = _per_leaf(treedef, updates, state.sketches, "state.sketches")
        count = state.count
        refresh = count % update_interval == 0

        # A task's first step starts from a fresh inner state (CoSO deletes the Adam moments
        # at each task start); any inner transformation is reset exactly by its own init.
        fresh = inner.init(proxies(updates, flags))
        inner_state = jax.tree.map(
            lambda f, s: jnp.where(count == 0, f, s), fresh, state.inner
        )

        low, new_proj, new_sketch = [], [], []
        for (path, g), flag, basis, proj, sk in zip(
            pairs, flag_list, basis_list, proj_list, sketch_list, strict=False
        ):
            if not flag:
                low.append(g)
                new_proj.append(None)
                new_sketch.append(None)
                continue
            shape = tuple(jnp.shape(g))
            _check_basis(path, basis, shape)
            m, n, r, _ = ranks(shape)
            grad = g.reshape(m, n).astype(jnp.float32)
            q = basis.vectors.astype(jnp.float32)  # zero padding columns: no mask needed
            grad = grad - jnp.matmul(jnp.matmul(grad, q, precision=_HI), q.T, precision=_HI)

            def do_refresh(grad, proj, sk, r=r):
                _, s, vh = jnp.linalg.svd(grad, full_matrices=False)
                v = vh.T  # (n, min(m, n)): output-space singular vectors
                return _projector(v[:, :r], s[:r], proj, rank_rtol), update_sketch_from_svd(
                    sk, v, s, decay=sketch_decay)

            def keep(grad, proj, sk):
                del grad
                return proj, sk

            proj, sk = jax.lax.cond(refresh, do_refresh, keep, grad, proj, sk)
            low.append(jnp.matmul(grad, proj, precision=_HI))
            new_proj.append(proj)
            new_sketch.append(sk)

        low_updates, inner_state = inner.update(treedef.unflatten(low), inner_state, None)
        low_updates = treedef.flatten_up_to(low_updates)
        out = []
        for (_, g), flag, u, proj in zip(pairs, flag_list, low_updates, new_proj, strict=False):
            if flag:
                u = jnp.matmul(u, proj.T, precision=_HI).reshape(jnp.shape(g))
            out.append((scale * u).astype(jnp.result_type(g)))
        new_state = CoSOState(
            count=optax.safe_increment(count),
            projectors=treedef.unflatten(new_proj),
            sketches=treedef.unflatten(new_sketch),
            inner=inner_state,
        )
        return treedef.unflatten(out), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def merge_sketch(
    basis: SubspaceBasis, sketch: FrequentDirections, threshold: float | jax.Array
) -> SubspaceBasis:
    """Appends the sketch's leading directions to the basis (CoSO's task-end rule).

    CoSO's ``update_historical_space``: with ``σ`` the sketch's weights,
    ``r = #{k : cumsum(σ²)/Σσ² [k] < threshold}`` (strict ``<``: the direction whose
    cumulative energy reaches the threshold is *not* added; a single dominant direction
    above the threshold adds nothing) and ``Q ← [Q, U_sketch[:, :r]]``, truncated at the
    basis capacity. This is CoSO's code, not GPM's :func:`~clax.subspace.basis.grow_basis`:
    the energy is the sketch's own (it already lives in the complement of ``Q``), and GPM's
    incremental rule would add one more direction (the one crossing the threshold).

    CoSO does not re-orthogonalise ``Q``; the sketch's directions come from gradients
    projected orthogonal to ``Q`` so they are orthogonal to it up to rounding. Here they
    are projected once more and passed through a QR (as ``grow_basis`` does), which
    changes them only by float rounding but keeps ``QᵀQ = I`` to ~1e-6 over many tasks.

    Args:
        basis: The historical basis ``Q`` (n, capacity).
        sketch: The task's sketch, directions (n, ℓ).
        threshold: Energy threshold in ``(0, 1)`` (CoSO: 0.98).

    Returns:
        The grown basis (same shapes and dtypes); jit-able (``threshold`` may be traced).
    """
    check_threshold(threshold)
    n, capacity = basis.vectors.shape
    if sketch.directions.shape[0] != n:
        raise ValueError(
            f"sketch directions {sketch.directions.shape} do not fit basis vectors "
            f"{basis.vectors.shape} (need the same first dimension)"
        )
    work = jnp.float32
    q = basis.vectors.astype(work)
    sig2 = jnp.square(sketch.sigma.astype(work))
    total = jnp.sum(sig2)
    ratio = sig2 / jnp.where(total > 0, total, 1.0)
    r = jnp.where(total > 0, jnp.sum(jnp.cumsum(ratio) < threshold), 0).astype(jnp.int32)
    u = sketch.directions.astype(work)
    u = u - jnp.matmul(q, jnp.matmul(q.T, u, precision=_HI), precision=_HI)
    u, rr = jnp.linalg.qr(u)
    u = u * jnp.where(jnp.diagonal(rr) < 0, -1.0, 1.0)[None, :]
    cols = jnp.arange(capacity)
    src = cols - basis.rank
    take = (src >= 0) & (src < r)
    gathered = jnp.take(u, jnp.clip(src, 0, u.shape[1] - 1), axis=1)
    vectors = jnp.where(take[None, :], gathered, q).astype(basis.vectors.dtype)
    rank = jnp.minimum(basis.rank + r, capacity).astype(jnp.int32)
    return SubspaceBasis(vectors=vectors, rank=rank)


def reset_coso_state(state: CoSOState) -> CoSOState:
    """What CoSO resets at a task start: the sketch, ``P`` and the step count.

    The inner (Adam) state is re-initialised by the next update, which sees ``count == 0``
    (CoSO deletes the moments and sets ``step = 0``); the projector is recomputed then too.
    """
    return CoSOState(
        count=jnp.zeros_like(state.count),
        projectors=jax.tree.map(jnp.zeros_like, state.projectors),
        sketches=jax.tree.map(jnp.zeros_like, state.sketches),
        inner=state.inner,
    )


def coso_task_end(
    bases: PyTree, state: CoSOState, *, threshold: float | jax.Array
) -> tuple[PyTree, CoSOState]:
    """Task boundary: merges every sketch into its basis and resets the CoSO state.

    Args:
        bases: The historical bases (see :func:`coso_bases`).
        state: The :class:`CoSOState` after training the task.
        threshold: Energy threshold of :func:`merge_sketch`, in ``(0, 1)``.

    Returns:
        ``(new_bases, new_state)``, same structures, shapes and dtypes.
    """
    check_threshold(threshold)
    pairs, treedef = jax.tree_util.tree_flatten_with_path(bases, is_leaf=_entry)
    # By path: the bases may cover more parameters than the state (kept over every
    # parameter while the transform, inside train_only / optax.partition, saw only the
    # trainable ones). A basis whose leaf the state masks out (optax.MaskedNode: a frozen
    # leaf, which got no gradient) is kept as it is.
    sketches = leaves_by_path(state.sketches, is_leaf=_entry)
    masked = frozenset(path_str(m) for m in masked_paths(state.sketches))
    merged = []
    for path, basis in pairs:
        sketch = sketches.get(plain_path(path))
        if basis is None or (sketch is None and is_masked(plain_path(path), masked)):
            merged.append(basis)
            continue
        if not isinstance(sketch, FrequentDirections):
            raise TypeError(f"coso_task_end: no sketch in the state for {path_str(path)!r}")
        merged.append(merge_sketch(basis, sketch, threshold))
    return treedef.unflatten(merged), reset_coso_state(state)
