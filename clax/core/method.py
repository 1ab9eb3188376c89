"""The `Method` contract: how a continual-learning method plugs into a training loop.

A method is a frozen bundle of pure functions and an optimizer hook. Every field has a
no-op default, so a method states only what it changes:

=====================  ================================================================
field                  role
=====================  ================================================================
``optimizer``          ``base tx -> tx``: the method's optax transforms around the base
                       optimizer. Build it with `before` (gradient surgery before the
                       optimizer: projections, penalties), `after` (update-space edits),
                       `around` (a wrapper that needs both the raw gradient and the final
                       update, e.g. an EMA of the parameters) or `chain_around` for
                       several at once.
``init_memory``        ``(params, data: DataSpec) -> memory``: the method's own state
                       (bases, Fisher, replay buffer...). Any pytree, checkpointed with
                       the run. A function of ``params`` alone is accepted too.
``extra_args``         ``StepContext -> dict``: keyword extra args passed each step to
                       ``tx.update(grads, opt_state, params, **extra_args)``.
``replay``             ``StepContext -> Replay``: examples (e.g. replayed ones) trained on
                       *in the same forward/backward pass* as the current batch. The task
                       loss becomes the objective's weighted loss over ``[current;
                       replayed]`` (weight 1 for current examples, ``Replay.weights`` for
                       the others), and train-mode model state (BatchNorm) sees the
                       concatenated batch.
``loss_terms``         ``(params, StepContext) -> scalar`` added to the task loss
                       (regularisers and distillation terms, e.g. DER++'s logit MSE).
``update_memory``      ``(memory, StepContext, StepOutputs) -> memory``, per step, after
                       the update; `StepOutputs` holds the current batch's outputs, the
                       gradient, the update and the new parameters.
``before_task``        ``(TrainState, BoundaryContext) -> TrainState`` at a task start.
``consolidate``        ``(TrainState, BoundaryContext) -> TrainState`` at a task end.
``training_data``      ``(tasks, index) -> TrainArrays``: what the loop trains on for
                       task ``index`` (the current task; ``joint`` uses the union).
``predict``            ``(memory, features, task_ids) -> outputs``: replaces the model's
                       head at evaluation (prototype and closed-form heads that live in
                       memory). ``features`` are the model's penultimate features (B, D).
=====================  ================================================================

Step-time hooks (``extra_args``, ``replay``, ``loss_terms``, ``update_memory``) run inside
the jitted step: pure jnp code with static shapes. Boundary hooks are pure functions of
(state, context) that run between tasks and may call jitted helpers themselves, but must
return memory with the structure, shapes and dtypes that ``init_memory`` gave
(fixed-capacity buffers, padded bases with a rank count): that keeps one compiled step for
the whole run and lets every checkpoint restore into the same template.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
import optax

from clax.core.batch import Batch, DataSpec, TrainArrays
from clax.core.model_fns import ModelFns
from clax.core.objective import Objective
from clax.core.state import TrainState
from clax.data.scenarios import Task
from clax.typing import PyTree

OptimizerFn = Callable[[optax.GradientTransformation], optax.GradientTransformationExtraArgs]


class StepContext(NamedTuple):
    """What a method's step-time hooks can read. Built inside the jitted step."""

    params: PyTree  # parameters before this step's update
    batch: Batch
    memory: PyTree
    rng: jax.Array  # a key for this step, independent of the loop's own use
    step: jax.Array  # int32 (), global step (before this update)
    task_index: jax.Array  # int32 (), index of the task being trained
    # apply(params, x, task_ids) -> outputs, train-mode forward pass with the current
    # model state (state updates such as BatchNorm statistics are discarded).
    apply: Callable[..., jax.Array]
    # loss(params, batch) -> scalar: the objective's task loss on any batch.
    loss: Callable[[PyTree, Batch], jax.Array]


class StepOutputs(NamedTuple):
    """What the step computed, for ``Method.update_memory``."""

    outputs: jax.Array  # the model's outputs on the current batch (before the update)
    grads: PyTree  # gradient of the total loss at ``StepContext.params``
    updates: PyTree  # the optimizer's final update (new params = params + updates)
    params: PyTree  # parameters after the update


class Replay(NamedTuple):
    """Examples a ``Method.replay`` hook adds to the step's batch.

    Attributes:
      examples: a `Batch` shaped like the current batch except for the leading axis (m).
      weights: float32 (m,), each example's weight in the task loss (current examples
        weigh 1); ``Σ_i w_i ℓ_i / Σ_i w_i`` for classification.
    """

    examples: Batch
    weights: jax.Array


class BoundaryContext(NamedTuple):
    """What a method's task-boundary hooks can read. Not traced: plain Python values."""

    task_index: int
    tasks: Sequence[Task]  # all tasks of the scenario (a method must only read seen ones)
    train: TrainArrays  # what was (or will be) trained on for this task
    model: ModelFns  # apply / features / layer inputs
    objective: Objective  # the task loss and metrics (logit masks included)
    rng: jax.Array  # a key for this boundary, derived from the run seed and task index


