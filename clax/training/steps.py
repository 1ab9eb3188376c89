"""Jitted training and evaluation steps.

`StepFns.train_chunk` runs many steps as one `lax.scan` over index batches into
device-resident arrays: no host work between steps. `StepFns.train_step` is the same
step for host-fed batches. Both donate the incoming `TrainState`, and both produce the same
numbers for the same batches, which the tests check.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from clax.training.method import Batch, DataSpec, Method, StepContext, TrainState
from clax.training.model_fns import ModelFns

PyTree = Any

# Logits outside a task's classes are pushed to this value (finite, so no inf - inf NaN).
_MASKED_LOGIT = -1e9


def next_power_of_two(n: int) -> int:
    """Smallest power of two >= n (n >= 1): a shape bucket that bounds recompilations."""
    return 1 << max(0, int(n) - 1).bit_length()


def pad_to_bucket(arrays: Batch) -> Batch:
    """Zero-pads the leading axis to a size bucket, so tasks of similar size share shapes.

    Buckets are multiples of 2^(bits(N) - 3): at most 12.5%-25% padding. Padded rows are
    never indexed by the training loop.
    """
    n = len(arrays.y)
    step = 1 << max(0, n.bit_length() - 3)
    size = -(-n // step) * step
    return jax.tree.map(
        lambda a: np.concatenate([a, np.zeros((size - n, *a.shape[1:]), a.dtype)]), arrays
    )


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
        object.__setattr__(self, "evaluate_tasks", jax.jit(self._evaluate_tasks))

    # ------------------------------------------------------------------ shardings
    def replicate(self, tree: PyTree) -> PyTree:
        """Places a pytree (host or device arrays) on every device of the mesh."""
        return jax.device_put(tree, self._replicated)

    def place_state(self, state: TrainState) -> TrainState:
        """A replicated copy of `state` in fresh buffers, safe to donate.

        The steps donate the state, so no leaf may share a buffer with the caller's arrays
        or with another leaf (e.g. memory holding ``params``). ``device_put`` does not
        guarantee that when replicating (the shard already on the device may be reused),
        so this copies inside a jitted function, whose outputs are always new buffers.
        """
        return self._copy_state(state)

    @functools.cached_property
    def _copy_state(self):
        return jax.jit(lambda t: jax.tree.map(jnp.copy, t), out_shardings=self._replicated)

    def shard_batch(self, batch: Batch) -> Batch:
        """Places a host batch on the mesh, split along the batch axis."""
        return jax.device_put(batch, self._batch_sharding)

    def _mask_for(self, task_ids: jax.Array) -> jax.Array | None:
        return None if self._masks is None else self._masks[task_ids]

    # ------------------------------------------------------------------ training
    @property
    def data_spec(self) -> DataSpec:
        """The shapes memory that stores examples needs (`Method.init_memory`'s ``data``)."""
        return DataSpec(tuple(self.model.input_shape), int(self.model.num_classes))

    def init_state(self, params: PyTree, model_state: PyTree, seed: int) -> TrainState:
        """Fresh `TrainState` (optimizer and method memory initialised), replicated."""
        state = TrainState(
            params=params,
            model_state=model_state,
            opt_state=self.tx.init(params),
            memory=self.method.initial_memory(params, self.data_spec),
            rng=jax.random.key(seed),
            step=jnp.zeros((), jnp.int32),
        )
        return self.place_state(state)

    def _loss(self, params, model_state, batch: Batch):
        logits, new_model_state = self.model.apply(
            params, model_state, batch.x, batch.task_ids, train=True
        )
        mask = self._mask_for(batch.task_ids)
        return masked_cross_entropy(logits, batch.y, mask), (logits, new_model_state)

    def _mixed_loss(self, params, model_state, batch: Batch, extra: Batch,
                    extra_weights: jax.Array):
        """Weighted mean loss over ``[batch; extra]`` in one pass (``Method.extra_batch``);
        returns the current batch's logits."""
        b = batch.y.shape[0]
        if extra.x.shape[1:] != batch.x.shape[1:] or extra_weights.shape != extra.y.shape:
            raise ValueError(
                f"method {self.method.name!r}: extra_batch must return examples shaped like "
                f"the batch's {batch.x.shape[1:]} and one weight per example; got inputs "
                f"{extra.x.shape} and weights {extra_weights.shape}")
        full = Batch(*(jnp.concatenate([a, e.astype(a.dtype)]) for a, e in zip(batch, extra)))
        logits, new_model_state = self.model.apply(
            params, model_state, full.x, full.task_ids, train=True)
        mask = self._mask_for(full.task_ids)
        masked = logits if mask is None else jnp.where(mask, logits, _MASKED_LOGIT)
        ce = optax.softmax_cross_entropy_with_integer_labels(masked, full.y)
        w = jnp.concatenate([jnp.ones((b,), jnp.float32),
                             extra_weights.astype(jnp.float32)])
        loss = jnp.sum(w * ce) / jnp.sum(w)
        return loss, (logits[:b], new_model_state)

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
            params=state.params,
            batch=batch,
            memory=state.memory,
            rng=method_key,
            step=state.step,
            task_index=task_index,
            apply=apply,
            loss=task_loss,
        )

        extra = method.extra_batch(ctx) if method.extra_batch is not None else None

        def total_loss(params):
            if extra is None:
                loss, aux = self._loss(params, state.model_state, batch)
            else:
                loss, aux = self._mixed_loss(params, state.model_state, batch, *extra)
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
        self, state: TrainState, data: Batch, index_batches: jax.Array, num_steps: jax.Array,
        task_index,
    ) -> tuple[TrainState, StepMetrics]:
        """Runs the first `num_steps` rows of `index_batches`; batch s is ``data[rows[s]]``.

        `index_batches` has a fixed capacity (padded rows are never read) and `num_steps`
        is traced, so chunks of any length up to the capacity share one compilation.
        Metrics past `num_steps` are zero.
        """
        task_index = jnp.asarray(task_index, jnp.int32)
        capacity = index_batches.shape[0]

        def body(s, carry):
            state, losses, accs = carry
            batch = jax.tree.map(lambda a: a[index_batches[s]], data)
            state, m = self._step(state, batch, task_index)
            return state, losses.at[s].set(m.loss), accs.at[s].set(m.accuracy)

        zeros = jnp.zeros((capacity,), jnp.float32)
        state, losses, accs = jax.lax.fori_loop(0, num_steps, body, (state, zeros, zeros))
        return state, StepMetrics(loss=losses, accuracy=accs)

    def run_chunk(
        self, state: TrainState, data: Batch, index_batches: np.ndarray, task_index: int,
        *, capacity: int | None = None,
    ) -> tuple[TrainState, StepMetrics]:
        """Runs one step per row of `index_batches` on device-resident `data`.

        Rows are padded to `capacity` (default: the next power of two) so that chunks of
        different lengths reuse one compiled loop. Returns metrics for the real steps only.
        """
        n = len(index_batches)
        capacity = capacity or next_power_of_two(n)
        if capacity < n:
            raise ValueError(f"capacity={capacity} is smaller than the {n} steps of the chunk")
        padded = np.zeros((capacity, index_batches.shape[1]), np.int32)
        padded[:n] = index_batches
        state, m = self.train_chunk(
            state, data, self.replicate(padded), np.int32(n), np.int32(task_index)
        )
        return state, jax.tree.map(lambda a: a[:n], m)

    # ------------------------------------------------------------------ evaluation
    def predict(self, params, model_state, memory, x: jax.Array, task_ids: jax.Array):
        """Evaluation-mode logits: the model's head, or the method's `predict` hook."""
        if self.method.predict is None:
            return self.model.apply(params, model_state, x, task_ids, train=False)[0]
        features = self.model.features(params, model_state, x)
        return self.method.predict(memory, features, task_ids)

    def _evaluate(self, params, model_state, memory, data: Batch, valid: jax.Array) -> jax.Array:
        """Number of correct predictions over padded eval batches.

        Args:
          memory: the method's memory (read only by a `Method.predict` hook).
          data: arrays shaped (num_batches, batch, ...).
          valid: bool (num_batches, batch); False marks padding.
        """

        def body(_, inputs):
            batch, ok = inputs
            batch = jax.lax.with_sharding_constraint(batch, self._batch_sharding)
            logits = self.predict(params, model_state, memory, batch.x, batch.task_ids)
            correct = correct_predictions(logits, batch.y, self._mask_for(batch.task_ids))
            return None, jnp.sum(correct & ok)

        _, counts = jax.lax.scan(body, None, (data, valid))
        return counts.sum()

    def _evaluate_tasks(self, params, model_state, memory, data: Batch, valid: jax.Array,
                        tasks: jax.Array, num_tasks: jax.Array) -> jax.Array:
        """Correct-prediction counts of several tasks' evaluation sets in one call.

        The continual-evaluation step: every seen task in one dispatch, one host transfer.

        Args:
          memory: the method's memory (read only by a `Method.predict` hook).
          data: every task's padded eval batches, stacked: (T, num_batches, batch, ...).
          valid: bool (T, num_batches, batch); False marks padding.
          tasks: int32 (K,) indices into the T sets; the first `num_tasks` are evaluated.
          num_tasks: int32 scalar, traced: any number of tasks shares one compilation
            (a loop of `num_tasks` iterations; unevaluated tasks cost nothing).

        Returns:
          int32 (K,) counts, zero past `num_tasks`.
        """

        def body(j, counts):
            k = tasks[j]
            task_data = jax.tree.map(lambda a: a[k], data)
            count = self._evaluate(params, model_state, memory, task_data, valid[k])
            return counts.at[j].set(count.astype(jnp.int32))

        return jax.lax.fori_loop(0, num_tasks, body, jnp.zeros(tasks.shape, jnp.int32))
