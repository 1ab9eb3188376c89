"""Pure functions over an NNX model split into a static graph and array trees.

The training loop keeps parameters and other model variables as plain nested dicts
(``nnx.to_pure_dict``) so optax transforms, orbax checkpoints and users see ordinary
pytrees. `ModelFns` holds the static graph definitions and rebuilds the module inside
traced code with ``nnx.merge``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from flax import nnx

from clax.models.capture import capture_layer_inputs
from clax.typing import PyTree


def _pure(state: nnx.State) -> PyTree:
    return nnx.to_pure_dict(state)


def _optional(model: nnx.Module, name: str, cast):
    value = getattr(model, name, None)
    return None if value is None else cast(value)


@dataclasses.dataclass(frozen=True, eq=False)
class ModelFns:
    """Functional view of an NNX model: `apply`, `features`, `layer_inputs`.

    Any NNX module whose ``__call__`` takes ``(x, task_ids)`` works; the attributes below
    are read from the module when it has them (clax's image models do) and are None
    otherwise (a language model takes sequences of any length).

    Attributes:
      graphdef_train: graph of the module in training mode (BatchNorm uses batch stats).
      graphdef_eval: the same module in evaluation mode (running averages).
      input_shape: the shape of one input the model accepts (e.g. (H, W, C)), or None.
      num_classes: size of the output layer, or None.
      num_tasks: number of heads (1 = single head).
    """

    graphdef_train: Any
    graphdef_eval: Any
    input_shape: tuple[int, ...] | None
    num_classes: int | None
    num_tasks: int

    @classmethod
    def split(cls, model: nnx.Module) -> tuple["ModelFns", PyTree, PyTree]:
        """Splits `model` into (`ModelFns`, params, model_state); params are nnx.Param.

        Works on a clone, so the caller's model keeps its mode (train/eval) and arrays.
        """
        model = nnx.clone(model)
        model.train()
        graphdef_train, params, rest = nnx.split(model, nnx.Param, ...)
        model.eval()
        graphdef_eval = nnx.graphdef(model)
        model.train()
        fns = cls(
            graphdef_train=graphdef_train,
            graphdef_eval=graphdef_eval,
            input_shape=_optional(model, "input_shape", tuple),
            num_classes=_optional(model, "num_classes", int),
            num_tasks=_optional(model, "num_tasks", int) or 1,
        )
        return fns, _pure(params), _pure(rest)

    def module(self, params: PyTree, model_state: PyTree, *, train: bool = False) -> nnx.Module:
        """Rebuilds the NNX module (e.g. to hand to user code or to save)."""
        graphdef = self.graphdef_train if train else self.graphdef_eval
        return nnx.merge(graphdef, params, model_state)

    def apply(
        self,
        params: PyTree,
        model_state: PyTree,
        x: jax.Array,
        task_ids: jax.Array | None,
        *,
        train: bool,
    ) -> tuple[jax.Array, PyTree]:
        """Forward pass; returns (outputs, updated model_state)."""
        model = self.module(params, model_state, train=train)
        logits = model(x, task_ids)
        if not train:
            return logits, model_state
        _, _, rest = nnx.split(model, nnx.Param, ...)
        return logits, _pure(rest)

    def features(self, params: PyTree, model_state: PyTree, x: jax.Array) -> jax.Array:
        """Penultimate features in evaluation mode, shape (B, D) (``module.features``)."""
        module = self.module(params, model_state, train=False)
        if not hasattr(module, "features"):
            raise TypeError(f"{type(module).__name__} has no features(x) method; prototype "
                            "and closed-form heads need one")
        return module.features(x)

    def layer_inputs(
        self, params: PyTree, model_state: PyTree, x: jax.Array, task_ids: jax.Array | None = None
    ) -> dict[tuple, jax.Array]:
        """Inputs of every Linear/Conv layer (evaluation mode), keyed by the layer's path."""
        model = self.module(params, model_state, train=False)
        _, inputs = capture_layer_inputs(model, x, task_ids)
        return inputs
