r"""Unlearners registered with the `Unlearner` contract: GA, NPO (with or without GU), SSD, ACU.

Build them with ``clax.core.make_unlearner(name, ...)``; the unlearning driver
(`clax.training.unlearn`) builds ``config.unlearn.name`` with the hyperparameters of
``config.unlearn.<name>``.

Gradient procedures (``ga``, ``npo``) are written on the objective's per-example losses
``ℓ_i(θ) = objective.per_example_loss`` (cross-entropy for a classifier, the mean
next-token cross-entropy of a sequence for a language model), so the same unlearner
serves both. With ``log π_θ(y_i|x_i) = −ℓ_i(θ)`` on a forget batch ``B_f`` and a retain
batch ``B_r``:

.. math::

   L_{GA} &= -\frac{1}{|B_f|}\sum_{i∈B_f} ℓ_i(θ) \\
   L_{NPO} &= \frac{2}{β}\,\frac{1}{|B_f|}\sum_{i∈B_f}
       \mathrm{softplus}\big(β\,(ℓ_i(θ_{ref}) - ℓ_i(θ))\big) \\
   L_r &= \frac{1}{|B_r|}\sum_{i∈B_r} ℓ_i(θ)

For a `Classification` objective without logit masks these are exactly
:func:`clax.unlearning.gradient_ascent_loss`, :func:`clax.unlearning.npo_loss` and
:func:`clax.unlearning.retain_loss` (the tests check it). For a language model ``ℓ_i`` is
the per-token mean, so NPO's log-ratio is length-normalised (open-unlearning sums it over
the tokens of a sequence).

The update: without GU, the gradient of ``γ·L_f + α·L_r`` goes to the optimizer (α = 0:
plain GA / NPO; α > 0: "GradDiff"). With ``gu=True`` the gradient of ``L_f`` goes through
:func:`clax.transforms.disentangle.geometric_disentanglement` before the optimizer, with
the retain gradient(s) as the extra arg ``retain_grads`` (GU, Zhou et al. 2025:
``γ·(ĝ_f − proj_{ĝ_r} ĝ_f) + α·ĝ_r``, rank 1 from the mean retain gradient, or rank k from
``gu_k`` per-example retain gradients with ``gu_subspace="span"``).

One-shot edits: ``ssd`` (selective synaptic dampening, :mod:`clax.edits.ssd`) and ``acu``
(the exact recursive-least-squares downdate of an ``acil`` model, :mod:`clax.analytic.rls`).
"""

from __future__ import annotations

import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from clax._validation import check_bool, check_choice, check_positive_int, check_real
from clax.analytic import rls
from clax.core import (
    Batch,
    Classification,
    TrainArrays,
    TrainState,
    UnlearnContext,
    Unlearner,
    UnlearnStepContext,
    before,
    plain,
    register_unlearner,
    take,
)
from clax.edits.ssd import DEFAULT_SEARCH_ALPHAS, ssd_dampen, ssd_search_alpha
from clax.fisher import diagonal_fisher
from clax.transforms.disentangle import geometric_disentanglement
from clax.typing import PyTree

__all__ = ["acu", "ga", "npo", "ssd"]

_SUBSPACES = ("mean", "span")
_GEOMETRIES = ("euclidean", "adam")
_GRANULARITIES = ("batch", "example")
_FEATURE_BATCH = 1024


def _weight(name: str, value: Any) -> float:
    return check_real(name, value, 0.0, math.inf, low_open=False, high_open=True)


# ----------------------------------------------------------------------------- GA / NPO


