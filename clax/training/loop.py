"""The continual-training loop: tasks in order, evaluation, checkpoints, resume.

`train_continual(config, workdir)` trains a model on every task of the configured
scenario with the configured method and returns the metric matrices (one per metric of
the run's objective) and their summary. With a workdir it checkpoints at task boundaries
(and every N steps if asked) and a second call with the same workdir resumes where the
first stopped, ending with the same metrics.

The loop is a few small parts: `_build` (scenario, model, objective, method, jitted
steps, evaluators), `_resume` (the latest checkpoint, if any), `_train_task` (boundary
hooks around `_train_epoch`), `_train_epoch` (compiled chunks of steps, continual
evaluation, periodic checkpoints) and `_finish` (summary and result files). Everything
that must survive a restart lives in the typed `Progress`, saved next to the state.

Multi-process runs (`clax.training.distributed`) run this same loop on every process over
one global mesh: process 0 writes the workdir's files, all processes save and restore the
checkpoints together. SIGTERM (preemption) makes the loop finish its chunk of steps, save
a checkpoint and raise `Preempted`; the same call resumes.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from clax import metrics as clax_metrics
from clax.core import (
    Batch,
    BoundaryContext,
    Classification,
    DataSpec,
    Method,
    ModelFns,
    Objective,
    TrainArrays,
    TrainState,
    current_task_data,
    example_spec,
    num_examples,
    primary_metric,
)
from clax.data import Scenario
from clax.params import train_only
from clax.training import config as config_lib
from clax.training import distributed, feed, health
from clax.training import sharding as sharding_lib
from clax.training import workdir as workdir_lib
from clax.training.checkpoint import Checkpointer
from clax.training.health import NonFiniteLossError, NonFiniteStateError  # noqa: F401  (API)
from clax.training.steps import StepFns, next_power_of_two, pad_to_bucket

log = logging.getLogger("clax")


class Preempted(Exception):
    """SIGTERM (a preemption notice): the run finished its chunk of steps, saved checkpoint
    ``checkpoint`` (every process) and stopped; the same call or command resumes it."""

    def __init__(self, checkpoint: int):
        self.checkpoint = checkpoint
        super().__init__(f"preempted: saved checkpoint {checkpoint}; rerun the same command "
                         "to resume")


def progress_from_json(cls: type, meta: dict[str, Any], what: str):
    """``cls(**meta)`` for a progress dataclass, refusing fields another version wrote."""
    unknown = sorted(set(meta) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ValueError(f"{what} has unknown fields {unknown}; it was written by another "
                         "clax version. Use a new --workdir.")
    return cls(**meta)


@dataclasses.dataclass
class Progress:
    """Where a run is and what it has measured: saved with every checkpoint (as JSON).

    ``rows[i]`` maps each metric to its values on every task after task ``i``;
    ``baseline`` maps each metric to the initial model's values.
    """

    task: int = 0  # the next task to train (or the one in progress)
    epoch: int = 0  # the next epoch of that task
    # Steps of that epoch already taken (resume mid-epoch). It is also the host-fed
    # pipeline's whole position: the epoch's index batches are a function of (seed, task,
    # epoch) and the pipeline restarts at this row (its grain iterator state would only
    # repeat this count), so no iterator state is saved.
    step_in_epoch: int = 0
    done: bool = False
    baseline: dict[str, list[float]] | None = None
    rows: list[dict[str, list[float]]] = dataclasses.field(default_factory=list)
    curves: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    task_boundaries: list[int] = dataclasses.field(default_factory=list)  # start step per task
    train_time_s: float = 0.0  # in training steps and boundary hooks (compiles included)
    task_train_time_s: list[float] = dataclasses.field(default_factory=list)
    eval_time_s: float = 0.0  # in continual (periodic) evaluation, compiles included
    task_eval_time_s: list[float] = dataclasses.field(default_factory=list)
    task_start_train_time_s: float = 0.0  # train_time_s when the current task started
    task_start_eval_time_s: float = 0.0  # eval_time_s when the current task started
    # What happened to the run itself: unusable checkpoints skipped on resume
    # ({"checkpoint", "reason", "resumed_from"}), config changes allowed on resume
    # ({"key", "old", "new", "at_step"}), and warnings (exploding parameters).
    recovered: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    config_changes: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)
    # The first growth warning: its step and the newest checkpoint before the growth.
    exploded: dict[str, Any] | None = None
    param_peaks: list[list[float]] = dataclasses.field(default_factory=list)  # [ckpt, step, max|θ|]

    @classmethod
    def from_json(cls, meta: dict[str, Any]) -> Progress:
        return progress_from_json(cls, meta, "checkpoint progress")

    def matrix(self, metric: str) -> np.ndarray:
        """The (tasks done, T) matrix of `metric`."""
        return np.asarray([row[metric] for row in self.rows], np.float64)


@dataclasses.dataclass
class RunResult:
    """What a finished run returns (also written to the workdir)."""

    name: str
    metric: str  # the primary metric (the objective's first): summary and `matrix`
    higher_is_better: bool  # the primary metric's direction
    matrices: dict[str, np.ndarray]  # metric -> (T, T): row i after task i, column j task j
    baselines: dict[str, np.ndarray]  # metric -> (T,) the initial model on each task
    summary: dict[str, Any]  # acc, bwt, fwt, forgetting (of the primary metric), ...
    curves: list[dict[str, Any]]  # periodic evaluations (step, train_task, eval_task, value)
    train_time_s: float  # time in training steps and consolidation (compiles included)
    task_train_time_s: list[float]  # the same, per task
    eval_time_s: float = 0.0  # time in continual (periodic) evaluation, compile included
    task_eval_time_s: list[float] = dataclasses.field(default_factory=list)  # the same, per task
    task_boundaries: list[int] = dataclasses.field(default_factory=list)  # start step per task
    recovered: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # see Progress
    config_changes: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)
    state: TrainState | None = None
    model: ModelFns | None = None

    @property
    def matrix(self) -> np.ndarray:
        """The primary metric's (T, T) matrix."""
        return self.matrices[self.metric]

    @property
    def baseline(self) -> np.ndarray:
        """The primary metric of the initial model on each task, (T,)."""
        return self.baselines[self.metric]

    @property
    def accuracy_matrix(self) -> np.ndarray:
        """The accuracy matrix (classification objectives)."""
        if "accuracy" not in self.matrices:
            raise KeyError(f"run {self.name!r} has no accuracy (its objective reports "
                           f"{', '.join(self.matrices)}); use RunResult.matrix")
        return self.matrices["accuracy"]


