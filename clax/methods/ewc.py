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

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from clax._host import to_host
from clax._validation import check_choice, check_int
from clax.core import (
    BoundaryContext,
    Classification,
    Method,
    Objective,
    StepContext,
    TrainArrays,
    TrainState,
    before,
    num_examples,
    register_method,
    take,
)
from clax.fisher.estimators import GRANULARITIES, LABELS, NORMALIZATIONS, diagonal_fisher
from clax.methods.gpm import model_arrays, task_arrays
from clax.params.paths import pure_tree
from clax.transforms.ewc import (
    MODES,
    EWCMemory,
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
        # On the host, then the default device: the same single-device computation keeps
        # results independent of the mesh (parameters split over processes are gathered).
        params, model_state = to_host((state.params, state.model_state))
        return diagonal_fisher(
            ctx.model, params, data, model_state=model_state, labels=labels,
            granularity=granularity, normalization=normalization, batch_size=batch_size,
            key=key_labels, objective=ctx.objective,  # the run's loss: classes or tokens
        ), params

    return fisher


# One object: the Fisher's objective is a static argument of its jitted core, so a new
# default per call would recompile it at every task end.
_CLASSIFICATION = Classification()


def _fisher_options(labels: str, granularity: str, normalization: str, batch_size: int,
                    max_examples: int) -> dict[str, Any]:
    """The Fisher options of :func:`ewc_update_memory`, checked (by `_fisher_fn`)."""
    _fisher_fn(labels, granularity, normalization, batch_size, max_examples)
    return {"fisher_labels": labels, "fisher_granularity": granularity,
            "fisher_normalization": normalization, "fisher_batch_size": batch_size,
            "fisher_max_examples": max_examples}


def ewc_update_memory(
    model: Any,
    memory: EWCMemory | None,
    data: Any,
    *,
    params: PyTree = None,
    model_state: PyTree = None,
    objective: Objective | None = None,
    mode: str = "separate",
    decay: float = 1.0,
    fisher_labels: str = "true",
    fisher_granularity: str = "example",
    fisher_normalization: str = "mean",
    fisher_batch_size: int = 64,
    fisher_max_examples: int = 0,
    key: jax.Array | None = None,
) -> EWCMemory:
    """EWC's task-end update as a plain function: adds the finished task to the memory.

    Estimates the diagonal Fisher of `data` at the current parameters (model in
    evaluation mode, :func:`clax.fisher.diagonal_fisher`) and folds it and the parameters
    into the memory with :func:`clax.transforms.ewc.consolidate_ewc` (``mode="separate"``:
    one penalty per task, the ``ewc`` method; ``"online"``: ``F ← γ·F + F_new`` and
    ``θ* ← θ``, ``online_ewc``). The ``ewc`` and ``online_ewc`` methods' ``consolidate``
    hooks are this function.

    In a user's own loop (``nnx.Optimizer``)::

        optimizer = nnx.Optimizer(model, clax.before(ewc_penalty(lam=10.0))(optax.sgd(0.01)),
                                  wrt=nnx.Param)
        memory = init_ewc_memory(nnx.state(model, nnx.Param))
        for task in tasks:
            ...  # steps: optimizer.update(model, grads, fisher=memory.fisher,
                 #                         anchor=memory.anchor)
            memory = ewc_update_memory(model, memory, (task.x_train, task.y_train))

    Args:
        model: An ``nnx.Module`` (its current parameters are used) or a
            :class:`clax.core.ModelFns` with ``params=`` (and ``model_state=``). Pass the
            same ``ModelFns`` every task to compile the Fisher once (an ``nnx.Module`` of
            the same architecture is mapped to one cached ``ModelFns``).
        memory: From :func:`clax.transforms.ewc.init_ewc_memory` (same ``mode``) or a
            previous update; None starts from an empty one.
        data: The task's ``(x, y)``, ``(x, y, task_ids)`` or a ``clax.core.TrainArrays`` /
            ``Batch``: ``y`` what `objective` reads (class ids, next-token targets).
        params: The parameters (pure dict or ``nnx.State``); default the model's own.
        model_state: The non-parameter variables; default the model's own (``{}`` with a
            ``ModelFns``).
        objective: The task loss (``clax.core.Classification()`` by default;
            ``LanguageModeling()`` for a language model). Keep the same object across
            calls (a static argument of the Fisher's jitted core).
        mode: ``"separate"`` or ``"online"``.
        decay: ``γ ∈ [0, 1]`` (``"online"`` only).
        fisher_labels, fisher_granularity, fisher_normalization, fisher_batch_size,
            fisher_max_examples: As in :func:`ewc`.
        key: PRNG key of the Fisher (sampled labels, example subset); default
            ``jax.random.key(0)``.

    Returns:
        The new :class:`~clax.transforms.ewc.EWCMemory` (pure dicts; new arrays, never the
        live parameters): pass ``fisher=memory.fisher, anchor=memory.anchor`` to
        :func:`~clax.transforms.ewc.ewc_penalty`.

    Raises:
        TypeError: On a model that is neither an ``nnx.Module`` nor a ``ModelFns``, data
            without targets, or options of the wrong type.
        ValueError: On options out of range, or a memory made for the other ``mode``.
    """
    caller = "ewc_update_memory"
    check_choice("mode", mode, MODES)
    decay = _check_decay(decay)
    fisher_fn = _fisher_fn(fisher_labels, fisher_granularity, fisher_normalization,
                           fisher_batch_size, fisher_max_examples)
    fns, params, model_state = model_arrays(model, params, model_state, caller=caller)
    memory = init_ewc_memory(params, mode=mode) if memory is None else pure_tree(memory)
    if not isinstance(memory, EWCMemory):
        raise TypeError(f"{caller}: memory must be an EWCMemory (init_ewc_memory) or None, "
                        f"got {type(memory).__name__}")
    if (memory.weighted_anchor == ()) != (mode == "online"):
        made = "online" if memory.weighted_anchor == () else "separate"
        raise ValueError(f'{caller}: memory was made for mode="{made}", not mode="{mode}"')
    train = task_arrays(data, caller=caller, need_y=True)
    key = jax.random.key(0) if key is None else key
    objective = _CLASSIFICATION if objective is None else objective
    # _fisher_fn reads a (state, context) pair, as the hooks get them.
    state = TrainState(params=params, model_state=model_state, opt_state=(), memory=memory,
                       rng=key, step=np.int32(0))
    ctx = BoundaryContext(task_index=0, tasks=(), train=train, model=fns,
                          objective=objective, rng=key)
    fisher, params = fisher_fn(state, ctx)
    return consolidate_ewc(to_host(memory), fisher, params, mode=mode, decay=decay)


def _ewc_method(name: str, lam: float, mode: str, decay: float,
                fisher_options: dict[str, Any]) -> Method:
    def init_memory(params: PyTree) -> PyTree:
        return init_ewc_memory(params, mode=mode)

    def extra_args(ctx: StepContext) -> dict[str, PyTree]:
        return {"fisher": ctx.memory.fisher, "anchor": ctx.memory.anchor}

    def consolidate(state: TrainState, ctx: BoundaryContext) -> TrainState:
        return state._replace(memory=ewc_update_memory(
            ctx.model, state.memory, ctx.train, params=state.params,
            model_state=state.model_state, objective=ctx.objective, mode=mode, decay=decay,
            key=ctx.rng, **fisher_options))

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
    options = _fisher_options(fisher_labels, fisher_granularity, fisher_normalization,
                              fisher_batch_size, fisher_max_examples)
    return _ewc_method("ewc", lam, "separate", 1.0, options)


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
    options = _fisher_options(fisher_labels, fisher_granularity, fisher_normalization,
                              fisher_batch_size, fisher_max_examples)
    return _ewc_method("online_ewc", lam, "online", decay, options)


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
        return state._replace(memory=l2_update_memory(state.params, state.memory))

    return Method(name="l2", optimizer=before(ewc_penalty(lam=lam)), init_memory=init_memory,
                  extra_args=extra_args, consolidate=consolidate)


def l2_update_memory(model_or_params: Any, memory: PyTree | None = None) -> PyTree:
    """L2's task-end update as a plain function: the anchor becomes a copy of the params.

    The ``l2`` method's ``consolidate`` hook is this function. In a user's own loop, pass
    ``anchor=memory["anchor"]`` to :func:`clax.transforms.ewc.l2_penalty` once
    ``memory["count"] > 0`` (or ``fisher=(count > 0)`` to ``ewc_penalty``, as ``l2`` does)::

        memory = l2_update_memory(model)  # at the end of each task (None the first time)

    Args:
        model_or_params: An ``nnx.Module`` (its ``nnx.Param`` variables), or the
            parameters as a pure dict or ``nnx.State``.
        memory: The previous ``{"anchor", "count"}`` memory, or None (count 0).

    Returns:
        ``{"anchor": copy of the params (pure dict, new buffers), "count": int32 () count
        of task ends so far}``.
    """
    params = (nnx.state(model_or_params, nnx.Param) if isinstance(model_or_params, nnx.Module)
              else model_or_params)
    count = jnp.zeros((), jnp.int32) if memory is None else jnp.asarray(memory["count"])
    return {"anchor": jax.tree.map(jnp.copy, pure_tree(params)), "count": count + 1}