def _gradient_unlearner(name: str, forget_loss, *, forget_weight: float, retain_weight: float,
                        gu: bool, gu_subspace: str, gu_geometry: str, gu_k: int, gu_b2: float,
                        gu_eps: float) -> Unlearner:
    """``γ·L_f + α·L_r`` (no GU) or ``L_f`` through GU's projection (module docstring)."""
    gamma = _weight("forget_weight", forget_weight)
    alpha = _weight("retain_weight", retain_weight)
    gu = check_bool("gu", gu)
    subspace = check_choice("gu_subspace", gu_subspace, _SUBSPACES)
    geometry = check_choice("gu_geometry", gu_geometry, _GEOMETRIES)
    k = check_positive_int("gu_k", gu_k)
    b2 = check_real("gu_b2", gu_b2, 0.0, 1.0, low_open=False, high_open=True)
    eps = check_real("gu_eps", gu_eps, 0.0, math.inf, low_open=True, high_open=True)

    if not gu:
        def loss(params, forget: Batch, retain: Batch, ctx: UnlearnStepContext) -> jax.Array:
            total = gamma * forget_loss(params, forget, ctx)
            if alpha:
                total = total + alpha * ctx.loss(params, retain)
            return total

        return Unlearner(name=name, optimizer=plain, loss=loss)

    def gu_loss(params, forget: Batch, retain: Batch, ctx: UnlearnStepContext) -> jax.Array:
        del retain
        return forget_loss(params, forget, ctx)

    def retain_grads(params, forget: Batch, retain: Batch, ctx: UnlearnStepContext
                     ) -> dict[str, PyTree]:
        del forget
        if subspace == "mean":
            return {"retain_grads": jax.grad(ctx.loss)(params, retain)}
        n = int(np.shape(retain.task_ids)[0])
        if k > n:
            raise ValueError(f"gu_k={k} per-example retain gradients need a retain batch of at "
                             f"least {k} examples, got {n}: lower gu_k or raise "
                             "config.unlearn.retain_batch_size")
        first = take(retain, slice(0, k))

        def one(example: Batch) -> PyTree:
            single = jax.tree.map(lambda a: a[None], example)
            return jax.grad(ctx.loss)(params, single)

        return {"retain_grads": jax.vmap(one)(first)}

    projection = geometric_disentanglement(gamma=gamma, alpha=alpha, subspace=subspace,
                                           geometry=geometry, b2=b2, eps=eps)
    return Unlearner(name=name, optimizer=before(projection), loss=gu_loss,
                     extra_args=retain_grads)

@register_unlearner("ga")
def ga(*, forget_weight: float = 1.0, retain_weight: float = 0.0, gu: bool = False,
       gu_subspace: str = "mean", gu_geometry: str = "adam", gu_k: int = 16,
       gu_b2: float = 0.999, gu_eps: float = 1e-8) -> Unlearner:
    """Gradient ascent on the forget set, ``L_GA = −mean ℓ_f`` (module docstring).

    Minimising it raises the forget loss without bound: use a stop target
    (``config.unlearn.target`` or ``target_margin``), a retain term or GU.

    Args:
      forget_weight: ``γ``, the weight of the forget term (GU: of the projected gradient).
      retain_weight: ``α``, the weight of the retain loss / gradient (0: plain GA; GU's
        default is 1).
      gu: project the forget gradient orthogonally to the retain gradient(s) (GU) instead
        of adding ``α·g_r`` to it.
      gu_subspace: ``"mean"`` (rank 1: the retain batch's mean gradient, GU's
        ``geometric.py``) or ``"span"`` (rank k: ``gu_k`` per-example retain gradients,
        GU's ``orthograd.py``; costs k backward passes per step).
      gu_geometry: ``"adam"`` (GU's: whiten by the second moment of a following β1 = 0
        Adam; use ``config.unlearn.optimizer`` adam with ``b1 = 0`` and the same ``b2`` /
        ``eps`` as ``gu_b2`` / ``gu_eps``) or ``"euclidean"`` (exact first-order retain
        invariance with plain SGD).
      gu_k: per-example retain gradients of ``"span"`` (the first k of the retain batch).
      gu_b2, gu_eps: the downstream Adam's ``b2`` and ``eps`` (``"adam"`` geometry).

    Returns:
      The unlearner.

    References:
      Zhou et al., "Geometric Disentanglement for Machine Unlearning",
      https://arxiv.org/abs/2511.17100, 2025 (GU).
    """

    def forget_loss(params, batch: Batch, ctx: UnlearnStepContext) -> jax.Array:
        return -jnp.mean(ctx.per_example_loss(params, batch))

    return _gradient_unlearner("ga", forget_loss, forget_weight=forget_weight,
                               retain_weight=retain_weight, gu=gu, gu_subspace=gu_subspace,
                               gu_geometry=gu_geometry, gu_k=gu_k, gu_b2=gu_b2, gu_eps=gu_eps)


