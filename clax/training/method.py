"""The `Method` contract: how a continual-learning method plugs into the training loop.

A method is a frozen bundle of pure functions and optax transforms. Every field has a
no-op default, so a method states only what it changes:

=====================  ================================================================
field                  role
=====================  ================================================================
``transform``          optax transform chained *before* the base optimizer
                       (gradient surgery: projections, penalties, masks).
``post_transform``     optax transform chained *after* the base optimizer
                       (update-space edits).
``wrapper``            ``tx -> tx`` applied around the whole chain, for transforms that
                       need both the raw gradient and the final update (e.g. an EMA of
                       the parameters whose rate depends on the gradient).
``init_memory``        ``params -> memory``: the method's own state (bases, Fisher,
                       replay buffer...). Any pytree; it is checkpointed with the run.
                       Memory that stores examples declares a keyword ``data`` and
                       gets the run's `DataSpec` (input shape, logit width).
``extra_args``         ``StepContext -> dict``: keyword extra args passed each step to
                       ``tx.update(grads, opt_state, params, **extra_args)``.
``loss_terms``         ``(params, StepContext) -> scalar`` added to the task loss.
``extra_batch``        ``StepContext -> (Batch, weights)``: examples (e.g. replayed
                       ones) trained on *in the same forward/backward pass* as the
                       current batch. The task loss becomes the weighted mean
                       ``Σ w_i ℓ_i / Σ w_i`` over ``[current; extra]`` (weight 1 for
                       current examples, ``weights`` (m,) float32 for the extra ones),
                       and train-mode model state (BatchNorm) sees the concatenated
                       batch. ``update_memory`` and the step's accuracy get the current
                       batch's logits only. One pass over ``B + m`` examples is cheaper
                       than a separate replay pass in ``loss_terms``.
``update_memory``      ``(memory, StepContext, logits, new_params) -> memory``, per step.
``before_task``        ``(TrainState, BoundaryContext) -> TrainState`` at a task start.
``consolidate``        ``(TrainState, BoundaryContext) -> TrainState`` at a task end.
``training_data``      ``(tasks, index) -> TrainArrays``: what the loop trains on for
                       task ``index`` (the current task; ``joint`` uses the union).
``predict``            ``(memory, features, task_ids) -> logits``: replaces the model's
                       head at evaluation (prototype and closed-form heads that live in
                       memory). ``features`` are the model's penultimate features (B, D);
                       the logits must have the model's (B, num_classes) shape.
``online_fallback``    what the boundary hooks do on an online stream, whose task
                       boundaries the method is not told (``Scenario.online``): None
                       (the method needs boundaries; the loop refuses the stream) or
                       ``"single_task"`` (the stream is one task: ``before_task`` runs
                       once before it and ``consolidate`` once after it).
=====================  ================================================================

All step-time hooks run inside the jitted training step: they must be pure jnp code with
static shapes. Boundary hooks run between tasks and may call jitted helpers themselves,
but must return memory with the structure, shapes and dtypes that ``init_memory`` gave
(fixed-capacity buffers, padded bases with a rank count): that keeps one compiled step for
the whole run and lets every checkpoint restore into the same template. The loop checks it.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
import optax

from clax.data.scenarios import Task

PyTree = Any


class Batch(NamedTuple):
    """One training or evaluation batch (global, possibly sharded over devices)."""

    x: jax.Array  # float32 (B, H, W, C)
    y: jax.Array  # int32 (B,), global class ids
    task_ids: jax.Array  # int32 (B,), the task each example came from


class TrainArrays(NamedTuple):
    """The arrays a task trains on; `task_ids` is per example (joint mixes tasks)."""

    x: np.ndarray
    y: np.ndarray
    task_ids: np.ndarray


class DataSpec(NamedTuple):
    """Static shapes of a run's data, for memory that stores examples (replay buffers)."""

    input_shape: tuple[int, ...]  # one example, e.g. (H, W, C)
    num_classes: int  # width of the model's logits


class TrainState(NamedTuple):
    """Everything that changes during training; a pytree of arrays (jit/orbax friendly)."""

    params: PyTree  # pure dict of nnx.Param values
    model_state: PyTree  # pure dict of the other model variables (e.g. BatchNorm stats)
    opt_state: optax.OptState
    memory: PyTree  # the method's memory, from Method.init_memory
    rng: jax.Array  # base key; step keys are fold_in(rng, step)
    step: jax.Array  # int32 (), global step count


class StepContext(NamedTuple):
    """What a method's step-time hooks can read. Built inside the jitted step."""

    params: PyTree  # parameters before this step's update
    batch: Batch
    memory: PyTree
    rng: jax.Array  # a key for this step, independent of the loop's own use
    step: jax.Array  # int32 (), global step (before this update)
    task_index: jax.Array  # int32 (), index of the task being trained
    # apply(params, x, task_ids) -> logits, train-mode forward pass with the current
    # model state (state updates such as BatchNorm statistics are discarded).
    apply: Callable[..., jax.Array]
    # loss(params, batch) -> scalar: the task loss (masked cross-entropy) on any batch.
    loss: Callable[[PyTree, Batch], jax.Array]


