"""Geometric-disentanglement unlearning (GU): forget updates orthogonal to the retain gradients.

Zhou et al., "Geometric Disentanglement for Machine Unlearning" (GU), arXiv 2511.17100,
2025; code ``Lemutisme/geo-unlearning`` (``src/trainer/unlearn/geometric.py``,
``GeometricUnlearn._finalize_gu_gradients``; the rank-k variant is ``orthograd.py``).

To first order, a step ``Δθ`` changes the retain loss by ``⟨g_r, Δθ⟩``. GU removes from
the forget gradient ``g_f`` its component along the retain gradient(s), so the forget
part of the step leaves the retain loss unchanged to first order, and optionally adds a
retain descent term: ``final = γ·(g_f − proj(g_f)) + α·g_r``.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from clax._validation import check_choice, check_real
from clax.params.paths import align_to, path_str
from clax.typing import PyTree

__all__ = [
    "GeometricUnlearningState",
    "geometric_disentanglement",
    "geometric_unlearning_adam",
]

_HI = jax.lax.Precision.HIGHEST
_SUBSPACES = ("mean", "span")
_GEOMETRIES = ("euclidean", "adam")


class GeometricUnlearningState(NamedTuple):
    """State of :func:`geometric_disentanglement`; a pytree."""

    count: jax.Array  # int32 (): updates so far (bias correction of ν)
    nu: PyTree  # float32, like the params: EMA of the squared outputs ("adam"); () otherwise


def _flat_paths(tree: PyTree) -> dict[str, Any]:
    return {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _select_retain(retain: PyTree, forget: PyTree) -> PyTree:
    try:
        return align_to(retain, forget, ("retain_grads", "the forget gradients"),
                        check_shapes=False, extra="drop")
    except ValueError as e:
        raise ValueError("retain_grads must have the tree structure of the forget gradients "
                         f"(matched by parameter path): {e}") from None


def _check_retain(forget: PyTree, retain: PyTree, *, stacked: bool) -> int:
    """Checks that ``retain`` is shaped like ``forget`` (with a leading axis k if stacked).

    Returns:
        k (1 when not stacked).
    """
    if jax.tree.structure(forget) != jax.tree.structure(retain):
        f, r = _flat_paths(forget), _flat_paths(retain)
        missing = sorted(set(f) - set(r))
        extra = sorted(set(r) - set(f))
        detail = []
        if missing:
            detail.append(f"missing leaf {missing[0]!r}")
        if extra:
            detail.append(f"unexpected leaf {extra[0]!r}")
        raise ValueError(
            "retain_grads must have the tree structure of the forget gradients: "
            + ("; ".join(detail) or f"{jax.tree.structure(retain)} vs "
               f"{jax.tree.structure(forget)}")
        )
    k = None
    for (path, f), r in zip(jax.tree_util.tree_flatten_with_path(forget)[0],
                            jax.tree.leaves(retain), strict=False):
        fs, rs = tuple(jnp.shape(f)), tuple(jnp.shape(r))
        if stacked:
            ok = len(rs) == len(fs) + 1 and rs[1:] == fs and (k is None or rs[0] == k)
            want = f"(k, {', '.join(map(str, fs))})" + ("" if k is None else f" with k={k}")
        else:
            ok = rs == fs
            want = str(fs)
        if not ok:
            raise ValueError(
                f"retain_grads at {path_str(path)!r} has shape {rs}; expected {want} "
                + ("(per-example retain gradients stacked on a leading axis, subspace='span')"
                   if stacked else "(the mean retain gradient, subspace='mean')")
            )
        if stacked:
            k = rs[0]
    if k == 0:
        raise ValueError(
            "retain_grads must stack k >= 1 per-example retain gradients on a leading axis "
            "(subspace='span'), got k=0 (every leaf has a leading axis of length 0)")
    return 1 if k is None else k


def _vdot(a: PyTree, b: PyTree) -> jax.Array:
    parts = [jnp.vdot(x, y, precision=_HI)
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=False)]
    return sum(parts, jnp.zeros((), jnp.float32))


def _gram_schmidt(rows: jax.Array, tolerance: float) -> jax.Array:
    """Orthonormal rows spanning ``rows`` (k, P), by double Gram-Schmidt (CGS2).

    Row ``i`` is reorthogonalised twice against the kept rows before it; it is kept (and
    normalised) if its residual norm exceeds ``max(tolerance, 8·eps32)·‖rows[i]‖``, else
    it becomes a zero row (a dependent direction), as in GU's ``orthograd.py``.
    """
    thr = max(float(tolerance), 8 * float(jnp.finfo(jnp.float32).eps))

    def body(i, q):
        g = rows[i]
        v = g - jnp.matmul(jnp.matmul(q, g, precision=_HI), q, precision=_HI)
        v = v - jnp.matmul(jnp.matmul(q, v, precision=_HI), q, precision=_HI)
        norm = jnp.linalg.norm(v)
        keep = norm > thr * jnp.linalg.norm(g)
        return q.at[i].set(jnp.where(keep, v / jnp.where(keep, norm, 1.0), 0.0))

    return jax.lax.fori_loop(0, rows.shape[0], body, jnp.zeros_like(rows))


def geometric_disentanglement(
    *,
    gamma: float = 1.0,
    alpha: float = 1.0,
    subspace: str = "mean",
    geometry: str = "euclidean",
    b2: float = 0.999,
    eps: float = 1e-8,
    tolerance: float = 1e-5,
    projection_eps: float = 1e-12,
) -> optax.GradientTransformationExtraArgs:
    r"""GU: removes from the forget gradient its component along the retain gradient(s).

    ``update(forget_grads, state, params, retain_grads=...)``. ``forget_grads`` is the
    gradient of the forget objective to *minimise* (e.g. gradient ascent: the gradient of
    ``−NLL`` on the forget set; see :mod:`clax.unlearning.losses`), ``retain_grads`` the
    gradient(s) of the retain loss. With ``ĝ = g / sqrt(D)`` (the metric, below):

    .. math::

       \text{subspace="mean"}: \quad
         \hat g_f^{⊥} &= \hat g_f - \frac{⟨\hat g_f, \hat g_r⟩}{\max(‖\hat g_r‖^2, ε_p)}\,
         \hat g_r \quad (\text{rank 1: the mean retain gradient}) \\
       \text{subspace="span"}: \quad
         \hat g_f^{⊥} &= \hat g_f - \textstyle\sum_i ⟨\hat g_f, q_i⟩ q_i, \quad
         \{q_i\} = \text{orthonormalised } \{\hat g_{r,i}\}_{i=1}^{k} \\
       \text{final} &= γ\,\hat g_f^{⊥} + α\,\bar{\hat g}_r, \qquad
       \text{output} = \text{final}·\sqrt{D}

    where ``ḡ_r`` is the retain gradient (its mean over the k examples in ``"span"``
    mode). The inner products are **global**: one coefficient over all leaves, not one per
    tensor (GU projects the concatenated gradient). ``"span"`` orthonormalises the
    per-example gradients by double Gram-Schmidt and drops a dependent one (residual
    ``<= max(tolerance, 8·eps32)·‖g_{r,i}‖``), as GU's ``orthograd.py``.

    Geometry: ``"euclidean"``: ``D = 1``. ``"adam"``: GU's optimizer geometry,
    ``D = sqrt(v̂) + eps`` with ``v̂ = ν/(1 − b2^k)`` the bias-corrected second moment of
    the downstream Adam before this step (``D = 1`` at the first step, where Adam has no
    state yet). The transform keeps ν itself, as the EMA of its own squared outputs, which
    is exactly the ``ν`` of a following ``optax.scale_by_adam(b1=0, b2=b2, eps=eps)`` (GU
    asserts β1 = 0: with momentum the metric argument breaks); use
    :func:`geometric_unlearning_adam` for that chain. Adam then steps
    ``−lr·output/D' ≈ −lr·final/sqrt(D)``, where ``D'`` includes this step's output (as in
    GU's code), so the retain invariance is exact in the metric ``D`` and approximate for
    the applied step: close once ``v̂`` has settled (β2 = 0.999, random gradients: the
    cosine between the applied step and ``g_r`` is ~0.002-0.02 after ten steps, against
    ~0.85 without GU), but the first steps leak (at the first, ``D = 1`` while Adam's
    step is sign-like; cosines up to ~0.2-0.4 in the first three). For an exactly
    invariant step use ``"euclidean"`` with plain SGD.

    First-order retain invariance (projection only, ``α = 0``): ``⟨ĝ_r, final⟩ = 0``,
    i.e. ``⟨g_r, output/D⟩ = 0`` (for every per-example ``g_{r,i}`` in ``"span"`` mode);
    with ``D = 1``, ``⟨g_r, output⟩ = 0``. With ``α > 0`` the retain term adds
    ``α‖ĝ_r‖²`` of retain descent.

    Example::

        tx = geometric_unlearning_adam(1e-4, gamma=1.0, alpha=1.0)
        g_f = jax.grad(forget_loss)(params, forget_batch)   # e.g. gradient ascent / NPO
        g_r = jax.grad(retain_loss)(params, retain_batch)
        updates, state = tx.update(g_f, state, params, retain_grads=g_r)

    Args:
        gamma: Weight ``γ >= 0`` of the projected forget gradient (GU default 1).
        alpha: Weight ``α >= 0`` of the retain gradient (GU default 1; 0 = projection
            only).
        subspace: ``"mean"`` (rank 1, GU's ``geometric.py``; ``retain_grads`` shaped like
            the params) or ``"span"`` (rank k, ``orthograd.py``; each ``retain_grads``
            leaf has a leading axis of k per-example gradients).
        geometry: ``"euclidean"`` or ``"adam"`` (see above).
        b2: Second-moment decay of the downstream Adam, in ``[0, 1)`` (``"adam"`` geometry).
        eps: Adam's epsilon, ``> 0`` (``"adam"`` geometry).
        tolerance: Relative residual below which a per-example retain gradient counts as
            dependent (``"span"``).
        projection_eps: Floor ``ε_p > 0`` of ``‖ĝ_r‖²`` in the rank-1 coefficient (GU:
            1e-12); a zero retain gradient leaves the forget gradient unchanged.

    Returns:
        An ``optax.GradientTransformationExtraArgs`` with
        :class:`GeometricUnlearningState`; ``update`` needs the keyword extra arg
        ``retain_grads``.

    Raises:
        TypeError: On a hyperparameter of the wrong type (e.g. a str ``gamma``).
        ValueError: On a hyperparameter that is not finite or out of range (``gamma``,
            ``alpha``, ``tolerance >= 0``; ``eps``, ``projection_eps > 0``;
            ``0 <= b2 < 1``); at update time on a missing ``retain_grads``, a tree
            structure that differs from the forget gradients', a leaf of the wrong shape
            (naming the leaf path), or, with ``"span"``, ``k = 0`` stacked retain
            gradients.

    References:
        Zhou et al., "Geometric Disentanglement for Machine Unlearning",
        https://arxiv.org/abs/2511.17100, 2025.
    """
    check_choice("subspace", subspace, _SUBSPACES)
    check_choice("geometry", geometry, _GEOMETRIES)
    gamma, alpha, tolerance = (
        check_real(name, value, 0.0, math.inf, low_open=False, high_open=True)
        for name, value in (("gamma", gamma), ("alpha", alpha), ("tolerance", tolerance)))
    b2 = check_real("b2", b2, 0.0, 1.0, low_open=False, high_open=True)
    # Both are divisors' floors: 0 turns a zero retain gradient / second moment into NaN.
    eps, projection_eps = (
        check_real(name, value, 0.0, math.inf, low_open=True, high_open=True)
        for name, value in (("eps", eps), ("projection_eps", projection_eps)))
    adam = geometry == "adam"
    stacked = subspace == "span"

    def init_fn(params: PyTree) -> GeometricUnlearningState:
        nu = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params) if adam else ()
        return GeometricUnlearningState(count=jnp.zeros((), jnp.int32), nu=nu)

    def update_fn(
        updates: PyTree, state: GeometricUnlearningState, params: PyTree | None = None, *,
        retain_grads: PyTree = None, **extra_args,
    ) -> tuple[PyTree, GeometricUnlearningState]:
        del params, extra_args
        if retain_grads is None:
            raise ValueError(
                "geometric_disentanglement: missing keyword extra arg `retain_grads` (the "
                + ("per-example retain gradients, each leaf stacked on a leading axis"
                   if stacked else "mean retain gradient, shaped like the params")
                + "): call tx.update(forget_grads, state, params, retain_grads=...)"
            )
        # By path: retain gradients over every parameter fit the updates of the trainable
        # ones only (inside clax.params.train_only / optax.partition), so the projection
        # and its global inner products run over the trainable leaves.
        retain_grads = _select_retain(retain_grads, updates)
        _check_retain(updates, retain_grads, stacked=stacked)
        forget = jax.tree.map(lambda g: g.astype(jnp.float32), updates)
        retain = jax.tree.map(lambda g: g.astype(jnp.float32), retain_grads)
        if adam:
            k = state.count
            correction = 1.0 - b2 ** jnp.maximum(k, 1).astype(jnp.float32)
            root_d = jax.tree.map(
                lambda v: jnp.where(k > 0, jnp.sqrt(jnp.sqrt(v / correction) + eps), 1.0),
                state.nu,
            )  # sqrt(D)
            forget = jax.tree.map(jnp.divide, forget, root_d)
            if stacked:
                retain = jax.tree.map(lambda r, s: r / s[None], retain, root_d)
            else:
                retain = jax.tree.map(jnp.divide, retain, root_d)

        if stacked:
            leaves_f, treedef = jax.tree.flatten(forget)
            leaves_r = jax.tree.leaves(retain)
            k = leaves_r[0].shape[0] if leaves_r else 0
            rows = jnp.concatenate([r.reshape(k, -1) for r in leaves_r], axis=1)
            flat_f = jnp.concatenate([f.reshape(-1) for f in leaves_f])
            q = _gram_schmidt(rows, tolerance)
            coeff = jnp.matmul(q, flat_f, precision=_HI)
            flat = gamma * (flat_f - jnp.matmul(coeff, q, precision=_HI))
            flat = flat + alpha * jnp.mean(rows, axis=0)
            offsets, total = [], 0
            for f in leaves_f[:-1]:
                total += f.size
                offsets.append(total)
            splits = jnp.split(flat, offsets)
            final = treedef.unflatten([s.reshape(f.shape)
                                       for s, f in zip(splits, leaves_f, strict=False)])
        else:
            c = _vdot(forget, retain) / jnp.maximum(_vdot(retain, retain), projection_eps)
            final = jax.tree.map(lambda f, r: gamma * (f - c * r) + alpha * r, forget, retain)

        if adam:
            final = jax.tree.map(jnp.multiply, final, root_d)
            nu = jax.tree.map(lambda v, o: b2 * v + (1.0 - b2) * jnp.square(o), state.nu, final)
        else:
            nu = state.nu
        out = jax.tree.map(lambda o, g: o.astype(jnp.result_type(g)), final, updates)
        return out, GeometricUnlearningState(count=optax.safe_increment(state.count), nu=nu)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def geometric_unlearning_adam(
    learning_rate: optax.ScalarOrSchedule,
    *,
    gamma: float = 1.0,
    alpha: float = 1.0,
    subspace: str = "mean",
    b2: float = 0.999,
    eps: float = 1e-8,
    tolerance: float = 1e-5,
) -> optax.GradientTransformationExtraArgs:
    """GU in Adam geometry followed by the β1 = 0 Adam it assumes, then the learning rate.

    ``chain(geometric_disentanglement(geometry="adam", b2=b2, eps=eps, ...),
    scale_by_adam(b1=0, b2=b2, eps=eps), scale_by_learning_rate(learning_rate))``: the
    second moment GU whitens with is exactly the Adam's. See
    :func:`geometric_disentanglement` for the rule and the arguments.
    """
    return optax.chain(
        geometric_disentanglement(gamma=gamma, alpha=alpha, subspace=subspace, geometry="adam",
                                  b2=b2, eps=eps, tolerance=tolerance),
        optax.scale_by_adam(b1=0.0, b2=b2, eps=eps),
        optax.scale_by_learning_rate(learning_rate),
    )
