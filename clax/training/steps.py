"""Jitted training and evaluation steps of the continual loop.

`StepFns.train_chunk` runs many steps as one `lax.fori_loop` over index batches into
device-resident arrays: no host work between steps. `StepFns.train_step` is the same
step for host-fed batches. Both donate the incoming `TrainState`, and both produce the same
numbers for the same batches, which the tests check. The loss and the evaluation metrics
come from the run's `Objective`; nothing here assumes images or class labels.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from clax.core import (
    Batch,
    Classification,
    DataSpec,
    Method,
    ModelFns,
    Objective,
    Replay,
    StepContext,
    StepOutputs,
    TrainState,
    num_examples,
)
from clax.models import sharding_hints
from clax.training import distributed
from clax.training import sharding as sharding_lib
from clax.typing import Path, PyTree


def next_power_of_two(n: int) -> int:
    """Smallest power of two >= n (n >= 1): a shape bucket that bounds recompilations."""
    return 1 << max(0, int(n) - 1).bit_length()


def pad_to_bucket(arrays: Batch) -> Batch:
    """Zero-pads the leading axis to a size bucket, so tasks of similar size share shapes.

    Buckets are multiples of 2^(bits(N) - 3): at most 12.5%-25% padding. Padded rows are
    never indexed by the training loop.
    """
    n = num_examples(arrays)
    step = 1 << max(0, n.bit_length() - 3)
    size = -(-n // step) * step
    return jax.tree.map(
        lambda a: np.concatenate([a, np.zeros((size - n, *a.shape[1:]), a.dtype)]), arrays
    )


class StepMetrics(NamedTuple):
    """Per-step scalars returned by the training step."""

    loss: jax.Array  # total loss (task loss + method terms)


def _to_global(x, sharding: NamedSharding):
    """One leaf onto the run's (multi-process) mesh: a global array is resharded there;
    a host or single-device value (a boundary hook's result, the same on every process)
    is placed without a cross-process transfer (`distributed.host_to_global`)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return jax.device_put(x, sharding)
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        data = distributed.host_to_global(np.asarray(jax.random.key_data(x)), sharding)
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    return distributed.host_to_global(np.asarray(jax.device_get(x)), sharding)


@dataclasses.dataclass(frozen=True, eq=False)
class StepFns:
    """Builds and caches the jitted functions of one run.

    Args:
      model: the functional model.
      method: the continual-learning method.
      tx: the full optimizer (``method.optimizer(base)``).
      mesh: a ``("data", "fsdp", "tensor")`` mesh (`clax.training.sharding.make_mesh`);
        batches are split over ``("data", "fsdp")``, the train state as `rules` say.
      objective: the task loss and evaluation metrics (default: `Classification`).
      data: the shapes of one example and of the model's output for it (`DataSpec`), for
        memory that stores examples (default: an image classifier's, from the model's
        ``input_shape`` and ``num_classes``).
    """

    model: ModelFns
    method: Method
    tx: optax.GradientTransformationExtraArgs
    mesh: jax.sharding.Mesh
    objective: Objective = dataclasses.field(default_factory=Classification)
    data: DataSpec | None = None
    rules: sharding_lib.ShardingRules | None = None
    param_axes: dict[Path, tuple] | None = None

    def __post_init__(self):
        if self.data is None:
            if self.model.input_shape is None or self.model.num_classes is None:
                raise ValueError("StepFns needs data=DataSpec(...) for a model without "
                                 "input_shape and num_classes attributes")
            object.__setattr__(self, "data", DataSpec.for_classifier(
                self.model.input_shape, self.model.num_classes))
        replicated = NamedSharding(self.mesh, P())
        object.__setattr__(self, "_replicated", replicated)
        object.__setattr__(self, "_sharded", sharding_lib.batch_sharding(self.mesh))
        object.__setattr__(self, "_state_sharding", None)
        object.__setattr__(
            self, "train_chunk", jax.jit(self._train_chunk, donate_argnums=(0,))
        )
        object.__setattr__(self, "train_step", jax.jit(self._train_step, donate_argnums=(0,)))
        object.__setattr__(self, "evaluate", jax.jit(self._evaluate))
        object.__setattr__(self, "evaluate_tasks", jax.jit(self._evaluate_tasks))

    # ------------------------------------------------------------------ shardings
    def replicate(self, tree: PyTree) -> PyTree:
        """Places a pytree (host or device arrays) on every device of the mesh.

        In a multi-process run every process passes the same values (each has the whole
        array) and places only its own devices' copies
        (`clax.training.distributed.host_to_global`).
        """
        return distributed.host_to_global(tree, self._replicated)

    @property
    def state_sharding(self) -> PyTree | None:
        """`NamedSharding` per leaf of the train state (None before the first state)."""
        return self._state_sharding

    def set_state_shardings(self, state: PyTree) -> PyTree:
        """Fixes the train state's shardings from `state` (arrays or shape structs) by the
        run's rules; a later call with a state of another structure is an error."""
        abstract = jax.eval_shape(lambda t: t, state)
        shardings = sharding_lib.state_shardings(abstract, self.mesh, axes=self.param_axes,
                                                 rules=self.rules)
        if self._state_sharding is None:
            object.__setattr__(self, "_state_sharding", shardings)
        elif jax.tree.structure(shardings) != jax.tree.structure(self._state_sharding):
            raise ValueError("the train state's structure changed after its shardings were "
                             "fixed (a boundary hook must keep the state's structure)")
        return self._state_sharding

    def place_state(self, state: TrainState) -> TrainState:
        """A copy of `state` in its shardings, in fresh buffers, safe to donate.

        The steps donate the state, so no leaf may share a buffer with the caller's arrays
        or with another leaf (e.g. memory holding ``params``). ``device_put`` does not
        guarantee that (the shard already on the device may be reused), so this copies
        inside a jitted function, whose outputs are always new buffers. Leaves on one
        device (a boundary hook's host or single-device results) are moved onto the mesh
        first.
        """
        shardings = self.set_state_shardings(state)
        if jax.process_count() == 1:
            return self._copy_state(jax.device_put(state, shardings))
        return self._copy_state(jax.tree.map(_to_global, state, shardings))

    @functools.cached_property
    def _copy_state(self):
        return jax.jit(lambda t: jax.tree.map(jnp.copy, t),
                       out_shardings=self._state_sharding)

    def _constrain_state(self, state: TrainState) -> TrainState:
        if self._state_sharding is None:
            return state
        return jax.lax.with_sharding_constraint(state, self._state_sharding)

    def shard_batch(self, batch: Batch, global_size: int | None = None) -> Batch:
        """Places a host batch on the mesh, split along the batch axis.

        Args:
          batch: the whole global batch (the same on every process), or, with
            `global_size`, only this process's rows of it (`process_rows`, in order).
          global_size: the global batch size when `batch` holds this process's rows.
        """
        return distributed.host_to_global(batch, self._sharded, global_size)

    def process_rows(self, global_size: int) -> np.ndarray:
        """The rows of a global batch of `global_size` that this process feeds (all of
        them in a one-process run): its devices' shards of the batch axis, ascending."""
        return distributed.process_rows(self._sharded, global_size)

    def _constrain(self, batch: Batch) -> Batch:
        return jax.lax.with_sharding_constraint(batch, self._sharded)

    def _split_like_batch(self, tree: PyTree) -> PyTree:
        """Splits examples a method brings from memory (replayed, reference batches) over
        the batch axes like the batch, where they divide: in memory's own layout XLA
        would gather the weights (or their gradients) to contract them."""
        leaves = jax.tree.leaves(tree)
        if leaves and all(np.ndim(a) >= 1 and np.shape(a)[0] % sharding_lib.batch_divisor(
                self.mesh) == 0 for a in leaves):
            return self._constrain(tree)
        return tree

    # ------------------------------------------------------------------ training
    def init_state(self, params: PyTree, model_state: PyTree, seed: int) -> TrainState:
        """Fresh `TrainState` (optimizer and method memory initialised) in its shardings.

        The optimizer state and memory are built by one jitted function whose outputs are
        placed by the sharding rules, so no device holds more than its share.
        """
        def make(params, model_state):
            return TrainState(
                params=params,
                model_state=model_state,
                opt_state=self.tx.init(params),
                memory=self.method.initial_memory(params, self.data),
                rng=jax.random.key(seed),
                step=jnp.zeros((), jnp.int32),
            )

        shardings = self.set_state_shardings(jax.eval_shape(make, params, model_state))
        if jax.process_count() == 1:
            params = jax.device_put(params, shardings.params)
            model_state = jax.device_put(model_state, shardings.model_state)
        else:  # each process places its shards of the (identically initialised) model
            params = jax.tree.map(_to_global, params, shardings.params)
            model_state = jax.tree.map(_to_global, model_state, shardings.model_state)
        return jax.jit(make, out_shardings=shardings)(params, model_state)

    def _forward(self, params, model_state, batch: Batch):
        return self.model.apply(params, model_state, batch.x, batch.task_ids, train=True)

    def _replay_loss(self, params, model_state, batch: Batch, replay: Replay):
        """The objective's weighted loss over ``[batch; replayed]`` in one pass
        (``Method.replay``); returns the current batch's outputs."""
        b = num_examples(batch)
        examples, weights = replay
        shapes = [np.shape(a)[1:] for a in jax.tree.leaves(batch)]
        if ([np.shape(a)[1:] for a in jax.tree.leaves(examples)] != shapes
                or np.shape(weights) != (num_examples(examples),)):
            raise ValueError(
                f"method {self.method.name!r}: replay must return examples shaped like the "
                f"batch's {shapes} and one weight per example; got "
                f"{[np.shape(a) for a in jax.tree.leaves(examples)]} and weights "
                f"{np.shape(weights)}")
        full = jax.tree.map(lambda a, e: jnp.concatenate([a, e.astype(a.dtype)]),
                            batch, examples)
        full = self._split_like_batch(full)
        outputs, new_model_state = self._forward(params, model_state, full)
        w = jnp.concatenate([jnp.ones((b,), jnp.float32), weights.astype(jnp.float32)])
        loss = self.objective.loss(outputs, full, w)
        return loss, (outputs[:b], new_model_state)

    def _resolve_activation(self, shape: tuple[int, ...], names) -> NamedSharding | None:
        """Activation axes -> this mesh (`clax.models.sharding_hints`); None where a named
        dimension does not divide its axes (the activation is left to XLA)."""
        # Only the names decide: the FSDP rule for unnamed dimensions is for stored state.
        rules = dataclasses.replace(self.rules or sharding_lib.ShardingRules(),
                                    fsdp_min_size=2**62)
        try:
            spec = rules.spec(shape, names, self.mesh)
        except ValueError:
            return None
        return NamedSharding(self.mesh, spec)

    def _step(self, state: TrainState, batch: Batch, task_index: jax.Array):
        with sharding_hints.hints(self._resolve_activation):
            return self._step_body(state, batch, task_index)

    def _step_body(self, state: TrainState, batch: Batch, task_index: jax.Array):
        batch = self._constrain(batch)
        method = self.method
        key = jax.random.fold_in(state.rng, state.step)
        loop_key, method_key = jax.random.split(key)
        del loop_key  # reserved for loop-side randomness (e.g. augmentation)

        def apply(params, x, task_ids):
            x, task_ids = self._split_like_batch((x, task_ids))
            return self.model.apply(params, state.model_state, x, task_ids, train=True)[0]

        def task_loss(params, other: Batch):
            other = self._split_like_batch(other)
            return self.objective.loss(self._forward(params, state.model_state, other)[0], other)

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
        replay = method.replay(ctx) if method.replay is not None else None

        def total_loss(params):
            if replay is None:
                outputs, model_state = self._forward(params, state.model_state, batch)
                loss = self.objective.loss(outputs, batch)
            else:
                loss, (outputs, model_state) = self._replay_loss(
                    params, state.model_state, batch, replay)
            if method.loss_terms is not None:
                loss = loss + method.loss_terms(params, ctx)
            return loss, (outputs, model_state)

        (loss, (outputs, model_state)), grads = jax.value_and_grad(total_loss, has_aux=True)(
            state.params
        )
        extra = method.extra_args(ctx) if method.extra_args is not None else {}
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params, **extra)
        params = optax.apply_updates(state.params, updates)
        memory = state.memory
        if method.update_memory is not None:
            memory = method.update_memory(memory, ctx, StepOutputs(outputs, grads, updates,
                                                                   params))
        new_state = TrainState(
            params=params,
            model_state=model_state,
            opt_state=opt_state,
            memory=memory,
            rng=state.rng,
            step=state.step + 1,
        )
        return self._constrain_state(new_state), StepMetrics(loss=loss)

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
            state, losses = carry
            batch = jax.tree.map(lambda a: a[index_batches[s]], data)
            state, m = self._step(state, batch, task_index)
            return state, losses.at[s].set(m.loss)

        zeros = jnp.zeros((capacity,), jnp.float32)
        state, losses = jax.lax.fori_loop(0, num_steps, body, (state, zeros))
        return state, StepMetrics(loss=losses)

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
    def predict(self, params, model_state, memory, x: PyTree, task_ids: jax.Array):
        """Evaluation-mode outputs: the model's head, or the method's `predict` hook."""
        if self.method.predict is None:
            return self.model.apply(params, model_state, x, task_ids, train=False)[0]
        features = self.model.features(params, model_state, x)
        return self.method.predict(memory, features, task_ids)

    def _evaluate(self, params, model_state, memory, data: Batch, valid: jax.Array
                  ) -> dict[str, jax.Array]:
        """The objective's evaluation sums over padded eval batches.

        Args:
          memory: the method's memory (read only by a `Method.predict` hook).
          data: arrays shaped (num_batches, batch, ...).
          valid: bool (num_batches, batch); False marks padding.
        """

        def body(_, inputs):
            batch, ok = inputs
            batch = self._constrain(batch)
            with sharding_hints.hints(self._resolve_activation):
                outputs = self.predict(params, model_state, memory, batch.x, batch.task_ids)
            return None, self.objective.eval_sums(outputs, batch, ok)

        _, sums = jax.lax.scan(body, None, (data, valid))
        return jax.tree.map(lambda s: s.sum(0), sums)

    def _evaluate_tasks(self, params, model_state, memory, data: Batch, valid: jax.Array,
                        tasks: jax.Array, num_tasks: jax.Array) -> dict[str, jax.Array]:
        """Evaluation sums of several tasks' evaluation sets in one call.

        The continual-evaluation step: every seen task in one dispatch, one host transfer.

        Args:
          memory: the method's memory (read only by a `Method.predict` hook).
          data: every task's padded eval batches, stacked: (T, num_batches, batch, ...).
          valid: bool (T, num_batches, batch); False marks padding.
          tasks: int32 (K,) indices into the T sets; the first `num_tasks` are evaluated.
          num_tasks: int32 scalar, traced: any number of tasks shares one compilation
            (a loop of `num_tasks` iterations; unevaluated tasks cost nothing).

        Returns:
          each statistic as a (K,) array, zero past `num_tasks`.
        """
        first = jax.tree.map(lambda a: a[0], data)
        template = jax.eval_shape(self._evaluate, params, model_state, memory, first, valid[0])
        init = jax.tree.map(lambda s: jnp.zeros(tasks.shape, s.dtype), template)

        def body(j, acc):
            k = tasks[j]
            task_data = jax.tree.map(lambda a: a[k], data)
            sums = self._evaluate(params, model_state, memory, task_data, valid[k])
            return jax.tree.map(lambda a, s: a.at[j].set(s), acc, sums)

        return jax.lax.fori_loop(0, num_tasks, body, init)
