r"""Selective Synaptic Dampening (SSD): retraining-free unlearning by Fisher ratios.

Foster, Schoepf and Brintrup, "Fast Machine Unlearning Without Retraining Through Selective
Synaptic Dampening", AAAI 2024 (https://arxiv.org/abs/2308.07707); code
``if-loops/selective-synaptic-dampening`` (``src/ssd.py``, ``ParameterPerturber``).

Given the diagonal Fisher (importance) of the full training data ``[]_D`` and of the forget
set ``[]_{D_f}``, every parameter entry ``θ_j`` (all parameters: conv/dense kernels,
biases, normalisation scales, the head) is edited as

.. math::

    \text{selected}_j = []_{D_f,j} > α\,[]_{D,j} \quad(\text{strict}),\qquad
    β_j = \min\!\Big(\frac{λ\,[]_{D,j}}{[]_{D_f,j}},\ 1\Big),\qquad
    θ_j ← \begin{cases} β_j θ_j & \text{selected} \\ θ_j & \text{otherwise.}\end{cases}

A selected entry has ``[]_{D_f,j} > α·[]_{D,j} >= 0``, so the ratio is always defined
(``[]_D = 0`` gives ``β = 0``). ``β <= 1``: parameters are only ever shrunk. Unselected
entries are returned bit-identical. SSD's defaults are ``λ = 1`` (``dampening_constant``)
and ``α = 10`` (``selection_weighting``), with the importances computed by
:func:`clax.fisher.diagonal_fisher` with ``labels="empirical"``, ``granularity="batch"``,
``normalization="mean"``, batch size 64, the model in evaluation mode, on the full
training set (not the retain set) and on the forget set.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from clax.fisher.estimators import check_fisher
from clax.params.paths import path_str

PyTree = Any


class SSDReport(NamedTuple):
    """What :func:`ssd_dampen` changed, per parameter path (``"layers/0/kernel"``)."""

    dampened: dict[str, int]  # entries selected (and multiplied by β < 1 or = 1)
    total: dict[str, int]  # entries of the parameter
    alpha: float
    lam: float

    @property
    def num_dampened(self) -> int:
        """Selected entries over all parameters."""
        return sum(self.dampened.values())

    @property
    def num_total(self) -> int:
        """Entries over all parameters."""
        return sum(self.total.values())

    def by_layer(self) -> dict[str, tuple[int, int]]:
        """``{path: (dampened, total)}``."""
        return {k: (self.dampened[k], self.total[k]) for k in self.total}


def _check_positive(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _dampen_leaf(p: jax.Array, full: jax.Array, forget: jax.Array, alpha, lam):
    full = full.astype(jnp.float32)
    forget = forget.astype(jnp.float32)
    selected = forget > alpha * full
    beta = jnp.minimum(lam * full / jnp.where(selected, forget, 1.0), 1.0)
    dampened = (p.astype(jnp.float32) * beta).astype(p.dtype)
    return jnp.where(selected, dampened, p), jnp.sum(selected, dtype=jnp.int32)


@jax.jit
def ssd_apply(params: PyTree, fisher_full: PyTree, fisher_forget: PyTree, alpha: float,
              lam: float) -> tuple[PyTree, PyTree]:
    """The SSD edit as a pure jittable function (no argument checks; see :func:`ssd_dampen`).

    Returns:
        ``(new_params, counts)``; ``counts`` is a tree like params of int32 scalars, the
        number of selected entries of each leaf.
    """
    out = jax.tree.map(lambda p, f, g: _dampen_leaf(p, f, g, alpha, lam),
                       params, fisher_full, fisher_forget)
    treedef = jax.tree.structure(params)
    pairs = treedef.flatten_up_to(out)
    return (jax.tree.unflatten(treedef, [a for a, _ in pairs]),
            jax.tree.unflatten(treedef, [c for _, c in pairs]))


def ssd_dampen(
    params: PyTree,
    fisher_full: PyTree,
    fisher_forget: PyTree,
    *,
    alpha: float = 10.0,
    lam: float = 1.0,
) -> tuple[PyTree, SSDReport]:
    """Selective synaptic dampening of `params` (see the module docstring for the rule).

    Args:
        params: Parameter tree (all of it is edited: kernels, biases, norms, head).
        fisher_full: Diagonal Fisher of the full training data ``D``, like params.
        fisher_forget: Diagonal Fisher of the forget set ``D_f``, like params.
        alpha: Selection weighting ``α > 0`` (select where ``F_f > α·F_D``).
        lam: Dampening constant ``λ > 0`` (``β = min(λ·F_D/F_f, 1)``).

    Returns:
        ``(new_params, report)``: the edited parameters (same dtypes; unselected entries
        bit-identical) and an :class:`SSDReport` of dampened entries per path.

    Raises:
        ValueError: On ``α`` or ``λ`` not finite and > 0; on a Fisher whose structure or
            shapes differ from params, or with negative or non-finite entries (naming the
            leaf path).
    """
    alpha = _check_positive("alpha", alpha)
    lam = _check_positive("lam", lam)
    check_fisher(fisher_full, params, name="fisher_full")
    check_fisher(fisher_forget, params, name="fisher_forget")
    new, counts = ssd_apply(params, fisher_full, fisher_forget, alpha, lam)
    dampened, total = {}, {}
    for (path, c), p in zip(jax.tree_util.tree_flatten_with_path(counts)[0],
                            jax.tree.leaves(params), strict=True):
        dampened[path_str(path)] = int(c)
        total[path_str(path)] = int(np.size(p))
    return new, SSDReport(dampened=dampened, total=total, alpha=alpha, lam=lam)