# ------------------------------------------------------------------------------ checks


def _check_model_fits(fns: ModelFns, scenario: Scenario, objective: Objective) -> None:
    """Shape checks before anything is compiled."""
    if fns.input_shape is not None:
        shape, data = tuple(fns.input_shape), tuple(scenario.input_shape)
        fits = shape == data or (not isinstance(objective, Classification)
                                 and len(shape) == len(data) == 1 and shape[0] >= data[0])
        if not fits:
            raise ValueError(
                f"model input shape {shape} does not match the data's input shape {data} "
                f"(scenario {scenario.name!r})"
            )
    if fns.num_classes is not None and fns.num_classes < scenario.num_classes:
        raise ValueError(
            f"model has {fns.num_classes} outputs but scenario {scenario.name!r} has "
            f"{scenario.num_classes} classes"
        )
    if fns.num_tasks > 1 and not scenario.uses_task_ids:
        raise ValueError(
            f"model has {fns.num_tasks} heads, but scenario {scenario.name!r} is "
            f"{scenario.kind} and gives no task ids; heads would be picked with task "
            "knowledge the scenario does not allow. Use a single-head model."
        )
    if fns.num_tasks not in (1, scenario.num_tasks):
        raise ValueError(
            f"model has {fns.num_tasks} heads; expected 1 or the scenario's "
            f"{scenario.num_tasks} tasks"
        )


def _check_online(scenario: Scenario, method: Method, train: ml_collections.ConfigDict
                  ) -> bool:
    """Whether `scenario` is an online stream, after checking `method` can run on one.

    An online stream (``Scenario.online``) is one pass over the data with the task
    boundaries hidden from the method: the loop trains one epoch per task and passes task
    index 0 and task ids 0 to the step hooks. Methods that need boundaries (boundary
    hooks, their own training data) are refused.
    """
    if not scenario.online:
        return False
    hooks = [h for h in ("before_task", "consolidate") if getattr(method, h) is not None]
    if hooks:
        raise ValueError(
            f"method {method.name!r} needs task boundaries (it has {' and '.join(hooks)} "
            f"hooks), but scenario {scenario.name!r} is an online stream that hides them. "
            "Use a method without boundary hooks, or the scenario without online=True."
        )
    if method.training_data is not current_task_data:
        raise ValueError(
            f"method {method.name!r} chooses its own training data per task "
            f"(training_data), which needs task boundaries; scenario {scenario.name!r} is "
            "an online stream: one pass over the data as it arrives"
        )
    if train.reset_optimizer_per_task:
        raise ValueError(
            "config.train.reset_optimizer_per_task=True resets the optimizer at task "
            f"boundaries, which online stream {scenario.name!r} hides; set it to False"
        )
    if train.epochs_per_task != 1:
        log.warning("%s is an online stream (one pass): config.train.epochs_per_task=%d is "
                    "ignored, each task is trained for 1 epoch", scenario.name,
                    train.epochs_per_task)
    return True


