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

Choosing α. The batch Fisher of a batch of ``B`` examples is, in expectation,
``ḡ² + σ²/B`` (mean gradient squared plus per-example variance over ``B``). At a trained
model the full-data mean gradient ``ḡ_D`` is near zero, so ``[]_D ≈ σ_D²/B``, while the
forget class keeps its mean term ``ḡ_f²``: the selection ``[]_{D_f} > α []_D`` behaves
like a threshold on ``α/B``, and α must be re-tuned when the Fisher batch size changes
(measured in ``benchmarks/results/unlearn_ssd.md``: on a small Fashion-MNIST CNN, α = 10 at
B = 64 dampens 8-32 % of the entries and costs 10-49 retain-accuracy points, while the
right α at B = 64, 50 or 100 depending on the class, forgets it as fully and keeps retain
accuracy; :func:`ssd_search_alpha` finds it from the forget set alone). With the exact
per-example Fisher (``granularity="example"``, mean-normalised) over ``D ⊇ D_f``,
``[]_D >= (|D_f|/|D|)·[]_{D_f}`` entry-wise, so ``α >= |D|/|D_f|`` selects nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from clax._validation import check_real, check_sequence
from clax.fisher.estimators import check_fisher
from clax.params.paths import path_str
from clax.typing import PyTree


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
    return check_real(name, value, 0.0, math.inf, low_open=True, high_open=True)


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


def _refuse_tracers(**args: Any) -> None:
    """A TypeError naming the first argument with a traced leaf (ssd_dampen under jit)."""
    for name, tree in args.items():
        if any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(tree)):
            raise TypeError(
                f"ssd_dampen got a traced {name}: it is a one-shot host-side edit (it checks "
                "the Fisher on the host and returns a report of Python ints); call it outside "
                "jax.jit / vmap / grad, or use clax.edits.ssd_apply inside jitted code")


def ssd_dampen(
    params: PyTree,
    fisher_full: PyTree,
    fisher_forget: PyTree,
    *,
    alpha: float = 10.0,
    lam: float = 1.0,
) -> tuple[PyTree, SSDReport]:
    """Selective synaptic dampening of `params` (see the module docstring for the rule).

    A one-shot, host-side edit: it checks the Fisher values on the host and returns a
    report of Python ints, so call it outside ``jax.jit`` (it is jitted inside). Traced
    arguments raise a ``TypeError``; in jitted code use :func:`ssd_apply`, the same edit as
    a pure function (no checks, the counts as arrays).

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
        TypeError: On a non-number ``α`` or ``λ``; when called inside a jax transformation
            (``jit``, ``vmap``, ``grad``: an argument is a tracer).
        ValueError: On ``α`` or ``λ`` not finite and > 0; on a Fisher whose structure or
            shapes differ from params, or with negative or non-finite entries (naming the
            leaf path).
    """
    _refuse_tracers(params=params, fisher_full=fisher_full, fisher_forget=fisher_forget,
                    alpha=alpha, lam=lam)
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


DEFAULT_SEARCH_ALPHAS = (1000.0, 500.0, 300.0, 200.0, 150.0, 100.0, 70.0, 50.0, 30.0, 20.0,
                         10.0, 5.0, 3.0, 2.0)


class SSDSearchResult(NamedTuple):
    """Outcome of :func:`ssd_search_alpha`."""

    params: PyTree  # the edit at `alpha`
    report: SSDReport
    alpha: float  # the largest α tried whose forget accuracy reached the target
    reached: bool  # False: no α reached it; the edit at the smallest α is returned
    trace: list[tuple[float, float, int]]  # (α, forget accuracy, entries dampened), in order


def ssd_search_alpha(
    params: PyTree,
    fisher_full: PyTree,
    fisher_forget: PyTree,
    *,
    forget_accuracy: Callable[[PyTree], float],
    target: float,
    alphas: Sequence[float] = DEFAULT_SEARCH_ALPHAS,
    lam: float = 1.0,
) -> SSDSearchResult:
    """SSD with the most selective α that removes the forget set (a clax addition).

    SSD's selection is nested in α (a larger α selects a subset of the entries a smaller α
    selects) and the scale ``β`` does not depend on α, so trying α from large to small
    dampens more and more entries. This returns the first (largest) α of `alphas` whose
    edited model has ``forget_accuracy(params) <= target``, e.g. the forget-*train*
    accuracy, which the unlearner has, with ``target`` near that of a model that never saw
    the data (~0 for a whole class). Only the forget set is evaluated, never retain or test
    data. It exists because the α that works depends on the Fisher batch size and on the
    class (see the module docstring), while a fixed α either dampens nothing or far more
    than needed. Not in the SSD paper.

    Args:
        params, fisher_full, fisher_forget, lam: As in :func:`ssd_dampen`.
        forget_accuracy: ``params -> float`` accuracy of the edited model on forget data.
        target: Stop at the first α whose forget accuracy is ``<= target`` (in ``[0, 1]``).
        alphas: Candidate α values (> 0), tried from the largest to the smallest.

    Returns:
        An :class:`SSDSearchResult`. If no α reaches the target, ``reached`` is False and
        the edit at the smallest α is returned (check ``reached``; ``trace`` shows how far
        each α got).

    Raises:
        TypeError: On a non-number target, α or λ, or `alphas` not a list or tuple.
        ValueError: On an empty `alphas`, an α or λ that is not finite and > 0, a target
            outside ``[0, 1]``, or bad Fisher input (see :func:`ssd_dampen`).
    """
    target = check_real("target (an accuracy)", target, 0.0, 1.0, low_open=False,
                        high_open=False)
    alphas = check_sequence("alphas", alphas, _check_positive, allow_empty=False)
    ordered = sorted(alphas, reverse=True)
    trace: list[tuple[float, float, int]] = []
    for alpha in ordered:
        new, report = ssd_dampen(params, fisher_full, fisher_forget, alpha=alpha, lam=lam)
        acc = float(forget_accuracy(new))
        trace.append((alpha, acc, report.num_dampened))
        if acc <= target:
            return SSDSearchResult(new, report, alpha, True, trace)
    return SSDSearchResult(new, report, ordered[-1], False, trace)
