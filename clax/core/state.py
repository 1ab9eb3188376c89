"""`TrainState`: everything that changes during training, as one pytree."""

from __future__ import annotations

from typing import NamedTuple

import jax
import optax

from clax.typing import PyTree


class TrainState(NamedTuple):
    """Everything that changes during training; a pytree of arrays (jit/orbax friendly)."""

    params: PyTree  # pure dict of nnx.Param values
    model_state: PyTree  # pure dict of the other model variables (e.g. BatchNorm stats)
    opt_state: optax.OptState
    memory: PyTree  # the method's memory, from Method.init_memory
    rng: jax.Array  # base key; step keys are fold_in(rng, step)
    step: jax.Array  # int32 (), global step count