def _checked_hook_state(new: TrainState, old: TrainState, hook: str, method: Method
                        ) -> TrainState:
    """Boundary hooks must keep every shape (one compiled step; restorable checkpoints)."""
    if not isinstance(new, TrainState):
        raise TypeError(f"method {method.name!r}: {hook} must return a TrainState, "
                        f"got {type(new).__name__}")
    for part in ("params", "model_state", "opt_state", "memory"):
        a, b = getattr(old, part), getattr(new, part)
        if jax.tree.structure(a) != jax.tree.structure(b):
            raise ValueError(
                f"method {method.name!r}: {hook} changed the tree structure of state.{part}; "
                "memory must keep the structure init_memory gave it (use fixed capacity)"
            )
        for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b),
                                strict=True):
            was, now = (np.shape(x), _dtype(x)), (np.shape(y), _dtype(y))
            if was != now:
                raise ValueError(
                    f"method {method.name!r}: {hook} changed state.{part}"
                    f"{jax.tree_util.keystr(path)} from {was[0]} {was[1]} to {now[0]} {now[1]}; "
                    "keep shapes fixed (pad to a capacity and track the used size)"
                )
    return new


def _dtype(x: Any) -> str:
    return str(getattr(x, "dtype", None) or np.result_type(x))


def _eval_period(train: ml_collections.ConfigDict) -> int:
    """ρ of continual evaluation: ``config.train.eval_every_steps`` (0: off; checked by
    `config.validate_config`)."""
    return int(train.eval_every_steps)


# ------------------------------------------------------------------------- evaluation


def _eval_sets(fns: StepFns, scenario: Scenario, batch_size: int, subsample: int | None,
               seed: int) -> list[tuple[Batch, np.ndarray, int]]:
    sets = []
    for task in scenario.tasks:
        keep = feed.subsample(num_examples(task.y_test), subsample, seed=seed + task.id)
        x, y = (jax.tree.map(lambda a, k=keep: a[k], part) for part in (task.x_test, task.y_test))
        batches, valid = feed.padded_eval_batches(
            x, y, np.full(len(keep), task.id, np.int32), batch_size)
        sets.append((batches, valid, len(keep)))
    return sets


class _Evaluator:
    """Every metric of the objective on each task's test set (full or a fixed subsample)."""

    def __init__(self, fns: StepFns, scenario: Scenario, batch_size: int, subsample: int | None,
                 seed: int):
        self._fns = fns
        self._sets = [(fns.replicate(b), fns.replicate(v), n)
                      for b, v, n in _eval_sets(fns, scenario, batch_size, subsample, seed)]

    def evaluate(self, state: TrainState, tasks: range) -> dict[str, list[float]]:
        """Dispatches every task's evaluation, then reads all sums in one transfer."""
        sums = [self._fns.evaluate(state.params, state.model_state, state.memory,
                                   *self._sets[j][:2]) for j in tasks]
        values = [self._fns.objective.finalize(s) for s in distributed.to_host(sums)]
        return {m.name: [v[m.name] for v in values] for m in self._fns.objective.metrics}


class _ContinualEvaluator:
    """Continual evaluation: every seen task's fixed test subsample, in one jitted call.

    Each task's subsample (``subsample`` examples drawn once per task and seed) is padded to
    the same number of batches and the sets are stacked on the devices, so evaluating any set
    of tasks is one dispatch of `StepFns.evaluate_tasks` (the task count is traced: one
    compilation per run) and one host transfer of the sums.
    """

    def __init__(self, fns: StepFns, scenario: Scenario, batch_size: int, subsample: int | None,
                 seed: int):
        self._fns = fns
        sets = _eval_sets(fns, scenario, batch_size, subsample, seed)
        num_batches = max(len(valid) for _, valid, _ in sets)

        def stack(*arrays):
            return np.stack([np.concatenate([a, np.zeros((num_batches - len(a), *a.shape[1:]),
                                                          a.dtype)]) for a in arrays])

        self._data = fns.replicate(jax.tree.map(stack, *[batches for batches, _, _ in sets]))
        self._valid = fns.replicate(stack(*[valid for _, valid, _ in sets]))
        self._num_sets = len(sets)

    def evaluate(self, state: TrainState, tasks: range, metric: str) -> list[float]:
        tasks = np.asarray(list(tasks), np.int32)
        index = np.zeros(self._num_sets, np.int32)
        index[: len(tasks)] = tasks
        sums = self._fns.evaluate_tasks(state.params, state.model_state, state.memory,
                                        self._data, self._valid, index, np.int32(len(tasks)))
        sums = distributed.to_host(sums)
        finalize = self._fns.objective.finalize
        return [finalize({k: v[n] for k, v in sums.items()})[metric] for n in range(len(tasks))]