class BoundaryContext(NamedTuple):
    """What a method's task-boundary hooks can read. Not traced: plain Python values."""

    task_index: int
    tasks: Sequence[Task]  # all tasks of the scenario (a method must only read seen ones)
    train: TrainArrays  # what was (or will be) trained on for this task
    model: Any  # clax.training.model_fns.ModelFns: apply / features / layer inputs
    steps: Any  # clax.training.steps.StepFns: masked loss, mesh, replicate/shard helpers
    rng: jax.Array  # a key for this boundary, derived from the run seed and task index
    config: Any  # the run's ml_collections config (read-only)


def _no_memory(params: PyTree) -> PyTree:
    del params
    return ()


def current_task_data(tasks: Sequence[Task], index: int) -> TrainArrays:
    """Default `training_data`: the arrays of task `index` only."""
    task = tasks[index]
    return TrainArrays(
        x=task.x_train,
        y=task.y_train,
        task_ids=np.full(task.y_train.shape, task.id, np.int32),
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class Method:
    """A continual-learning method, as the training loop sees it (see module docstring)."""

    name: str
    transform: optax.GradientTransformation | None = None
    post_transform: optax.GradientTransformation | None = None
    wrapper: Callable[[optax.GradientTransformation], optax.GradientTransformation] | None = None
    init_memory: Callable[..., PyTree] = _no_memory
    extra_args: Callable[[StepContext], dict[str, Any]] | None = None
    loss_terms: Callable[[PyTree, StepContext], jax.Array] | None = None
    extra_batch: Callable[[StepContext], tuple[Batch, jax.Array]] | None = None
    update_memory: Callable[[PyTree, StepContext, jax.Array, PyTree], PyTree] | None = None
    before_task: Callable[[TrainState, BoundaryContext], TrainState] | None = None
    consolidate: Callable[[TrainState, BoundaryContext], TrainState] | None = None
    training_data: Callable[[Sequence[Task], int], TrainArrays] = current_task_data
    predict: Callable[[PyTree, jax.Array, jax.Array], jax.Array] | None = None
    online_fallback: str | None = None

    def initial_memory(self, params: PyTree, data: DataSpec) -> PyTree:
        """``init_memory(params, data=data)`` if it takes a ``data`` keyword, else
        ``init_memory(params)``."""
        try:
            takes_data = "data" in inspect.signature(self.init_memory).parameters
        except (TypeError, ValueError):  # a callable without a signature (a builtin)
            takes_data = False
        if takes_data:
            return self.init_memory(params, data=data)
        return self.init_memory(params)

    def optimizer(
        self, base: optax.GradientTransformation
    ) -> optax.GradientTransformationExtraArgs:
        """``wrapper(chain(transform, base, post_transform))``; missing parts are skipped."""
        parts = [t for t in (self.transform, base, self.post_transform) if t is not None]
        tx = optax.chain(*parts)
        if self.wrapper is None:
            return tx
        wrapped = self.wrapper(tx)
        if not isinstance(wrapped, optax.GradientTransformationExtraArgs):
            raise TypeError(
                f"method {self.name!r}: wrapper must return an "
                "optax.GradientTransformationExtraArgs that forwards **extra_args to the "
                f"transform it wraps, got {type(wrapped).__name__}"
            )
        return wrapped


# ----------------------------------------------------------------------------- registry

_REGISTRY: dict[str, Callable[..., Method]] = {}


def register_method(name: str) -> Callable[[Callable[..., Method]], Callable[..., Method]]:
    """Decorator: registers a factory ``(**hyperparameters) -> Method`` under `name`."""

    def decorator(factory: Callable[..., Method]) -> Callable[..., Method]:
        old = _REGISTRY.get(name)
        # Re-running the same definition (a notebook cell, a reloaded module) replaces it;
        # a different factory under a taken name is a mistake.
        if old is not None and _qualname(old) != _qualname(factory):
            raise ValueError(
                f"a method named {name!r} is already registered by {_qualname(old)}"
            )
        _REGISTRY[name] = factory
        return factory

    return decorator


def _qualname(f: Callable) -> str:
    return f"{getattr(f, '__module__', '?')}.{getattr(f, '__qualname__', repr(f))}"


def method_hyperparameters(name: str) -> dict[str, Any]:
    """The hyperparameters of registered method `name` with their defaults."""
    if name not in _REGISTRY:
        raise ValueError(
            f"unknown method {name!r}; valid choices: {', '.join(registered_methods())}"
        )
    params = inspect.signature(_REGISTRY[name]).parameters.values()
    return {p.name: p.default for p in params
            if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}


def registered_methods() -> tuple[str, ...]:
    """Names of all registered methods, sorted."""
    return tuple(sorted(_REGISTRY))


def make_method(name: str, **kwargs: Any) -> Method:
    """Builds the registered method `name` with hyperparameters `kwargs`.

    Raises:
      ValueError: unknown name (lists the registered ones) or unknown hyperparameter
        (lists the method's valid ones).
    """
    if name not in _REGISTRY:
        raise ValueError(
            f"unknown method {name!r}; valid choices: {', '.join(registered_methods())}"
        )
    factory = _REGISTRY[name]
    params = inspect.signature(factory).parameters
    valid = [p for p, v in params.items() if v.kind in (v.KEYWORD_ONLY, v.POSITIONAL_OR_KEYWORD)]
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise ValueError(
            f"method {name!r} got unknown hyperparameter(s) {unknown}; valid: {valid or 'none'}"
        )
    method = factory(**kwargs)
    if not isinstance(method, Method):
        raise TypeError(f"factory for {name!r} returned {type(method).__name__}, not Method")
    return method