@register_unlearner("npo")
def npo(*, beta: float = 0.1, forget_weight: float = 1.0, retain_weight: float = 0.0,
        gu: bool = False, gu_subspace: str = "mean", gu_geometry: str = "adam", gu_k: int = 16,
        gu_b2: float = 0.999, gu_eps: float = 1e-8) -> Unlearner:
    r"""Negative Preference Optimization on the forget set (Zhang et al., COLM 2024).

    ``L_NPO = (2/β)·mean softplus(β·(ℓ_f(θ_ref) − ℓ_f(θ)))`` with ``θ_ref`` the original
    model (no gradient flows into it): GA's gradient weighted by ``2σ(β·log-ratio)``,
    which fades once an example is forgotten, so NPO diverges much more slowly than GA.

    Args:
      beta: inverse temperature ``β > 0`` (open-unlearning's default 0.1).
      forget_weight: ``γ``, the weight of the forget term (GU: of the projected gradient).
      retain_weight: ``α``, the weight of the retain loss / gradient (0: plain NPO).
      gu: project the forget gradient orthogonally to the retain gradient(s) (GU) instead
        of adding ``α·g_r`` to it.
      gu_subspace: ``"mean"`` (rank 1: the retain batch's mean gradient, GU's
        ``geometric.py``) or ``"span"`` (rank k: ``gu_k`` per-example retain gradients,
        GU's ``orthograd.py``; costs k backward passes per step).
      gu_geometry: ``"adam"`` (GU's: whiten by the second moment of a following β1 = 0
        Adam; use ``config.unlearn.optimizer`` adam with ``b1 = 0`` and the same ``b2`` /
        ``eps`` as ``gu_b2`` / ``gu_eps``) or ``"euclidean"`` (exact first-order retain
        invariance with plain SGD).
      gu_k: per-example retain gradients of ``"span"`` (the first k of the retain batch).
      gu_b2, gu_eps: the downstream Adam's ``b2`` and ``eps`` (``"adam"`` geometry).

    Returns:
      The unlearner.

    References:
      Zhang, Lin, Bai, Mei, "Negative Preference Optimization: From Catastrophic Collapse
      to Effective Unlearning", https://arxiv.org/abs/2404.05868, COLM 2024.
    """
    beta = check_real("beta", beta, 0.0, math.inf, low_open=True, high_open=True)

    def forget_loss(params, batch: Batch, ctx: UnlearnStepContext) -> jax.Array:
        log_ratio = (jax.lax.stop_gradient(ctx.per_example_loss(ctx.reference, batch))
                     - ctx.per_example_loss(params, batch))  # log π_θ − log π_ref
        return (2.0 / beta) * jnp.mean(jax.nn.softplus(beta * log_ratio))

    return _gradient_unlearner("npo", forget_loss, forget_weight=forget_weight,
                               retain_weight=retain_weight, gu=gu, gu_subspace=gu_subspace,
                               gu_geometry=gu_geometry, gu_k=gu_k, gu_b2=gu_b2, gu_eps=gu_eps)


# ----------------------------------------------------------------------------- SSD


def _refuse_memory_predictions(name: str, ctx: UnlearnContext) -> None:
    if ctx.method.predict is not None:
        raise ValueError(
            f"unlearner {name!r} edits the model's parameters, but the original model was "
            f"trained with {ctx.method.name!r}, whose predictions come from its memory "
            "(Method.predict); use 'acu' for an 'acil' model")


def _blocked(tree: PyTree) -> PyTree:
    return jax.block_until_ready(tree)