# ---------------------------------------------------------------------------- the run


@dataclasses.dataclass
class _Run:
    """What `_build` makes once per run; the parts below read it."""

    config: ml_collections.ConfigDict
    scenario: Scenario
    method: Method
    objective: Objective
    model: ModelFns
    steps: StepFns
    full_eval: _Evaluator
    sub_eval: _ContinualEvaluator | None
    ckpt: Checkpointer | None
    online: bool
    epochs: int
    rho: int
    preemption: distributed.PreemptionWatch = dataclasses.field(
        default_factory=lambda: distributed.PreemptionWatch(enabled=False))
    config_changes: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    initial_peak: float = 0.0  # max |θ| of the initial parameters (growth warning)
    resume_from: int | None = None  # resume from this checkpoint, not the newest

    @property
    def metric(self) -> str:
        return primary_metric(self.objective).name


def _build(config: ml_collections.ConfigDict, workdir: str | None, scenario: Scenario | None,
           model: nnx.Module | None, method: Method | None, objective: Objective | None,
           allow_config_change: Sequence[str] = (), resume_from_checkpoint: int | None = None
           ) -> tuple[_Run, TrainState]:
    scenario = scenario if scenario is not None else config_lib.build_scenario(config)
    model = model if model is not None else config_lib.build_model(config, scenario)
    method = method if method is not None else config_lib.build_method(config)
    objective = (objective if objective is not None
                 else config_lib.build_objective(config, scenario))
    fns_model, params, model_state = ModelFns.split(model)
    _check_model_fits(fns_model, scenario, objective)
    online = _check_online(scenario, method, config.train)
    config_changes = []
    if workdir is not None:
        config_changes = workdir_lib.check_config(workdir, config,
                                                  allow_changes=allow_config_change)
    tc = config.train
    rho = _eval_period(tc)
    mesh = _mesh(tc)
    shards = sharding_lib.batch_divisor(mesh)
    for key in ("batch_size", "eval_batch_size"):
        if tc[key] % shards:
            raise ValueError(
                f"config.train.{key}={tc[key]} must be divisible by the {shards} batch shards "
                f"of the mesh (data x fsdp of {dict(mesh.shape)}; set config.train.num_devices "
                "or the mesh to change it)"
            )
    first = scenario.tasks[0]
    example = example_spec(TrainArrays(first.x_train, first.y_train,
                                       np.zeros(num_examples(first.y_train), np.int32)))
    output = jax.eval_shape(
        lambda p, s, x, t: fns_model.apply(p, s, x, t, train=False)[0], params, model_state,
        jax.tree.map(lambda a: jax.ShapeDtypeStruct((1, *a.shape), a.dtype), example.x),
        jax.ShapeDtypeStruct((1,), np.int32))
    data = DataSpec(example, jax.ShapeDtypeStruct(output.shape[1:], output.dtype))
    base_tx = config_lib.build_optimizer(config.optimizer)
    tx = method.optimizer(base_tx)
    trainable = config_lib.trainable_mask(config, params)
    if trainable is not None:
        # Adapter-only training: the whole chain (method transforms included) sees the
        # trainable leaves only; the rest get exact zero updates.
        tx = train_only(tx, trainable)
    steps = StepFns(fns_model, method, tx, mesh, objective, data,
                    rules=sharding_lib.ShardingRules(fsdp_min_size=tc.fsdp_min_size),
                    param_axes=sharding_lib.logical_axes(model))
    state = steps.init_state(params, model_state, config.seed)
    ckpt = None
    if workdir is not None:
        ckpt = Checkpointer(os.path.join(workdir, "checkpoints"),
                            max_to_keep=tc.checkpoints_to_keep,
                            async_save=tc.async_checkpoints)
    run = _Run(
        config=config, scenario=scenario, method=method, objective=objective,
        model=fns_model, steps=steps,
        full_eval=_Evaluator(steps, scenario, tc.eval_batch_size, None, config.seed),
        sub_eval=(_ContinualEvaluator(steps, scenario, tc.eval_batch_size, tc.eval_subsample,
                                      config.seed) if rho > 0 else None),
        ckpt=ckpt, online=online, epochs=1 if online else tc.epochs_per_task, rho=rho,
        config_changes=config_changes, initial_peak=health.params_peak(health.health(state)),
        resume_from=resume_from_checkpoint,
    )
    return run, state


