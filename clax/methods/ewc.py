"""Fisher-based regularisation methods: ``ewc``, ``online_ewc`` and ``l2``.

Each is the optax transform :func:`clax.transforms.ewc.ewc_penalty` (adds ``λ·F⊙(θ − θ*)``
to the gradient, before the base optimizer) plus a fixed-capacity memory set at every task
end by a pure consolidation:

* ``ewc``: one penalty per finished task, Kirkpatrick et al. 2017 (Avalanche's
  ``mode='separate'``, GT-RIPL's ``EWC``), kept as the running sums
  ``S_F = Σ_t F_t`` and ``S_{Fθ} = Σ_t F_t⊙θ*_t``; ``λ·S_F⊙(θ − S_{Fθ}/S_F)`` is exactly the
  gradient of the per-task penalties' sum (:func:`clax.transforms.ewc.consolidate_ewc`).
* ``online_ewc``: one penalty, ``F ← γ·F + F_new``, ``θ* ←`` latest parameters (Schwarz et
  al. 2018; Avalanche ``mode='online'``; GT-RIPL ``EWC_online`` is ``γ = 1``).
* ``l2``: ``λ·(θ − θ*)`` with ``θ*`` the parameters at the end of the previous task
  (GT-RIPL's ``L2``, which keeps one slot).

The Fisher of a task is estimated on that task's training data at its end, with the model
in evaluation mode, by :func:`clax.fisher.diagonal_fisher` (options ``fisher_labels``,
``fisher_granularity``, ``fisher_normalization``, ``fisher_batch_size``; see there for the
formulas). The penalty convention is ``(λ/2)·Σ F(θ − θ*)²`` (with the ½): see
:mod:`clax.transforms.ewc` for how to convert ``λ`` from Avalanche or GT-RIPL.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from clax._validation import check_choice, check_int
from clax.fisher.estimators import GRANULARITIES, LABELS, NORMALIZATIONS, diagonal_fisher
from clax.core import (
    BoundaryContext,
    Method,
    StepContext,
    TrainArrays,
    TrainState,
    before,
    num_examples,
    register_method,
    take,
)
from clax.transforms.ewc import (
    _check_decay,
    _check_lam,
    consolidate_ewc,
    ewc_penalty,
    init_ewc_memory,
)
from clax.typing import PyTree


def _fisher_fn(labels: str, granularity: str, normalization: str, batch_size: int,
               max_examples: int):
    """``(state, ctx) -> (F, params)``: the Fisher of the task just trained (eval mode)
    and the parameters it was computed at, both on the host."""
    check_choice("fisher_labels", labels, LABELS)
    check_choice("fisher_granularity", granularity, GRANULARITIES)
    check_choice("fisher_normalization", normalization, NORMALIZATIONS)
    check_int("fisher_batch_size", batch_size, low=1)
    check_int("fisher_max_examples", max_examples, low=0)

    def fisher(state: TrainState, ctx: BoundaryContext) -> PyTree:
        data = ctx.train
        key_subset, key_labels = jax.random.split(ctx.rng)
        n = num_examples(data)  # x and y may be pytrees (token sequences, ...)
        if 0 < max_examples < n:
            idx = np.sort(np.asarray(jax.random.permutation(key_subset, n))[:max_examples])
            data = TrainArrays(*take(tuple(data), idx))
        # On the default device: the run's state is replicated over its mesh, and the
        # same single-device computation keeps results independent of the device count.
        params, model_state = jax.device_get((state.params, state.model_state))
        return diagonal_fisher(
            ctx.model, params, data, model_state=model_state, labels=labels,
            granularity=granularity, normalization=normalization, batch_size=batch_size,
            key=key_labels, objective=ctx.objective,  # the run's loss: classes or tokens
        ), params

    return fisher


def _ewc_method(name: str, lam: float, mode: str, decay: float, fisher_fn) -> Method:
    def init_memory(params: PyTree) -> PyTree:
        return init_ewc_memory(params, mode=mode)

    def extra_args(ctx: StepContext) -> dict[str, PyTree]:
        return {"fisher": ctx.memory.fisher, "anchor": ctx.memory.anchor}

    def consolidate(state: TrainState, ctx: BoundaryContext) -> TrainState:
        fisher, params = fisher_fn(state, ctx)
        memory = jax.device_get(state.memory)
        return state._replace(memory=consolidate_ewc(memory, fisher, params, mode=mode,
                                                     decay=decay))

    return Method(name=name, optimizer=before(ewc_penalty(lam=lam)), init_memory=init_memory,
                  extra_args=extra_args, consolidate=consolidate)


@register_method("ewc")
def ewc(
    *,
    lam: float = 10.0,
    fisher_labels: str = "true",
    fisher_granularity: str = "example",
    fisher_normalization: str = "mean",
    fisher_batch_size: int = 64,
    fisher_max_examples: int = 0,
) -> Method:
    """Elastic weight consolidation with one penalty per past task (Kirkpatrick et al. 2017).

    Loss seen by the optimizer: ``L(θ) + Σ_{t<T} (λ/2)·Σ_j F_{t,j}(θ_j − θ*_{t,j})²``, with
    ``F_t`` the diagonal Fisher of task ``t``'s training data at the end of task ``t`` and
    ``θ*_t`` the parameters then. Memory: ``S_F``, ``S_{Fθ}`` and the Fisher-weighted anchor
    (three parameter-sized trees, whatever the number of tasks).

    Defaults: the true Fisher (labels sampled from the model, key from the run seed),
    exact per example, mean over the task's examples (``fisher_max_examples = 0``: all).
    ``λ = 10`` had the best final accuracy of ``λ ∈ {3, 10, 30, 50, 100}`` on the GPM
    permuted protocol (Permuted Fashion-MNIST, SGD 0.01, batch 10;
    ``benchmarks/results/permuted_fmnist_ewc.md``). With plain SGD the penalty is stable
    only while ``lr·λ·max S_F < 2``, and ``S_F`` grows with every task: there ``λ = 50``
    and ``100`` diverged (NaN) after 8 and 4 tasks. Adaptive optimizers (GT-RIPL uses Adam)
    tolerate larger ``λ``.

    Args:
        lam: ``λ >= 0``.
        fisher_labels: ``"true"``, ``"empirical"`` or ``"argmax"``.
        fisher_granularity: ``"example"`` or ``"batch"``.
        fisher_normalization: ``"mean"`` or ``"sum"``.
        fisher_batch_size: Batch size of the Fisher pass (defines the batches of
            ``"batch"`` granularity).
        fisher_max_examples: Estimate on a random subset of this many training examples of
            the task (``0``: all of them).

    Returns:
        The method.

    Raises:
        TypeError: On a hyperparameter of the wrong type.
        ValueError: On a hyperparameter out of range.
    """
    lam = _check_lam(lam)
    fisher_fn = _fisher_fn(fisher_labels, fisher_granularity, fisher_normalization,
                           fisher_batch_size, fisher_max_examples)
    return _ewc_method("ewc", lam, "separate", 1.0, fisher_fn)


@register_method("online_ewc")
def online_ewc(
    *,
    lam: float = 3.0,
    decay: float = 1.0,
    fisher_labels: str = "true",
    fisher_granularity: str = "example",
    fisher_normalization: str = "mean",
    fisher_batch_size: int = 64,
    fisher_max_examples: int = 0,
) -> Method:
    """Online EWC: one running penalty (Schwarz et al., ICML 2018).

    At each task end ``F ← γ·F + F_new`` and ``θ* ← θ``; the loss seen by the optimizer is
    ``L(θ) + (λ/2)·Σ_j F_j(θ_j − θ*_j)²``. ``γ = 1`` is GT-RIPL's ``EWC_online``;
    Avalanche's ``decay_factor`` is ``γ``. Fisher options and defaults as :func:`ewc`;
    ``λ = 3`` had the best final accuracy of ``λ ∈ {3, 10, 30, 50, 100}`` on the GPM
    permuted protocol (``benchmarks/results/permuted_fmnist_ewc.md``; 50 and 100 diverged
    with SGD 0.01).

    Args:
        lam: ``λ >= 0``.
        decay: ``γ ∈ [0, 1]``.
        fisher_labels, fisher_granularity, fisher_normalization, fisher_batch_size,
            fisher_max_examples: As in :func:`ewc`.

    Returns:
        The method.

    Raises:
        TypeError: On a hyperparameter of the wrong type.
        ValueError: On a hyperparameter out of range.
    """
    lam = _check_lam(lam)
    decay = _check_decay(decay)
    fisher_fn = _fisher_fn(fisher_labels, fisher_granularity, fisher_normalization,
                           fisher_batch_size, fisher_max_examples)
    return _ewc_method("online_ewc", lam, "online", decay, fisher_fn)


@register_method("l2")
def l2(*, lam: float = 0.1) -> Method:
    """L2 to the previous task's parameters: ``L(θ) + (λ/2)·‖θ − θ*‖²`` from task 1 on.

    ``θ*`` is replaced by the parameters at every task end (one slot, as GT-RIPL's ``L2``;
    its ``reg_coef`` is ``λ/2``). Implemented as :func:`clax.transforms.ewc.ewc_penalty`
    with a scalar Fisher, 0 before the first task end and 1 after. ``λ = 0.1`` had the best
    final accuracy of ``λ ∈ {0.01, 0.03, 0.1, 0.3, 1}`` on the GPM permuted protocol
    (``benchmarks/results/permuted_fmnist_ewc.md``).

    Args:
        lam: ``λ >= 0``.

    Returns:
        The method.

    Raises:
        TypeError: On a non-number ``λ``.
        ValueError: On ``λ < 0``.
    """
    lam = _check_lam(lam)

    def init_memory(params: PyTree) -> PyTree:
        return {"anchor": jax.tree.map(lambda p: jnp.array(p, copy=True), params),
                "count": jnp.zeros((), jnp.int32)}

    def extra_args(ctx: StepContext) -> dict[str, PyTree]:
        active = (ctx.memory["count"] > 0).astype(jnp.float32)
        return {"fisher": active, "anchor": ctx.memory["anchor"]}

    def consolidate(state: TrainState, ctx: BoundaryContext) -> TrainState:
        del ctx
        return state._replace(memory={
            "anchor": jax.tree.map(jnp.copy, state.params),
            "count": state.memory["count"] + 1,
        })

    return Method(name="l2", optimizer=before(ewc_penalty(lam=lam)), init_memory=init_memory,
                  extra_args=extra_args, consolidate=consolidate)