@register_unlearner("ssd")
def ssd(*, alpha: float = 10.0, lam: float = 1.0, fisher_batch_size: int = 64,
        fisher_granularity: str = "batch", search_target: float = -1.0,
        search_alphas: tuple[float, ...] = DEFAULT_SEARCH_ALPHAS) -> Unlearner:
    r"""Selective Synaptic Dampening (Foster, Schoepf, Brintrup, AAAI 2024).

    Importances are SSD's: the empirical Fisher of the cross-entropy, mean-normalised,
    the model in evaluation mode, on the whole training set ``D`` (not the retain set)
    and on ``D_f`` (:func:`clax.fisher.diagonal_fisher`). Every parameter entry with
    ``[]_{D_f} > α·[]_D`` is multiplied by ``min(λ·[]_D / []_{D_f}, 1)``
    (:func:`clax.edits.ssd_dampen`).

    With ``search_target >= 0``, α is instead the largest of ``search_alphas`` whose edit
    brings the forget-*train* accuracy to ``<= search_target``
    (:func:`clax.edits.ssd_search_alpha`, a clax addition: the α that works depends on
    the Fisher batch size and the class; only forget-train data is evaluated).

    Needs a `Classification` objective (the importances are cross-entropy Fishers).

    Args:
      alpha: selection weighting ``α > 0`` (SSD: 10 for ResNet-18, 5-25 for ViT).
      lam: dampening constant ``λ > 0`` (SSD: 1).
      fisher_batch_size: batch size ``B`` of the Fisher passes (SSD: 64; α must be
        re-tuned when it changes, see :mod:`clax.edits.ssd`).
      fisher_granularity: ``"batch"`` (SSD's squared batch-mean gradients) or
        ``"example"`` (the exact per-example Fisher).
      search_target: forget-train accuracy the α search must reach; ``< 0``: no search.
      search_alphas: candidate α values of the search, tried from the largest.

    Returns:
      The unlearner; its ``info`` holds α, the dampened entries per parameter, the time
      of the Fisher passes and (with the search) its trace.

    References:
      Foster, Schoepf, Brintrup, "Fast Machine Unlearning Without Retraining Through
      Selective Synaptic Dampening", https://arxiv.org/abs/2308.07707, AAAI 2024.
    """
    alpha = check_real("alpha", alpha, 0.0, math.inf, low_open=True, high_open=True)
    lam = check_real("lam", lam, 0.0, math.inf, low_open=True, high_open=True)
    fisher_batch_size = check_positive_int("fisher_batch_size", fisher_batch_size)
    granularity = check_choice("fisher_granularity", fisher_granularity, _GRANULARITIES)
    search = check_real("search_target", search_target, -math.inf, 1.0, low_open=False,
                        high_open=False) >= 0
    alphas = tuple(check_real("search_alphas[i]", a, 0.0, math.inf, low_open=True,
                              high_open=True) for a in search_alphas)
    if search and not alphas:
        raise ValueError("search_alphas must hold at least one α > 0 for the α search")

    def edit(state: TrainState, ctx: UnlearnContext) -> tuple[TrainState, dict[str, Any]]:
        if not isinstance(ctx.objective, Classification):
            raise ValueError("unlearner 'ssd' needs a classification objective (its importances "
                             "are cross-entropy Fishers); got "
                             f"{type(ctx.objective).__name__}")
        _refuse_memory_predictions("ssd", ctx)

        def fisher(data: TrainArrays) -> PyTree:
            return diagonal_fisher(ctx.model, state.params, data, model_state=state.model_state,
                                   labels="empirical", granularity=granularity,
                                   normalization="mean", batch_size=fisher_batch_size,
                                   logit_masks=ctx.objective.logit_masks)

        start = time.perf_counter()
        fisher_full = _blocked(fisher(ctx.train))
        fisher_forget = _blocked(fisher(ctx.forget))
        fisher_s = time.perf_counter() - start
        ctx.log(f"ssd: Fisher of D ({len(ctx.train.task_ids)} examples) and D_f "
                f"({len(ctx.forget.task_ids)}) in {fisher_s:.1f}s")
        info: dict[str, Any] = {"fisher_s": fisher_s, "lam": lam}
        start = time.perf_counter()
        if search:
            def forget_accuracy(params: PyTree) -> float:
                return ctx.evaluate(state._replace(params=params), ctx.forget)["accuracy"]

            found = ssd_search_alpha(state.params, fisher_full, fisher_forget,
                                     forget_accuracy=forget_accuracy, target=search_target,
                                     alphas=alphas, lam=lam)
            params, report = found.params, found.report
            info["search"] = {
                "target": search_target, "reached": found.reached,
                "trace": [{"alpha": a, "forget_train_acc": acc, "num_dampened": n}
                          for a, acc, n in found.trace]}
            ctx.log(f"ssd: α search → {found.alpha:g} (reached {search_target}: "
                    f"{found.reached}) after {len(found.trace)} tries")
        else:
            params, report = ssd_dampen(state.params, fisher_full, fisher_forget, alpha=alpha,
                                        lam=lam)
        params = _blocked(params)
        info.update(alpha=report.alpha, dampen_s=time.perf_counter() - start,
                    num_dampened=report.num_dampened, num_params=report.num_total,
                    dampened=report.dampened, total=report.total)
        return state._replace(params=params), info

    return Unlearner(name="ssd", edit=edit)


