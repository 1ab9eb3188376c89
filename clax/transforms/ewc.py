r"""Elastic weight consolidation (EWC), online EWC and L2-to-anchor as optax transforms.

Kirkpatrick et al., "Overcoming catastrophic forgetting in neural networks", PNAS 2017
(https://arxiv.org/abs/1612.00796); online EWC: Schwarz et al., "Progress & Compress",
ICML 2018 (https://arxiv.org/abs/1805.06370).

**Convention (½ and scale).** The penalty, for a diagonal Fisher ``F`` and an anchor
``θ*``, is

.. math::

    Ω(θ) = \frac{λ}{2} \sum_j F_j (θ_j − θ^*_j)^2, \qquad ∇Ω = λ\, F ⊙ (θ − θ^*),

i.e. Kirkpatrick et al.'s ``½`` is included and the transforms add exactly
``λ·F⊙(θ − θ*)`` to the incoming gradient (chain them *before* the optimizer, as
``Method.transform`` does: then any optimizer sees the gradient of ``loss + Ω``). ``F`` is
whatever :func:`clax.fisher.diagonal_fisher` (or the caller) provides. To reuse a ``λ`` from
another library, match both the ``½`` and the Fisher estimator:

* Avalanche ``EWCPlugin(ewc_lambda)`` adds ``ewc_lambda·Σ F(θ − θ*)²`` (no ½) with
  ``F`` = empirical, ``granularity="batch"``, ``normalization="mean"``, batch size
  ``train_mb_size``: use ``λ = 2·ewc_lambda`` with that Fisher.
* GT-RIPL Continual-Learning-Benchmark ``EWC(reg_coef)`` adds ``reg_coef·Σ F(θ − θ*)²`` (no
  ½) with ``F = B·`` (argmax labels, ``granularity="batch"``, ``normalization="mean"``):
  use ``λ = 2·B·reg_coef`` with that Fisher; near a minimum ``B`` times the batch Fisher
  is close to the per-example one, so ``λ ≈ 2·reg_coef`` with
  ``diagonal_fisher(..., labels="argmax", granularity="example")``.
  Its ``L2(reg_coef)`` is :func:`l2_penalty` with ``λ = 2·reg_coef``.

**Several tasks.** Separate per-task penalties ``Σ_t (λ/2) Σ_j F_{t,j}(θ_j − θ*_{t,j})²``
have gradient ``λ·(S_F ⊙ θ − S_{Fθ})`` with ``S_F = Σ_t F_t`` and ``S_{Fθ} = Σ_t F_t ⊙ θ*_t``,
which is ``λ·S_F ⊙ (θ − θ̄*)`` with the Fisher-weighted anchor ``θ̄* = S_{Fθ} / S_F`` (any
value where ``S_F = 0``). :func:`consolidate_ewc` keeps this fixed-capacity form
(``mode="separate"``, as Avalanche's ``mode='separate'``) or the online one
(``mode="online"``: ``F ← γ·F + F_new``, ``θ* ←`` latest parameters).

The Fisher and anchor arrive as keyword extra args each step (``fisher=``, ``anchor=``),
so they can live in a method's memory (``clax.methods.ewc``) or in user code; nothing
task-specific is kept in the optimizer state (a per-task optimizer reset cannot erase it).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from clax._validation import check_choice, check_params_given, check_real
from clax.fisher.estimators import check_fisher
from clax.params.paths import (
    align_to,
    check_same_structure,
    leaves_by_path,
    path_str,
    plain_path,
    pure_tree,
)
from clax.typing import PyTree

MODES = ("separate", "online")


def _check_lam(lam: Any) -> float:
    return check_real("lam (λ)", lam, 0.0, math.inf, low_open=False, high_open=True)


def _check_decay(decay: Any) -> float:
    return check_real("decay (γ)", decay, 0.0, 1.0, low_open=False, high_open=False)


def _is_scalar(x: Any) -> bool:
    return not isinstance(x, (dict, list, tuple)) and jnp.ndim(x) == 0


ALIASED_ANCHOR_MSG = (
    "anchor is the live parameters: anchor and params are the same {what} at {path!r}, so "
    "θ − θ* is 0 at every step and the penalty does nothing (nnx.state(model, nnx.Param) "
    "is a view of the model, not a snapshot). Pass a copy taken when the task ends, e.g. "
    "anchor = jax.tree.map(jnp.copy, nnx.to_pure_dict(nnx.state(model, nnx.Param)))"
)


def check_anchor_not_params(anchor: PyTree, params: PyTree) -> None:
    """Raises if `anchor` is (a view of) the parameters themselves.

    Compares Python identities, leaf by leaf (matched by path): the same ``nnx.Variable``
    objects (``anchor=nnx.state(model, nnx.Param)``), or the same arrays / tracers
    (``nnx.Optimizer`` unwraps both the parameters and that state to the very same
    arrays, eagerly and under ``nnx.jit``). A copy (``jnp.copy``) never matches.

    Raises:
        ValueError: Naming ``anchor`` and the first aliased path.
    """
    def wrapped(tree):
        pairs = jax.tree_util.tree_flatten_with_path(
            tree, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
        return {plain_path(p): x for p, x in pairs}

    for by_path, kinds, what in ((wrapped, nnx.Variable, "nnx.Variable"),
                                 (leaves_by_path, (jax.Array, np.ndarray), "array")):
        ps = by_path(params)
        for path, a in by_path(anchor).items():
            # Python scalars are interned: only array (tracer) or Variable identity counts.
            if isinstance(a, kinds) and ps.get(path) is a:
                raise ValueError(ALIASED_ANCHOR_MSG.format(what=what, path=path_str(path)))


def _penalty_update(lam: float, fisher: PyTree | None, anchor: PyTree, updates: PyTree,
                    params: PyTree) -> PyTree:
    # Every tree is read by path in the structure of the updates: pure dicts and the
    # nnx.State that nnx.Optimizer passes (or nnx.Param-wrapped leaves) mix freely. The
    # Fisher and anchor may cover more parameters than the updates (memory over every
    # parameter, inside train_only / optax.partition, which hands this transform only the
    # trainable leaves and an optax.MaskedNode at each frozen one): the leaves of the
    # updates are selected by path, the masked ones pass through untouched. Every update
    # leaf still needs its Fisher and anchor entry.
    check_anchor_not_params(anchor, params)
    params = align_to(params, updates, names=("params", "the updates"), extra="drop")
    anchor = align_to(anchor, params, names=("anchor", "params"), extra="drop")
    if fisher is None or _is_scalar(fisher):
        concrete = fisher is not None and not isinstance(fisher, jax.core.Tracer)
        if concrete and not (float(fisher) >= 0 and math.isfinite(float(fisher))):
            raise ValueError(f"a scalar fisher must be finite and >= 0, got {fisher!r}")
        scale = lam if fisher is None else lam * jnp.asarray(fisher, jnp.float32)

        def add(u, p, a):
            return (u + (scale * (p - a)).astype(u.dtype)).astype(u.dtype)

        return jax.tree.map(add, updates, params, anchor)
    fisher = align_to(fisher, params, names=("fisher", "params"), extra="drop")
    check_fisher(fisher, params)

    def add_f(u, p, f, a):
        return (u + (lam * f * (p - a)).astype(u.dtype)).astype(u.dtype)

    return jax.tree.map(add_f, updates, params, fisher, anchor)


def ewc_penalty(*, lam: float) -> optax.GradientTransformationExtraArgs:
    r"""Adds the EWC penalty gradient ``λ·F⊙(θ − θ*)`` to the updates.

    ``update(updates, state, params, *, fisher, anchor)``:

    .. math::  u ← u + λ\,F ⊙ (θ − θ^*)

    the gradient of ``(λ/2) Σ F(θ − θ*)²`` (see the module docstring for the ½ and the
    Fisher scale, and how separate per-task penalties reduce to one ``(F, θ*)``).

    Args:
        lam: ``λ >= 0``.

    Returns:
        A stateless ``GradientTransformationExtraArgs``. Its ``update`` requires ``params``
        and the keyword extra args ``fisher`` (a tree like params, or a scalar applied to
        every entry) and ``anchor`` (a tree like params). Other extra args are ignored.
        Trees are matched by parameter path, so pure dicts, ``nnx.State`` (as
        ``nnx.Optimizer`` passes params and updates) and ``nnx.Param``-wrapped leaves
        mix: ``optimizer.update(model, grads, fisher=F, anchor=theta_star)`` works with
        ``F``, ``theta_star`` pure dicts (e.g. an :class:`EWCMemory`'s fields). ``fisher``
        and ``anchor`` may cover more parameters than the updates: inside
        ``clax.params.train_only(tx, mask)`` (``optax.partition``) the transform sees only
        the trainable leaves, and the penalty is ``λ·F⊙(θ − θ*)`` on those, read from a
        memory kept over every parameter (the frozen leaves, ``optax.MaskedNode`` there,
        pass through and get the partition's zero update).

    Raises:
        TypeError: On a non-number ``λ``.
        ValueError: On ``λ < 0``; at update time, when ``params`` is None, ``fisher`` or
            ``anchor`` is missing, lacks a path of the updates or has a different shape
            there (naming the leaf path), ``anchor`` *is* the parameters (``anchor=nnx.state(model,
            nnx.Param)``, the live state: pass a copy,
            ``jax.tree.map(jnp.copy, nnx.to_pure_dict(nnx.state(model, nnx.Param)))``), or
            a concrete ``fisher`` has a negative or non-finite entry (naming the leaf
            path; traced values are not checked).
    """
    lam = _check_lam(lam)

    def init_fn(params: PyTree) -> optax.EmptyState:
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None, *, fisher=None, anchor=None, **extra_args):
        del extra_args
        check_params_given(params, "ewc_penalty")
        if fisher is None or anchor is None:
            raise ValueError(
                "ewc_penalty needs the keyword extra args fisher= and anchor= "
                "(tx.update(grads, state, params, fisher=F, anchor=theta_star))"
            )
        return _penalty_update(lam, fisher, anchor, updates, params), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def l2_penalty(*, lam: float) -> optax.GradientTransformationExtraArgs:
    r"""Adds ``λ·(θ − θ*)``: the gradient of ``(λ/2)‖θ − θ*‖²`` (L2 to an anchor).

    The rehearsal-free "L2" baseline (EWC with ``F = 1``). GT-RIPL's ``L2(reg_coef)``, which
    adds ``reg_coef·‖θ − θ*‖²`` with the latest task's parameters as anchor, is
    ``λ = 2·reg_coef``.

    Args:
        lam: ``λ >= 0``.

    Returns:
        A stateless ``GradientTransformationExtraArgs``; ``update`` requires ``params`` and
        the keyword extra arg ``anchor`` (a tree like params, matched by path: a pure dict
        or an ``nnx.State``). The anchor must be a *copy*:
        ``anchor=nnx.state(model, nnx.Param)`` is the live parameters (``θ − θ* = 0``
        always) and is refused; take
        ``jax.tree.map(jnp.copy, nnx.to_pure_dict(nnx.state(model, nnx.Param)))``.

    Raises:
        TypeError: On a non-number ``λ``.
        ValueError: On ``λ < 0``; at update time, on missing params/anchor, an anchor
            lacking a path of the updates or with a different shape there (naming the
            leaf path; extra paths, e.g. frozen leaves under ``train_only``, are
            ignored), or an anchor
            that is the parameters themselves (naming ``anchor``).
    """
    lam = _check_lam(lam)

    def init_fn(params: PyTree) -> optax.EmptyState:
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None, *, anchor=None, **extra_args):
        del extra_args
        check_params_given(params, "l2_penalty")
        if anchor is None:
            raise ValueError("l2_penalty needs the keyword extra arg anchor=")
        return _penalty_update(lam, None, anchor, updates, params), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def ewc_penalty_value(params: PyTree, fisher: PyTree, anchor: PyTree, *, lam: float
                      ) -> jax.Array:
    """``(λ/2)·Σ F⊙(θ − θ*)²``, the penalty whose gradient :func:`ewc_penalty` adds."""
    lam = _check_lam(lam)
    # Over the leaves of `params` (a Fisher and anchor over more parameters are selected).
    fisher = align_to(fisher, params, names=("fisher", "params"), extra="drop")
    anchor = align_to(anchor, params, names=("anchor", "params"), extra="drop")
    terms = jax.tree.map(lambda p, f, a: jnp.sum(f * jnp.square(p - a)), params, fisher, anchor)
    return 0.5 * lam * sum(jax.tree.leaves(terms))


# --------------------------------------------------------------------------- consolidation


class EWCMemory(NamedTuple):
    """Fixed-capacity EWC memory: the ``(F, θ*)`` passed to :func:`ewc_penalty`.

    ``mode="separate"``: ``fisher = S_F = Σ_t F_t``, ``anchor = θ̄* = S_{Fθ}/S_F`` (``θ*`` of
    the latest task where ``S_F = 0``), ``weighted_anchor = S_{Fθ} = Σ_t F_t⊙θ*_t``.
    ``mode="online"``: ``fisher = Σ_t γ^{T−t} F_t``, ``anchor`` = latest parameters,
    ``weighted_anchor = ()``. Before the first consolidation everything is zero (no penalty).
    """

    fisher: PyTree  # float32, like params
    anchor: PyTree  # like params (same dtypes)
    weighted_anchor: PyTree  # float32, like params ("separate"); () ("online")
    count: jax.Array  # int32 (): consolidations so far


def init_ewc_memory(params: PyTree, *, mode: str = "separate") -> EWCMemory:
    """Empty :class:`EWCMemory` for `params` (zero Fisher: no penalty yet).

    `params` may be a pure dict or an ``nnx.State``; the memory holds pure dicts (copies).
    """
    check_choice("mode", mode, MODES)
    params = pure_tree(params)
    zeros = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)
    return EWCMemory(
        fisher=zeros,
        anchor=jax.tree.map(lambda p: jnp.array(p, copy=True), params),
        weighted_anchor=jax.tree.map(jnp.copy, zeros) if mode == "separate" else (),
        count=jnp.zeros((), jnp.int32),
    )


@jax.jit
def _consolidate_separate(memory: EWCMemory, fisher: PyTree, params: PyTree) -> EWCMemory:
    total = jax.tree.map(jnp.add, memory.fisher, fisher)
    weighted = jax.tree.map(lambda w, f, p: w + f * p.astype(jnp.float32),
                            memory.weighted_anchor, fisher, params)

    def anchor(s, w, p):
        return jnp.where(s > 0, w / jnp.where(s > 0, s, 1.0), p.astype(jnp.float32)
                         ).astype(p.dtype)

    return EWCMemory(fisher=total, anchor=jax.tree.map(anchor, total, weighted, params),
                     weighted_anchor=weighted, count=memory.count + 1)


@jax.jit
def _consolidate_online(memory: EWCMemory, fisher: PyTree, params: PyTree, decay) -> EWCMemory:
    total = jax.tree.map(lambda old, new: decay * old + new, memory.fisher, fisher)
    return EWCMemory(fisher=total, anchor=jax.tree.map(jnp.copy, params), weighted_anchor=(),
                     count=memory.count + 1)


def consolidate_ewc(
    memory: EWCMemory, fisher: PyTree, params: PyTree, *, mode: str = "separate",
    decay: float = 1.0,
) -> EWCMemory:
    r"""Adds a finished task's Fisher ``F_new`` and parameters ``θ`` to the memory (pure).

    * ``"separate"``: ``S_F ← S_F + F_new``, ``S_{Fθ} ← S_{Fθ} + F_new⊙θ``,
      ``θ̄* = S_{Fθ}/S_F``; the penalty gradient ``λ·S_F⊙(θ − θ̄*)`` equals the sum of the
      per-task ones, ``λ·Σ_t F_t⊙(θ − θ*_t)``, with memory independent of the task count.
    * ``"online"``: ``F ← γ·F + F_new`` and ``θ* ← θ`` (Schwarz et al. 2018; Avalanche's
      ``decay_factor``; GT-RIPL's ``EWC_online`` is ``γ = 1``).

    Args:
        memory: From :func:`init_ewc_memory` (same ``mode``) or a previous consolidation.
        fisher: ``F_new``, a non-negative finite tree like params.
        params: ``θ`` at the end of the task.
        mode: ``"separate"`` or ``"online"``.
        decay: ``γ ∈ [0, 1]`` (``"online"`` only).

    Returns:
        The new memory, same structure, shapes and dtypes.

    Raises:
        TypeError: On a non-str ``mode`` or a non-number ``γ``.
        ValueError: On a bad mode or ``γ``; on a Fisher whose structure differs from params
            or with negative / non-finite entries (naming the leaf path).
    """
    check_choice("mode", mode, MODES)
    decay = _check_decay(decay)
    memory, fisher, params = pure_tree((memory, fisher, params))  # nnx.State: as dicts
    check_fisher(fisher, params, name="fisher")
    check_same_structure(memory.fisher, params, names=("memory.fisher", "params"))
    fisher = jax.tree.map(lambda f: jnp.asarray(f, jnp.float32), fisher)
    if mode == "separate":
        if memory.weighted_anchor == ():
            raise ValueError('memory was made for mode="online"; it has no weighted_anchor')
        return _consolidate_separate(memory, fisher, params)
    return _consolidate_online(memory, fisher, params, jnp.float32(decay))