def _mesh(tc: ml_collections.ConfigDict) -> jax.sharding.Mesh:
    """The run's ("data", "fsdp", "tensor") mesh from ``config.train``."""
    devices = jax.devices()
    if tc.num_devices:
        if not 1 <= tc.num_devices <= len(devices):
            raise ValueError(f"config.train.num_devices={tc.num_devices} but "
                             f"{len(devices)} device(s) are available")
        if tc.num_devices != len(devices) and jax.process_count() > 1:
            raise ValueError(f"config.train.num_devices={tc.num_devices}: a multi-process run "
                             f"uses all {len(devices)} devices (set 0)")
        devices = devices[:tc.num_devices]
    try:
        return sharding_lib.make_mesh(0, tc.mesh_fsdp, tc.mesh_tensor, devices=devices)
    except ValueError as e:
        raise ValueError(f"config.train.mesh_fsdp / mesh_tensor: {e}") from None


def _resume(run: _Run, state: TrainState) -> tuple[TrainState, Progress]:
    """The newest good checkpoint's state and progress, or a fresh start.

    Unusable newer checkpoints (corrupt files) are skipped, moved aside and recorded in
    ``progress.recovered``; config changes allowed for this resume in
    ``progress.config_changes``.
    """
    if run.resume_from is not None:
        if run.ckpt is None:
            raise ValueError("resume_from_checkpoint needs a workdir")
        set_aside = run.ckpt.set_aside_after(run.resume_from)
    else:
        set_aside = []
    if run.ckpt is None or run.ckpt.latest() is None:
        if run.config_changes:
            log.info("%s: no checkpoint to resume; config changes apply from the start",
                     run.config.name)
        return state, Progress()
    restored = run.ckpt.restore_good(state)
    progress = Progress.from_json(restored.meta)
    step = int(restored.state.step)
    skipped = [*({"checkpoint": n, "reason": "set aside by resume_from_checkpoint"}
                 for n in reversed(set_aside)), *restored.skipped]
    progress.recovered += [{**s, "resumed_from": restored.number} for s in skipped]
    progress.config_changes += [{**c, "at_step": step} for c in run.config_changes]
    numbers = ", ".join(str(s["checkpoint"]) for s in skipped)
    skipped = f"; skipped checkpoint(s) {numbers}" if skipped else ""
    log.info("%s: resumed from checkpoint %d in %s (task %d, epoch %d, step %d)%s",
             run.config.name, restored.number, os.path.dirname(run.ckpt.directory),
             progress.task, progress.epoch, progress.step_in_epoch, skipped)
    return run.steps.place_state(restored.state), progress


def _check_state(run: _Run, state: TrainState, progress: Progress, where: str) -> float:
    """Stops on a non-finite state (before it is saved); warns once on exploding weights.

    Returns max |θ| of the parameters.
    """
    report = health.check_state(state, run.config, where, run.ckpt, progress.exploded)
    warning = health.growth_warning(report, run.initial_peak, run.config, where)
    if warning is not None and progress.exploded is None:
        log.warning("%s", warning)
        progress.warnings.append(warning)
        progress.exploded = {"step": int(state.step), "checkpoint_before": health.calm_before(
            progress.param_peaks, run.initial_peak)}
    return health.params_peak(report)


def _save(run: _Run, state: TrainState, progress: Progress, where: str) -> int | None:
    """Checks the state, then saves a checkpoint (every process takes part); returns its
    number (None: no workdir)."""
    peak = _check_state(run, state, progress, where)
    if run.ckpt is None:
        return None
    latest = run.ckpt.latest()
    progress.param_peaks.append([0 if latest is None else latest + 1, int(state.step), peak])
    return run.ckpt.save(state, dataclasses.asdict(progress))


def _chunk_ends(start: int, steps: int, global_step: int, every: tuple[int, ...]) -> list[int]:
    """Step offsets within an epoch where a chunk must end (periodic evals/checkpoints)."""
    ends = set()
    for n in every:
        if n > 0:
            first = n - (global_step % n)  # steps until the next multiple of n
            ends.update(range(start + first, steps, n))
    ends.add(steps)
    return sorted(e for e in ends if e > start)


