"""Closed-form heads on a first-task backbone: ``acil``, ``ncm`` and ``lda``.

All three follow the protocol of ACIL, SimpleCIL and FSA: the backbone is trained with
gradients on the first task only, then frozen; the classifier lives in the method's
memory, is updated in closed form at each task end from the features of that task's
training data, and replaces the model's head at evaluation (``Method.predict``).

* **Freezing.** An update-space transform (:func:`freeze_after`, ``after``) zeroes the
  optimizer's final
  updates once ``task_index >= 1`` (the loop passes ``task_index`` as an extra arg from
  ``StepContext.task_index``). It sits after the base optimizer so momentum, Adam moments
  and weight decay cannot move frozen weights either. Later tasks still run their training
  steps (the loop has no way to skip them), which change nothing but the optimizer state.
  Running statistics (BatchNorm) are not parameters: models with BatchNorm keep updating
  them in later tasks' train-mode forward passes, and a warning says so.
* **Consolidation.** At the end of task ``t`` the features of ``ctx.train`` (evaluation
  mode, ``BoundaryContext.model.features``) are computed in jitted batches of 1024 and
  folded into the head: :func:`clax.analytic.rls.learn` (ACIL; at ``t = 0`` this is ACIL's
  "re-alignment" of the base session) or :func:`clax.analytic.prototypes.update_stats`
  (NCM, LDA). The computation runs on one device of the mesh (the memory is replicated:
  every device would otherwise redo it), so 1 and 8 devices give identical heads.
* **Fixed shapes.** The capacity is the model's ``num_classes`` (``head/kernel`` is
  ``(D, C)``) and the feature dimension ``D`` comes from it; classes without examples have
  logit ``-1e9``. Multi-head models are rejected at init.

The heads are computed in float32 (the loop's dtype). ACIL computes in float64: with
ACIL's ``γ = 0.1`` and a 2048-wide buffer, float32 recursive least squares is only
approximately ridge regression (relative weight error 0.18 on Fashion-MNIST pixel
features, ``benchmarks/results/analytic_unlearning_float32.md``; 1e-3 with ``γ = 10``),
although its accuracy stays close. For exact learning and unlearning use
:mod:`clax.analytic.rls` directly with ``dtype=jnp.float64`` (1e-10 relative there).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from clax._host import to_host
from clax._validation import check_int, check_positive_int, check_real
from clax.analytic import prototypes as protos
from clax.analytic import rls
from clax.core import BoundaryContext, Method, TrainState, after, register_method
from clax.models.batched import padded_batches
from clax.typing import PyTree

__all__ = ["acil", "freeze_after", "lda", "ncm"]

_FEATURE_BATCH = 1024


# ----------------------------------------------------------------------------- pieces


def freeze_after(num_tasks: int = 1) -> optax.GradientTransformationExtraArgs:
    """Passes updates through during tasks ``< num_tasks`` and zeroes them afterwards.

    Needs the extra arg ``task_index`` (int32 scalar, may be traced) in every
    ``update`` call; chain it *after* the base optimizer so that no optimizer state
    (momentum, weight decay) can move the frozen parameters.

    Args:
      num_tasks: number of leading tasks trained with gradients (a positive int).

    Raises:
      TypeError: if ``num_tasks`` is not an int.
      ValueError: if ``num_tasks < 1``.
    """
    num_tasks = check_positive_int("num_tasks", num_tasks)

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None, *, task_index, **extra_args):
        del params, extra_args
        train = jnp.asarray(task_index) < num_tasks
        return jax.tree.map(lambda u: jnp.where(train, u, jnp.zeros_like(u)), updates), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _task_index_arg(ctx) -> dict[str, jax.Array]:
    return {"task_index": ctx.task_index}


def _head_shape(params: PyTree, method: str) -> tuple[int, int]:
    kernel = params.get("head", {}).get("kernel") if isinstance(params, dict) else None
    if kernel is None or np.ndim(kernel) != 2:
        shape = None if kernel is None else np.shape(kernel)
        raise ValueError(
            f"{method} needs a single linear head with params['head']['kernel'] of shape "
            f"(D, C) (D features, C classes); got {shape}. Multi-head models are not "
            "supported: the closed-form head replaces the whole head"
        )
    d, c = np.shape(kernel)
    return int(d), int(c)


class _Absorber:
    """Jitted ``(memory, params, model_state, x, y, mask) -> memory`` per model, cached."""

    def __init__(self, update):
        self._update = update
        self._cache: dict[Any, Any] = {}

    def __call__(self, state: TrainState, ctx: BoundaryContext, memory: PyTree) -> PyTree:
        if jax.tree.leaves(state.model_state) and ctx.task_index > 0:
            warnings.warn(
                "the backbone is frozen after the first task, but this model has running "
                "statistics (e.g. BatchNorm) that later tasks' training steps still update; "
                "the closed-form head then sees drifting features", stacklevel=3)
        fn = self._cache.get(ctx.model)
        if fn is None:
            model, update = ctx.model, self._update

            def absorb(memory, params, model_state, x, y, mask):
                return update(memory, model.features(params, model_state, x), y, mask)

            fn = self._cache[ctx.model] = jax.jit(absorb)
        # One device: the same single-device computation whatever the run's mesh (this
        # process's first device; state split over other processes is gathered first).
        device = jax.local_devices()[0]
        on_one = jax.device_put(to_host((memory, state.params, state.model_state)), device)
        memory, params, model_state = on_one
        x, y = np.asarray(ctx.train.x), np.asarray(ctx.train.y, np.int32)
        # The last batch is padded (one compiled shape for every batch) and masked out.
        for (xb, yb), num_valid in padded_batches((x, y), batch_size=_FEATURE_BATCH):
            mask = np.arange(_FEATURE_BATCH) < num_valid
            put = jax.device_put((xb, yb, mask), device)
            memory = fn(memory, params, model_state, *put)
        # Wait here: dispatch is asynchronous, and the loop times its consolidate call.
        return jax.block_until_ready(memory)  # the loop places it on the mesh


# ----------------------------------------------------------------------------- methods


@register_method("acil")
def acil(*, gamma: float = 0.1, buffer_size: int = 2048, buffer_seed: int = 0) -> Method:
    """ACIL / G-ACIL: recursive least squares on a first-task backbone (Zhuang et al.).

    The backbone is trained on task 0 with the base optimizer and frozen (see the module
    docstring). The classifier is ridge regression on ``ReLU(f(x) · P)``, ``P`` ACIL's
    frozen random buffer layer (``U(±1/√D)``, ``D`` the backbone's feature size), kept
    exactly by recursive least squares (:mod:`clax.analytic.rls`):
    ``W = (XᵀX + γI)⁻¹ XᵀY`` over every task's training data seen so far, whatever classes
    each task holds (G-ACIL: classes may recur or mix). Logits ``ReLU(f(x)·P) · W`` replace
    the model head at evaluation.

    Memory: the :class:`~clax.analytic.rls.RLSState` (``W (d, C)``, ``R (d, d)``, class
    counts, ``P (D, d)``), ``d = buffer_size``.

    Args:
      gamma: ridge ``γ > 0`` (ACIL's command-line default 0.1).
      buffer_size: width ``d`` of the random ReLU buffer layer (ACIL: 8192 on CIFAR-100;
        smaller here, since ``R`` is ``d × d`` and each update costs ``O(n d²)``); ``0``
        regresses on the backbone features directly.
      buffer_seed: seed of the buffer layer.

    Returns:
      The method.

    Raises:
      TypeError: on a hyperparameter of the wrong type (e.g. a float ``buffer_size``).
      ValueError: on a hyperparameter out of range; at init, on a model without a single
        ``(D, C)`` linear head.
    """
    gamma = check_real("gamma", gamma, 0.0, math.inf, low_open=True, high_open=True)
    buffer_size = check_int("buffer_size", buffer_size, low=0)
    buffer_seed = check_int("buffer_seed", buffer_seed, low=0)

    def init_memory(params: PyTree) -> rls.RLSState:
        d, c = _head_shape(params, "acil")
        if buffer_size == 0:
            return rls.init(d, c, gamma=gamma)
        return rls.init(d, c, gamma=gamma, buffer_size=buffer_size,
                        key=jax.random.key(buffer_seed))

    absorber = _Absorber(lambda m, f, y, mask: rls.learn(m, f, y, mask=mask))

    def consolidate(state: TrainState, ctx: BoundaryContext) -> TrainState:
        return state._replace(memory=absorber(state, ctx, state.memory))

    def predict(memory: rls.RLSState, features: jax.Array, task_ids: jax.Array) -> jax.Array:
        del task_ids
        return rls.predict(memory, features)

    return Method(name="acil", optimizer=after(freeze_after(1)), extra_args=_task_index_arg,
                  init_memory=init_memory, consolidate=consolidate, predict=predict)


@register_method("ncm")
def ncm(*, teen_alpha: float = 0.0, teen_tau: float = protos.TEEN_TAU) -> Method:
    """Nearest class mean by cosine similarity (SimpleCIL), optionally TEEN-calibrated.

    The backbone is trained on task 0 and frozen (module docstring). Class ``c``'s
    prototype is the mean of its (un-normalised) features; the logit is ``cos(f(x), μ_c)``
    (SimpleCIL's ``CosineLinear`` with ``σ = 1``). The means come from exact streaming
    statistics (:class:`~clax.analytic.prototypes.PrototypeStats`) updated at each task
    end, so a class seen again later has its mean over all its examples.

    TEEN (``teen_alpha > 0``): classes seen after task 0 ("new") get calibrated
    prototypes ``(1 − α) p̂_n + α Δ``, ``Δ`` the normalised softmax(``τ`` cos)-weighted
    mean of the normalised base-class (task 0) prototypes
    (:func:`~clax.analytic.prototypes.teen_calibrate`).

    Memory: ``{"stats": PrototypeStats, "base": (C,) bool}`` (the classes of task 0).

    Args:
      teen_alpha: TEEN's shift weight ``α`` in ``[0, 1]``; 0 (default) is plain
        SimpleCIL / NCM. TEEN uses 0.5 (its default; miniImageNet, CUB) or 0.1 (CIFAR-100).
      teen_tau: TEEN's softmax temperature ``τ > 0`` (16).

    Returns:
      The method.
    """
    alpha = check_real("teen_alpha", teen_alpha, 0.0, 1.0, low_open=False, high_open=False)
    tau = check_real("teen_tau", teen_tau, 0.0, math.inf, low_open=True, high_open=True)

    def init_memory(params: PyTree) -> dict[str, Any]:
        d, c = _head_shape(params, "ncm")
        return {"stats": protos.init_stats(c, d), "base": jnp.zeros((c,), bool)}

    absorber = _Absorber(
        lambda m, f, y, mask: {**m, "stats": protos.update_stats(m["stats"], f, y, mask=mask)})

    def consolidate(state: TrainState, ctx: BoundaryContext) -> TrainState:
        memory = absorber(state, ctx, state.memory)
        if ctx.task_index == 0:
            memory = {**memory, "base": memory["stats"].counts > 0}
        return state._replace(memory=memory)

    def predict(memory, features: jax.Array, task_ids: jax.Array) -> jax.Array:
        del task_ids
        stats, base = memory["stats"], memory["base"]
        seen = stats.counts > 0
        prototypes = protos.class_means(stats)
        if alpha > 0:
            prototypes = protos.teen_calibrate(prototypes, base, seen & ~base, alpha=alpha,
                                               tau=tau)
        return protos.cosine_logits(prototypes, seen, features)

    return Method(name="ncm", optimizer=after(freeze_after(1)), extra_args=_task_index_arg,
                  init_memory=init_memory, consolidate=consolidate, predict=predict)


@register_method("lda")
def lda(*, shrinkage: float = protos.LDA_SHRINKAGE) -> Method:
    """FSA's LDA head on a first-task backbone (Panos et al., ICCV 2023).

    The backbone is trained on task 0 and frozen (module docstring; FSA adapts the body in
    the first session only). At each task end the exact streaming statistics are updated
    and the head is recomputed from them:
    ``Σ = cov(all seen features, unbiased) + shrinkage·I`` (the *total* covariance),
    ``W = Σ⁻¹ M``, ``b_c = μ_cᵀ Σ⁻¹ μ_c``, logits ``f(x)ᵀ W − b/2`` (equal priors).

    Memory: ``{"stats": PrototypeStats, "weights": (D, C), "bias": (C,)}``; the head is
    stored so evaluation does not refactor ``Σ`` for every batch.

    Args:
      shrinkage: ridge added to the covariance, ``> 0`` (FSA: 1.0).

    Returns:
      The method.
    """
    shrinkage = check_real("shrinkage", shrinkage, 0.0, math.inf, low_open=True,
                           high_open=True)

    def init_memory(params: PyTree) -> dict[str, Any]:
        d, c = _head_shape(params, "lda")
        return {"stats": protos.init_stats(c, d), "weights": jnp.zeros((d, c), jnp.float32),
                "bias": jnp.zeros((c,), jnp.float32)}

    def update(memory, features, labels, mask):
        stats = protos.update_stats(memory["stats"], features, labels, mask=mask)
        return {**memory, "stats": stats}

    absorber = _Absorber(update)

    @jax.jit
    def head(stats):
        return protos.lda_head(stats, shrinkage=shrinkage)

    def consolidate(state: TrainState, ctx: BoundaryContext) -> TrainState:
        memory = absorber(state, ctx, state.memory)
        w, b = jax.block_until_ready(head(memory["stats"]))
        return state._replace(memory={**memory, "weights": w, "bias": b})

    def predict(memory, features: jax.Array, task_ids: jax.Array) -> jax.Array:
        del task_ids
        logits = jnp.matmul(features.astype(memory["weights"].dtype), memory["weights"],
                            precision=jax.lax.Precision.HIGHEST) - 0.5 * memory["bias"]
        return jnp.where(memory["stats"].counts > 0, logits, protos.UNSEEN_LOGIT)

    return Method(name="lda", optimizer=after(freeze_after(1)), extra_args=_task_index_arg,
                  init_memory=init_memory, consolidate=consolidate, predict=predict)
