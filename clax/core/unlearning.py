"""The `Unlearner` contract: how a machine-unlearning method plugs into the unlearning driver.

An unlearner takes a trained model, the examples to forget ``D_f`` and the ones to keep
``D_r``, and returns the unlearned model. It is a frozen bundle of pure functions of one
of two kinds:

* **a gradient procedure**: ``loss(params, forget, retain, ctx) -> scalar`` minimised for
  a number of steps by the optimizer ``optimizer(base)`` (``base`` is the driver's
  configured optimizer, as for `clax.core.Method.optimizer`), with keyword extra args
  ``extra_args(params, forget, retain, ctx) -> dict`` passed to ``tx.update`` each step
  (e.g. GU's retain gradients). ``forget`` and ``retain`` are a batch of each set, drawn
  by the driver; ``ctx`` is a `UnlearnStepContext`. Both run inside the jitted step: pure
  jnp code with static shapes. Gradient ascent and NPO are of this kind;
* **a one-shot edit**: ``edit(state, ctx) -> (state, info)`` with ``ctx`` a
  `UnlearnContext` (host values: the whole forget / retain / training sets), e.g. SSD's
  dampening or ACU's exact recursive-least-squares downdate. ``info`` is a JSON-friendly
  dict the driver writes with the metrics (what was dampened, the α chosen, ...).

Optionally, ``retrain(state, ctx) -> (state, info)`` gives, in closed form, the model that
retraining from scratch on ``D_r`` would give (ACU: ridge regression refit on the retained
features), a cheap exact reference instead of rerunning the training.

Unlearners are objective-agnostic: they read the task loss from ``ctx.objective``
(`clax.core.Objective.per_example_loss`), so a forget loss written once works for a
classifier (cross-entropy) and a language model (next-token cross-entropy).

The registry (`register_unlearner`, `make_unlearner`, `registered_unlearners`,
`unlearner_hyperparameters`) maps names to factories ``(**hyperparameters) ->
Unlearner``, like the method registry (`clax.core.registry`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax

from clax.core.batch import Batch, TrainArrays
from clax.core.method import Method, OptimizerFn, plain
from clax.core.model_fns import ModelFns
from clax.core.objective import Objective
from clax.core.registry import Registry
from clax.core.state import TrainState
from clax.typing import PyTree

__all__ = [
    "UnlearnContext",
    "UnlearnStepContext",
    "Unlearner",
    "make_unlearner",
    "register_unlearner",
    "registered_unlearners",
    "unlearner_hyperparameters",
]


class UnlearnStepContext(NamedTuple):
    """What a gradient unlearner's ``loss`` and ``extra_args`` read. Built inside the step.

    Forward passes are in evaluation mode (normalisation statistics frozen; the model
    state does not change during unlearning).
    """

    reference: PyTree  # the original model's parameters (frozen; NPO's π_ref)
    model_state: PyTree  # the model's non-parameter state (BatchNorm statistics)
    memory: PyTree  # the continual method's memory of the original run (read only)
    rng: jax.Array  # a key for this step (independent of the driver's batch sampling)
    step: jax.Array  # int32 (), unlearning steps before this one
    objective: Objective  # the task loss: per_example_loss(outputs, batch) -> (B,)
    # apply(params, x, task_ids) -> outputs, evaluation mode.
    apply: Callable[..., jax.Array]

    def per_example_loss(self, params: PyTree, batch: Batch) -> jax.Array:
        """``objective.per_example_loss`` of the model at ``params`` on ``batch``: (B,)."""
        return self.objective.per_example_loss(self.apply(params, batch.x, batch.task_ids),
                                               batch)

    def loss(self, params: PyTree, batch: Batch) -> jax.Array:
        """The objective's mean task loss of the model at ``params`` on ``batch``."""
        return self.objective.loss(self.apply(params, batch.x, batch.task_ids), batch)


class UnlearnContext(NamedTuple):
    """What a one-shot ``edit`` (or ``retrain``) reads. Not traced: host values."""

    model: ModelFns
    objective: Objective
    method: Method  # the continual method that trained the original model (e.g. "acil")
    train: TrainArrays  # the whole training set D the original learned (D_f ∪ D_r), in order
    forget: TrainArrays  # D_f
    retain: TrainArrays  # D_r
    # evaluate(state, arrays) -> the objective's metrics of `state` on `arrays` (e.g.
    # {"accuracy", "loss"}), with the continual method's predict hook if it has one.
    evaluate: Callable[[TrainState, TrainArrays], dict[str, float]]
    rng: jax.Array  # a key for the edit, from the run seed
    log: Callable[[str], None]  # progress output of long edits


EditFn = Callable[[TrainState, UnlearnContext], tuple[TrainState, dict[str, Any]]]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Unlearner:
    """An unlearning method, as the unlearning driver sees it (see the module docstring).

    Exactly one of ``loss`` (a gradient procedure, with ``optimizer`` and optional
    ``extra_args``) and ``edit`` (a one-shot edit) is set; ``retrain`` is optional.
    """

    name: str
    optimizer: OptimizerFn = plain
    loss: Callable[[PyTree, Batch, Batch, UnlearnStepContext], jax.Array] | None = None
    extra_args: Callable[[PyTree, Batch, Batch, UnlearnStepContext], dict[str, Any]] | None = None
    edit: EditFn | None = None
    retrain: EditFn | None = None

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise TypeError(f"Unlearner name must be a non-empty str, got {self.name!r}")
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name != "name" and value is not None and not callable(value):
                raise TypeError(f"unlearner {self.name!r}: {field.name} must be callable or "
                                f"None, got {type(value).__name__}")
        if (self.loss is None) == (self.edit is None):
            raise ValueError(f"unlearner {self.name!r} must set exactly one of loss (a gradient "
                             "procedure) and edit (a one-shot edit)")
        if self.edit is not None and (self.extra_args is not None or self.optimizer is not plain):
            raise ValueError(f"unlearner {self.name!r}: optimizer and extra_args belong to a "
                             "gradient procedure (loss), not to an edit")

    @property
    def is_gradient(self) -> bool:
        """Whether it unlearns by optimisation steps (else by a one-shot edit)."""
        return self.loss is not None


# ------------------------------------------------------------------------ the registry

UNLEARNERS: Registry[Unlearner] = Registry("unlearner", Unlearner)


def register_unlearner(name: str) -> Callable[[Callable[..., Unlearner]],
                                              Callable[..., Unlearner]]:
    """Decorator: registers a factory ``(**hyperparameters) -> Unlearner`` under `name`."""
    return UNLEARNERS.register(name)


def unlearner_hyperparameters(name: str) -> dict[str, Any]:
    """The hyperparameters of registered unlearner `name` with their defaults."""
    return UNLEARNERS.hyperparameters(name)


def registered_unlearners() -> tuple[str, ...]:
    """Names of all registered unlearners, sorted."""
    return UNLEARNERS.names()


def make_unlearner(name: str, **kwargs: Any) -> Unlearner:
    """Builds the registered unlearner `name` with hyperparameters `kwargs`.

    Raises:
      ValueError: unknown name (lists the registered ones) or unknown hyperparameter
        (lists the unlearner's valid ones).
      TypeError: the factory did not return an `Unlearner`.
    """
    return UNLEARNERS.make(name, **kwargs)