# ----------------------------------------------------------------------------- ACU

_FEATURE_FNS: dict[Any, Any] = {}


def _features(ctx: UnlearnContext, state: TrainState, x: np.ndarray) -> np.ndarray:
    """The frozen backbone's features of ``x``, in fixed-size padded batches (one compile)."""
    fn = _FEATURE_FNS.get(ctx.model)
    if fn is None:
        fn = _FEATURE_FNS[ctx.model] = jax.jit(ctx.model.features)
    out = []
    b = _FEATURE_BATCH
    for i in range(0, len(x), b):
        part = np.asarray(x[i:i + b])
        padded = np.zeros((b, *part.shape[1:]), part.dtype)
        padded[:len(part)] = part
        out.append(np.asarray(fn(state.params, state.model_state, padded))[:len(part)])
    return np.concatenate(out)


def _rls_memory(name: str, state: TrainState, ctx: UnlearnContext) -> rls.RLSState:
    if not isinstance(state.memory, rls.RLSState):
        raise ValueError(
            f"unlearner {name!r} needs a model trained with the continual method 'acil' (its "
            "memory holds the recursive-least-squares state); the original model was trained "
            f"with {ctx.method.name!r}: set config.method.name = 'acil'")
    if not isinstance(ctx.objective, Classification):
        raise ValueError(f"unlearner {name!r} needs a classification objective, got "
                         f"{type(ctx.objective).__name__}")
    return state.memory


@register_unlearner("acu")
def acu(*, batch_size: int = 1024) -> Unlearner:
    r"""Analytic Continual Unlearning: the exact downdate of an ACIL model (Tang et al.).

    The original model must be trained with the continual method ``acil``: a frozen
    backbone and a ridge-regression head ``W = (XᵀX + γI)⁻¹XᵀY`` kept by recursive least
    squares in the method's memory. Forgetting ``(X_f, Y_f)`` (the forget set's
    features, re-embedded with the frozen backbone and buffer layer) is the Woodbury
    update with the sign flipped (:func:`clax.analytic.rls.unlearn`):

    .. math::

       K = R X_f^\top (I - X_f R X_f^\top)^{-1}, \qquad
       W ← W - K (Y_f - X_f W), \qquad R ← R + K X_f R

    after which ``W`` is ridge regression on the retained data only, and a class whose
    every example is forgotten has a zero column and is no longer predicted. The backbone
    is not changed (it is frozen after the first task; if the forget set was part of
    that task, the features still carry what the backbone learned from it).

    ``retrain`` is the exact reference: ridge regression refit from scratch on the
    retained features (:func:`clax.analytic.rls.fit`), which the downdate reproduces.
    Precision: ACIL computes in float64; with a float32 memory the downdate is only
    approximately the refit (see :mod:`clax.methods.analytic`).

    Args:
      batch_size: forget rows per downdate (each step solves a ``batch_size``-square
        system).

    Returns:
      The unlearner.

    References:
      Tang et al., "Analytic Continual Unlearning", https://arxiv.org/abs/2505.12239.
    """
    batch_size = check_positive_int("batch_size", batch_size)

    def edit(state: TrainState, ctx: UnlearnContext) -> tuple[TrainState, dict[str, Any]]:
        memory = _rls_memory("acu", state, ctx)
        features = _features(ctx, state, ctx.forget.x)
        labels = np.asarray(ctx.forget.y, np.int32)
        new = _blocked(rls.unlearn(memory, features, labels, batch_size=batch_size))
        removed = np.flatnonzero((np.asarray(memory.class_counts) > 0)
                                 & (np.asarray(new.class_counts) == 0))
        return state._replace(memory=new), {"num_unlearned": int(len(labels)),
                                            "classes_removed": removed.tolist()}

    def retrain(state: TrainState, ctx: UnlearnContext) -> tuple[TrainState, dict[str, Any]]:
        memory = _rls_memory("acu", state, ctx)
        features = _features(ctx, state, ctx.retain.x)
        new = _blocked(rls.fit(memory, features, np.asarray(ctx.retain.y, np.int32)))
        return state._replace(memory=new), {"num_refit": int(len(ctx.retain.task_ids))}

    return Unlearner(name="acu", edit=edit, retrain=retrain)