def _train_chunk(steps: StepFns, state: TrainState, data: Batch, train: TrainArrays,
                 idx: np.ndarray, task_index: int, *, device_resident: bool,
                 capacity: int, prefetch: int) -> tuple[TrainState, np.ndarray]:
    """Runs the steps of `idx` on either data path; returns the state and per-step losses.

    The host-fed path gathers batches with the grain pipeline (`clax.data.pipeline`),
    `prefetch` batches ahead in threads while the device trains. `idx` starts at the
    chunk's first step, so a resumed epoch never reads the batches before it.

    Multi-process runs: device-resident `data` is replicated onto every device (each
    process holds the whole, small, task); the host-fed path reads only this process's
    rows of each batch (``steps.process_rows``), for data that does not fit, and builds the
    global batch from the processes' shares.
    """
    if device_resident:
        state, m = steps.run_chunk(state, data, idx, task_index, capacity=capacity)
        return state, distributed.to_host(m.loss)
    batch_size = idx.shape[1]
    rows = steps.process_rows(batch_size)  # all rows in a one-process run
    losses = []
    for batch in feed.host_batches(train, idx[:, rows], prefetch=prefetch):
        state, m = steps.train_step(state, steps.shard_batch(batch, batch_size), task_index)
        losses.append(m.loss)
    return state, np.asarray(distributed.to_host(losses))


def _boundary_context(run: _Run, t: int, train: TrainArrays) -> BoundaryContext:
    return BoundaryContext(task_index=t, tasks=run.scenario.tasks, train=train, model=run.model,
                           objective=run.objective,
                           rng=jax.random.fold_in(jax.random.key(run.config.seed), t))


def _run_hook(run: _Run, hook: str, state: TrainState, ctx: BoundaryContext) -> TrainState:
    fn = getattr(run.method, hook)
    new = _checked_hook_state(fn(state, ctx), state, hook, run.method)
    return run.steps.place_state(new)


def _train_epoch(run: _Run, state: TrainState, progress: Progress, t: int, epoch: int,
                 train: TrainArrays, data: Batch, capacity: int) -> tuple[TrainState, float]:
    """One epoch of task `t` from ``progress.step_in_epoch`` on; returns the last loss."""
    tc = run.config.train
    idx = feed.epoch_index_batches(num_examples(train.y), tc.batch_size, seed=run.config.seed,
                                   task_index=t, epoch=epoch)
    start = progress.step_in_epoch
    last_loss = float("nan")
    for end in _chunk_ends(start, len(idx), int(state.step),
                           (tc.eval_every_steps, tc.checkpoint_every_steps)):
        chunk_start = time.perf_counter()
        state, losses = _train_chunk(run.steps, state, data, train, idx[start:end],
                                     0 if run.online else t,
                                     device_resident=tc.device_resident, capacity=capacity,
                                     prefetch=tc.prefetch)
        progress.train_time_s += time.perf_counter() - chunk_start
        health.check_losses(losses, state, run.config, t, epoch, run.ckpt, progress.exploded)
        last_loss = float(losses[-1])
        epoch_done = end == len(idx)
        start = end
        progress.epoch = epoch + 1 if epoch_done else epoch
        progress.step_in_epoch = 0 if epoch_done else end
        step_now = int(state.step)
        if run.sub_eval is not None and step_now % run.rho == 0:
            eval_start = time.perf_counter()
            values = run.sub_eval.evaluate(state, range(t + 1), run.metric)  # every seen task
            progress.eval_time_s += time.perf_counter() - eval_start
            progress.curves += [
                {"step": step_now, "train_task": t, "eval_task": j, "metric": run.metric,
                 "value": v} for j, v in enumerate(values)
            ]
        task_ends_here = epoch_done and epoch + 1 == run.epochs
        every = tc.checkpoint_every_steps
        saved = None
        where = f"at step {step_now} (task {t}, epoch {epoch})"
        if every > 0 and step_now % every == 0 and not task_ends_here:
            saved = _save(run, state, progress, where)
        # SIGTERM: stop here (all processes agree at this call); at a task's end the
        # task-end checkpoint comes first (train_continual stops after it).
        if run.preemption.should_stop() and not task_ends_here:
            raise Preempted(saved if saved is not None else _save(run, state, progress, where))
    return state, last_loss