def _no_memory(params: PyTree) -> PyTree:
    del params
    return ()


def current_task_data(tasks: Sequence[Task], index: int) -> TrainArrays:
    """Default `training_data`: the arrays of task `index` only."""
    task = tasks[index]
    n = len(jax.tree.leaves(task.y_train)[0])
    return TrainArrays(x=task.x_train, y=task.y_train, task_ids=np.full((n,), task.id, np.int32))


# ------------------------------------------------------------------------ optimizer hooks


def _as_extra_args(tx: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    return tx if isinstance(tx, optax.GradientTransformationExtraArgs) else optax.chain(tx)


def plain(base: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """The default optimizer hook: the base optimizer alone."""
    return _as_extra_args(base)


def chain_around(
    *,
    before: optax.GradientTransformation | None = None,
    after: optax.GradientTransformation | None = None,
    wrap: OptimizerFn | None = None,
) -> OptimizerFn:
    """``base -> wrap(chain(before, base, after))``; missing parts are skipped."""

    def build(base: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
        parts = [t for t in (before, base, after) if t is not None]
        tx = optax.chain(*parts)
        return tx if wrap is None else wrap(tx)

    return build


def before(tx: optax.GradientTransformation) -> OptimizerFn:
    """``base -> chain(tx, base)``: `tx` sees the raw gradient (projections, penalties).

    >>> import jax.numpy as jnp
    >>> tx = before(optax.clip(0.1))(optax.sgd(0.5))   # clip the gradient, then SGD
    >>> g = {"w": jnp.ones(2)}
    >>> tx.update(g, tx.init(g), g)[0]["w"].tolist()
    [-0.05000000074505806, -0.05000000074505806]
    >>> tx = after(optax.clip(0.1))(optax.sgd(0.5))    # SGD, then clip the update
    >>> tx.update(g, tx.init(g), g)[0]["w"].tolist()
    [-0.10000000149011612, -0.10000000149011612]
    """
    return chain_around(before=tx)


def after(tx: optax.GradientTransformation) -> OptimizerFn:
    """``base -> chain(base, tx)``: `tx` edits the optimizer's update."""
    return chain_around(after=tx)


def around(wrap: OptimizerFn) -> OptimizerFn:
    """``base -> wrap(base)``: a wrapper that sees the raw gradient and the final update."""
    return chain_around(wrap=wrap)


# ------------------------------------------------------------------------ the contract


@dataclasses.dataclass(frozen=True, kw_only=True)
class Method:
    """A continual-learning method, as a training loop sees it (see module docstring)."""

    name: str
    optimizer: OptimizerFn = plain
    init_memory: Callable[..., PyTree] = _no_memory
    extra_args: Callable[[StepContext], dict[str, Any]] | None = None
    replay: Callable[[StepContext], Replay] | None = None
    loss_terms: Callable[[PyTree, StepContext], jax.Array] | None = None
    update_memory: Callable[[PyTree, StepContext, StepOutputs], PyTree] | None = None
    before_task: Callable[[TrainState, BoundaryContext], TrainState] | None = None
    consolidate: Callable[[TrainState, BoundaryContext], TrainState] | None = None
    training_data: Callable[[Sequence[Task], int], TrainArrays] = current_task_data
    predict: Callable[[PyTree, jax.Array, jax.Array], jax.Array] | None = None

    def __post_init__(self):
        """Checks the fields: ``name`` a non-empty str, every hook callable.

        ``optimizer``, ``init_memory`` and ``training_data`` are always called (their
        defaults are no-ops), so None is refused there; the other hooks may be None.

        Raises:
            TypeError: ``name`` is not a str, or a hook is not callable (or is None where
                one is required), naming the field.
            ValueError: ``name`` is the empty string.
        """
        if not isinstance(self.name, str):
            raise TypeError(f"Method name must be a non-empty str, got {self.name!r} "
                            f"({type(self.name).__name__})")
        if not self.name:
            raise ValueError("Method name must be a non-empty str, got ''")
        for field in dataclasses.fields(self):
            if field.name == "name":
                continue
            value = getattr(self, field.name)
            optional = field.default is None
            if (value is None and not optional) or (value is not None and not callable(value)):
                what = "callable or None" if optional else "callable" + (
                    " (leave it unset for the default)" if value is None else "")
                raise TypeError(f"method {self.name!r}: {field.name} must be {what}, got "
                                f"{value!r} ({type(value).__name__})")
        hook = self.optimizer
        if hook is not plain:
            object.__setattr__(self, "optimizer", _checked_optimizer(self.name, hook))

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


def _checked_optimizer(name: str, hook: OptimizerFn) -> OptimizerFn:
    def build(base: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
        tx = hook(base)
        if not isinstance(tx, optax.GradientTransformationExtraArgs):
            raise TypeError(
                f"method {name!r}: optimizer must return an "
                "optax.GradientTransformationExtraArgs that forwards **extra_args to the "
                f"transforms it wraps, got {type(tx).__name__}")
        return tx

    build.__wrapped__ = hook  # type: ignore[attr-defined]
    return build
