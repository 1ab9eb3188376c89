"""Jitted training and evaluation steps.

`StepFns.train_chunk` runs many steps as one `lax.scan` over index batches into
device-resident arrays: no host work between steps. `StepFns.train_step` is the same
step for host-fed batches. Both donate the incoming `TrainState`, and both produce the same
numbers for the same batches, which the tests check.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from clax.training.method import Batch, Method, StepContext, TrainState
from clax.training.model_fns import ModelFns

PyTree = Any

# Logits outside a task's classes are pushed to this value (finite, so no inf - inf NaN).
_MASKED_LOGIT = -1e9


class StepMetrics(NamedTuple):
    """Per-step scalars returned by the training step."""

    loss: jax.Array  # total loss (task loss + method terms)
    accuracy: jax.Array  # training-batch accuracy before the update


def masked_cross_entropy(
    logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None
) -> jax.Array:
    """Mean softmax cross-entropy; `mask` (B, C) bool keeps only each example's classes."""
    if mask is not None:
        logits = jnp.where(mask, logits, _MASKED_LOGIT)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def correct_predictions(
    logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None
) -> jax.Array:
    """Boolean (B,) vector of correct argmax predictions (masked like the loss)."""
    if mask is not None:
        logits = jnp.where(mask, logits, _MASKED_LOGIT)
    return jnp.argmax(logits, axis=-1) == labels


@dataclasses.dataclass(frozen=True, eq=False)
class StepFns:
    """Builds and caches the jitted functions of one run.

    Args:
      model: the functional model.
      method: the continual-learning method.
      tx: the full optimizer (``method.optimizer(base)``).
      mesh: a 1-D mesh with axis ``"data"``; batches are sharded over it, state replicated.
      logit_masks: optional (num_tasks, num_classes) bool table; example b only sees the
        classes of its task ``task_ids[b]`` (task-incremental learning). None: all classes.
    """

    model: ModelFns
    method: Method
    tx: optax.GradientTransformationExtraArgs
    mesh: jax.sharding.Mesh
    logit_masks: np.ndarray | None = None

    def __post_init__(self):
        replicated = NamedSharding(self.mesh, P())
        batch_sharding = Batch(*(NamedSharding(self.mesh, P("data")),) * 3)
        object.__setattr__(self, "_replicated", replicated)
        object.__setattr__(self, "_batch_sharding", batch_sharding)
        masks = None if self.logit_masks is None else jnp.asarray(self.logit_masks, bool)
        object.__setattr__(self, "_masks", masks)
        object.__setattr__(
            self, "train_chunk", jax.jit(self._train_chunk, donate_argnums=(0,))
        )
        object.__setattr__(self, "train_step", jax.jit(self._train_step, donate_argnums=(0,)))
        object.__setattr__(self, "evaluate", jax.jit(self._evaluate))

    # ------------------------------------------------------------------ shardings
    def replicate(self, tree: PyTree) -> PyTree:
        """Places a pytree on every device of the mesh (params, state, resident data)."""
        return jax.device_put(tree, self._replicated)

    def shard_batch(self, batch: Batch) -> Batch:
        """Places a host batch on the mesh, split along the batch axis."""
        return jax.device_put(batch, self._batch_sharding)

    def _mask_for(self, task_ids: jax.Array) -> jax.Array | None:
        return None if self._masks is None else self._masks[task_ids]

    # ------------------------------------------------------------------ training
    def init_state(self, params: PyTree, model_state: PyTree, seed: int) -> TrainState:
        """Fresh `TrainState` (optimizer and method memory initialised), replicated."""
        # Copy: the steps donate the state, and the caller's model must keep its arrays.
        params, model_state = jax.device_put((params, model_state), self._replicated,
                                             may_alias=False)
        state = TrainState(
            params=params,
            model_state=model_state,
            opt_state=self.tx.init(params),
            memory=self.method.init_memory(params),
            rng=jax.random.key(seed),
            step=jnp.zeros((), jnp.int32),
        )
        return self.replicate(state)

    def _loss(self, params, model_state, batch: Batch):
        logits, new_model_state = self.model.apply(
            params, model_state, batch.x, batch.task_ids, train=True
        )
        mask = self._mask_for(batch.task_ids)
        return masked_cross_entropy(logits, batch.y, mask), (logits, new_model_state)

    def _step(self, state: TrainState, batch: Batch, task_index: jax.Array):
        batch = jax.lax.with_sharding_constraint(batch, self._batch_sharding)
        method = self.method
        key = jax.random.fold_in(state.rng, state.step)
        loop_key, method_key = jax.random.split(key)
        del loop_key  # reserved for loop-side randomness (e.g. augmentation)

        def apply(params, x, task_ids):
            return self.model.apply(params, state.model_state, x, task_ids, train=True)[0]

        def task_loss(params, other: Batch):
            return self._loss(params, state.model_state, other)[0]

        ctx = StepContext(
            batch=batch,
            memory=state.memory,
            rng=method_key,
            step=state.step,
            task_index=task_index,
            apply=apply,
            loss=task_loss,
        )

        def total_loss(params):
            loss, aux = self._loss(params, state.model_state, batch)
            if method.loss_terms is not None:
                loss = loss + method.loss_terms(params, ctx)
            return loss, aux

        (loss, (logits, model_state)), grads = jax.value_and_grad(total_loss, has_aux=True)(
            state.params
        )
        extra = method.extra_args(ctx) if method.extra_args is not None else {}
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params, **extra)
        params = optax.apply_updates(state.params, updates)
        memory = state.memory
        if method.update_memory is not None:
            memory = method.update_memory(memory, ctx, logits, params)
        correct = correct_predictions(logits, batch.y, self._mask_for(batch.task_ids))
        new_state = TrainState(
            params=params,
            model_state=model_state,
            opt_state=opt_state,
            memory=memory,
            rng=state.rng,
            step=state.step + 1,
        )
        return new_state, StepMetrics(loss=loss, accuracy=correct.mean())

    def _train_step(self, state: TrainState, batch: Batch, task_index):
        return self._step(state, batch, jnp.asarray(task_index, jnp.int32))

    def _train_chunk(
        self, state: TrainState, data: Batch, index_batches: jax.Array, task_index
    ) -> tuple[TrainState, StepMetrics]:
        """Runs ``len(index_batches)`` steps; batch s is ``data[index_batches[s]]``."""
        task_index = jnp.asarray(task_index, jnp.int32)

        def body(state, idx):
            batch = jax.tree.map(lambda a: a[idx], data)
            return self._step(state, batch, task_index)

        return jax.lax.scan(body, state, index_batches)

    # ------------------------------------------------------------------ evaluation
    def _evaluate(self, params, model_state, data: Batch, valid: jax.Array) -> jax.Array:
        """Number of correct predictions over padded eval batches.

        Args:
          data: arrays shaped (num_batches, batch, ...).
          valid: bool (num_batches, batch); False marks padding.
        """

        def body(_, inputs):
            batch, ok = inputs
            batch = jax.lax.with_sharding_constraint(batch, self._batch_sharding)
            logits, _ = self.model.apply(params, model_state, batch.x, batch.task_ids, train=False)
            correct = correct_predictions(logits, batch.y, self._mask_for(batch.task_ids))
            return None, jnp.sum(correct & ok)

        _, counts = jax.lax.scan(body, None, (data, valid))
        return counts.sum()