def _train_task(run: _Run, state: TrainState, progress: Progress, t: int
                ) -> tuple[TrainState, float]:
    """Task `t`: ``before_task``, its epochs, ``consolidate``; returns the last loss."""
    tc = run.config.train
    train = run.method.training_data(run.scenario.tasks, t)
    if run.online:  # the method sees no task ids (and task index 0)
        train = train._replace(task_ids=np.zeros_like(train.task_ids))
    ctx = _boundary_context(run, t, train)
    if progress.epoch == 0 and progress.step_in_epoch == 0:  # not resuming mid-task
        progress.task_boundaries.append(int(state.step))
        progress.task_start_train_time_s = progress.train_time_s
        progress.task_start_eval_time_s = progress.eval_time_s
        if tc.reset_optimizer_per_task and t > 0:
            state = run.steps.place_state(
                state._replace(opt_state=run.steps.tx.init(state.params)))
        if run.method.before_task is not None:
            state = _run_hook(run, "before_task", state, ctx)
    data = Batch(x=train.x, y=train.y, task_ids=train.task_ids)
    if tc.device_resident:
        data = run.steps.replicate(pad_to_bucket(data))
    periods = [p for p in (tc.eval_every_steps, tc.checkpoint_every_steps) if p > 0]
    capacity = next_power_of_two(min([num_examples(train.y) // tc.batch_size, *periods]))
    last_loss = float("nan")
    for epoch in range(progress.epoch, run.epochs):
        state, last_loss = _train_epoch(run, state, progress, t, epoch, train, data, capacity)
    if run.method.consolidate is not None:
        consolidate_start = time.perf_counter()
        state = _run_hook(run, "consolidate", state, ctx)
        progress.train_time_s += time.perf_counter() - consolidate_start
    progress.task_train_time_s.append(progress.train_time_s - progress.task_start_train_time_s)
    progress.task_eval_time_s.append(progress.eval_time_s - progress.task_start_eval_time_s)
    return state, last_loss


def _finish(run: _Run, state: TrainState, progress: Progress, workdir: str | None,
            keep_state: bool) -> RunResult:
    spec = primary_metric(run.objective)
    matrices = {m.name: progress.matrix(m.name) for m in run.objective.metrics}
    baselines = {k: np.asarray(v, np.float64) for k, v in progress.baseline.items()}
    R, b = matrices[spec.name], baselines[spec.name]
    summary = clax_metrics.run_summary(R, b, progress.curves,
                                       higher_is_better=spec.higher_is_better)
    eval_overhead = (progress.eval_time_s / progress.train_time_s
                     if run.rho and progress.train_time_s > 0 else None)
    num_evaluations = len({c["step"] for c in progress.curves})
    if run.rho:
        log.info("%s: continual evaluation every %d steps: %d evaluations in %.1fs (%.0f%% of "
                 "the %.1fs training time)", run.config.name, run.rho, num_evaluations,
                 progress.eval_time_s, 100 * (eval_overhead or 0.0), progress.train_time_s)
    if workdir is not None and distributed.is_main_process():  # process 0 writes the files
        tc = run.config.train
        summary = clax_metrics.write_run_results(
            workdir, name=run.config.name, R=R, b=b, curves=progress.curves,
            metric=spec.name, higher_is_better=spec.higher_is_better,
            extra={"train_time_s": progress.train_time_s, "method": run.method.name,
                   "scenario": run.scenario.name, "eval_every_steps": run.rho,
                   "eval_subsample": tc.eval_subsample if run.rho else None,
                   "num_evaluations": num_evaluations,
                   "eval_time_s": progress.eval_time_s, "eval_overhead": eval_overhead,
                   "total_steps": int(state.step),
                   "matrices": {k: v.tolist() for k, v in matrices.items()},
                   "recovered": progress.recovered, "config_changes": progress.config_changes,
                   "warnings": progress.warnings},
            task_boundaries=progress.task_boundaries[1:],
        )
    groups: dict[tuple[str, int], list[int]] = {}
    for r in progress.recovered:
        groups.setdefault((r["reason"], r["resumed_from"]), []).append(r["checkpoint"])
    for (reason, resumed_from), numbers in groups.items():
        log.warning("%s: note: resumed from checkpoint %d past checkpoint(s) %s (%s)",
                    run.config.name, resumed_from, ", ".join(map(str, sorted(numbers))), reason)
    for c in progress.config_changes:
        log.warning("%s: note: config.%s was changed from %r to %r at step %d (resume)",
                    run.config.name, c["key"], c["old"], c["new"], c["at_step"])
    for w in progress.warnings:
        log.warning("warning: %s", w)
    if run.ckpt is not None:
        run.ckpt.close()
    return RunResult(
        name=run.config.name, metric=spec.name, higher_is_better=spec.higher_is_better,
        matrices=matrices, baselines=baselines, summary=summary, curves=progress.curves,
        train_time_s=progress.train_time_s, task_train_time_s=progress.task_train_time_s,
        eval_time_s=progress.eval_time_s, task_eval_time_s=progress.task_eval_time_s,
        task_boundaries=list(progress.task_boundaries),
        recovered=list(progress.recovered), config_changes=list(progress.config_changes),
        warnings=list(progress.warnings),
        state=state if keep_state else None, model=run.model if keep_state else None,
    )


def train_continual(
    config: ml_collections.ConfigDict,
    workdir: str | None = None,
    *,
    scenario: Scenario | None = None,
    model: nnx.Module | None = None,
    method: Method | None = None,
    objective: Objective | None = None,
    keep_state: bool = False,
    allow_config_change: Sequence[str] = (),
    resume_from_checkpoint: int | None = None,
) -> RunResult:
    """Trains on every task of the scenario in order; evaluates all tasks after each.

    With ``config.train.eval_every_steps = ρ > 0`` it also evaluates every seen task every ρ
    steps on a fixed subsample of its test set (continual evaluation, one jitted call per
    evaluation): the curves of the primary metric, their stability-gap metrics in the
    summary (see `clax.metrics.stability`) and the time spent evaluating
    (`RunResult.eval_time_s`).

    Args:
      config: a run config (see `clax.training.config.default_config`).
      workdir: where checkpoints and results go; None keeps everything in memory.
        Rerunning with the same workdir resumes (and refuses a different config).
      scenario: a prebuilt `clax.data.Scenario` (default: built from the config).
      model: a prebuilt NNX model (default: built from the config).
      method: a prebuilt `Method` (default: ``config.method``).
      objective: a prebuilt `clax.core.Objective` (default: ``config.objective``).
      keep_state: return the final `TrainState` and `ModelFns` in the result.
      allow_config_change: dotted config keys (``"optimizer.learning_rate"``) that may
        differ from the workdir's config when resuming, e.g. to recover from a diverged
        run from its last good checkpoint; each change is recorded (``config_changes``
        in metrics.json and the workdir's config_changes.json).
      resume_from_checkpoint: resume from this checkpoint instead of the newest; the newer
        ones are moved to ``checkpoints.set_aside/`` (kept) and listed as ``recovered``.

    The workdir is locked for the whole call (`clax.training.workdir.WorkdirLock`): a
    second process on the same workdir is refused. On resume, a checkpoint that does
    not read back as saved is skipped for the next older one (logged, moved aside to
    ``checkpoints.corrupt/`` and listed as ``recovered`` in metrics.json).

    Raises:
      NonFiniteLossError: the loss became NaN/inf; the last good checkpoint is kept.
      NonFiniteStateError: a leaf of the state (parameters, optimizer state, memory)
        became NaN/inf; it was not saved (the message names the leaf and the suspects).
      WorkdirInUseError: another live process holds the workdir.
      CorruptCheckpointError: no checkpoint of the workdir reads back as saved.
      Preempted: SIGTERM (with a workdir): the run saved a checkpoint after the chunk of
        steps in flight and stopped; call again with the same arguments to resume.
      ValueError: inconsistent config, data and model (before anything is compiled), or
        a method that needs task boundaries on an online stream (``scenario.online``).
    """
    config_lib.validate_config(config)  # before the workdir is touched
    with workdir_lib.locked(workdir):
        run, state = _build(config, workdir, scenario, model, method, objective,
                            allow_config_change, resume_from_checkpoint)
        # SIGTERM (preemption): checkpoint and stop between chunks of steps (with a workdir).
        with distributed.PreemptionWatch(enabled=run.ckpt is not None) as run.preemption:
            try:
                state, progress = _train_tasks(run, state)
            except BaseException:
                # Preempted, an error or Ctrl-C: a background save in flight is committed
                # (or fails) before the exception leaves; nothing half-written stays behind.
                if run.ckpt is not None:
                    run.ckpt.close()
                raise
        return _finish(run, state, progress, workdir, keep_state)


def _train_tasks(run: _Run, state: TrainState) -> tuple[TrainState, Progress]:
    """Resumes, then trains every remaining task, evaluating and saving after each."""
    state, progress = _resume(run, state)
    T = run.scenario.num_tasks
    if progress.baseline is None:
        progress.baseline = run.full_eval.evaluate(state, range(T))
    first_task = progress.task
    run_start = time.perf_counter()
    for t in range(first_task, T):
        task_start = time.perf_counter()
        task_step0 = int(state.step)
        state, last_loss = _train_task(run, state, progress, t)
        row = run.full_eval.evaluate(state, range(T))
        progress.rows.append(row)
        progress.task, progress.epoch, progress.step_in_epoch = t + 1, 0, 0
        progress.done = t + 1 == T
        saved = _save(run, state, progress, f"at the end of task {t} (step {int(state.step)})")
        dt = time.perf_counter() - task_start
        elapsed = time.perf_counter() - run_start
        task_steps = int(state.step) - task_step0
        log.info(
            "%s: task %d/%d  %d steps in %.1fs (%.0f steps/s)  loss %.3f  %s(seen) %.4g"
            "  elapsed %.1fs  ETA %.0fs",
            run.config.name, t + 1, T, task_steps, dt, task_steps / max(dt, 1e-9), last_loss,
            run.metric, float(np.mean(row[run.metric][: t + 1])), elapsed,
            elapsed / (t + 1 - first_task) * (T - t - 1),
        )
        if not progress.done and run.preemption.should_stop():
            raise Preempted(saved)
    return state, progress
