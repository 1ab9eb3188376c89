"""The continual-training loop: tasks in order, evaluation, checkpoints, resume.

`train_continual(config, workdir)` trains a model on every task of the configured
scenario with the configured method and returns the accuracy matrix and metrics. With a
workdir it checkpoints at task boundaries (and every N steps if asked) and a second call
with the same workdir resumes where the first stopped, ending with the same metrics.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from clax import metrics as clax_metrics
from clax.training import config as config_lib
from clax.training import feed
from clax.training.checkpoint import Checkpointer
from clax.training.method import (
    Batch,
    BoundaryContext,
    Method,
    TrainArrays,
    TrainState,
    current_task_data,
)
from clax.training.model_fns import ModelFns
from clax.training.sharding import data_mesh
from clax.training.steps import StepFns, next_power_of_two, pad_to_bucket

log = logging.getLogger("clax")


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; the run stopped without saving."""


@dataclasses.dataclass
class RunResult:
    """What a finished run returns (also written to the workdir)."""

    name: str
    accuracy_matrix: np.ndarray  # (T, T): row i after task i, column j task j
    baseline: np.ndarray  # (T,) accuracy of the initial model on each task
    summary: dict[str, Any]  # acc, bwt, fwt, forgetting, ...
    curves: list[dict[str, Any]]  # periodic evaluations (step, train_task, eval_task, acc)
    train_time_s: float  # time in training steps and consolidation (compiles included)
    task_train_time_s: list[float]  # the same, per task
    eval_time_s: float = 0.0  # time in continual (periodic) evaluation, compile included
    task_eval_time_s: list[float] = dataclasses.field(default_factory=list)  # the same, per task
    task_boundaries: list[int] = dataclasses.field(default_factory=list)  # start step per task
    state: TrainState | None = None
    model: ModelFns | None = None


def _check_workdir_config(workdir: str, config: ml_collections.ConfigDict) -> None:
    """Refuses to reuse a workdir whose checkpoints come from a different config.

    A workdir without checkpoints (a run that failed before its first save) takes the
    new config.
    """
    path = os.path.join(workdir, "config.json")
    current = json.loads(config.to_json_best_effort())
    has_checkpoints = os.path.isdir(os.path.join(workdir, "checkpoints")) and any(
        name.isdigit() for name in os.listdir(os.path.join(workdir, "checkpoints"))
    )
    if os.path.exists(path) and has_checkpoints:
        with open(path) as f:
            saved = json.load(f)
        diffs = [k for k in _diff_keys(saved, current)
                 if k not in config_lib.OPERATIONAL_KEYS and _affects_run(k, current)]
        if diffs:
            raise ValueError(
                f"workdir {workdir!r} holds a run with a different config (differing keys: "
                f"{', '.join(diffs)}); use another --workdir to start a new run. Nothing in "
                "the workdir was changed."
            )
        if saved == current:
            return
    os.makedirs(workdir, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(current, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def _affects_run(key: str, config: dict) -> bool:
    """False for the subsections of models and methods the run does not use.

    ``config.method.<name>`` exists for every registered method, so registering a new one
    (or changing another method's defaults) must not make older workdirs unresumable.
    """
    parts = key.split(".")
    if len(parts) >= 2 and parts[0] in ("method", "model") and parts[1] != "name":
        return parts[1] == config.get(parts[0], {}).get("name")
    return True


def _diff_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff_keys(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


def _check_model_fits(model: Any, scenario: Any) -> None:
    """Shape checks before anything is compiled."""
    shape = tuple(model.input_shape)
    if shape != tuple(scenario.input_shape):
        raise ValueError(
            f"model input shape {shape} does not match the data's input shape "
            f"{tuple(scenario.input_shape)} (scenario {scenario.name!r})"
        )
    if model.num_classes < scenario.num_classes:
        raise ValueError(
            f"model has {model.num_classes} outputs but scenario {scenario.name!r} has "
            f"{scenario.num_classes} classes"
        )
    if model.num_tasks > 1 and not scenario.uses_task_ids:
        raise ValueError(
            f"model has {model.num_tasks} heads, but scenario {scenario.name!r} is "
            f"{scenario.kind} and gives no task ids; heads would be picked with task "
            "knowledge the scenario does not allow. Use a single-head model."
        )
    if model.num_tasks not in (1, scenario.num_tasks):
        raise ValueError(
            f"model has {model.num_tasks} heads; expected 1 or the scenario's "
            f"{scenario.num_tasks} tasks"
        )


# What `Method.online_fallback` may declare (see `_online_mode`).
ONLINE_FALLBACKS = ("single_task",)


def _online_mode(scenario: Any, method: Method, train: ml_collections.ConfigDict) -> bool:
    """Whether `scenario` is an online stream, after checking `method` can run on one.

    An online stream (``Scenario.online``) is one pass over the data with the task
    boundaries hidden from the method: the loop trains one epoch per task, passes task
    index 0 and task ids 0 to the step hooks, and calls no boundary hooks, except for a
    method declaring ``online_fallback="single_task"``, whose ``before_task`` runs once
    before the stream and ``consolidate`` once after it, both seeing the stream as one
    task (`_stream_context`).
    """
    if not getattr(scenario, "online", False):
        return False
    fallback = method.online_fallback
    if fallback is not None and fallback not in ONLINE_FALLBACKS:
        raise ValueError(
            f"method {method.name!r}: online_fallback must be None or one of "
            f"{ONLINE_FALLBACKS}, got {fallback!r}"
        )
    hooks = [h for h in ("before_task", "consolidate") if getattr(method, h) is not None]
    if hooks and fallback is None:
        raise ValueError(
            f"method {method.name!r} needs task boundaries (it has {' and '.join(hooks)} "
            f"hooks), but scenario {scenario.name!r} is an online stream that hides them. "
            "Use a method without boundary hooks, or one that declares "
            "online_fallback='single_task' (hooks run once around the whole stream)."
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


def _stream_context(ctx: BoundaryContext, scenario: Any) -> BoundaryContext:
    """``ctx`` with the whole online stream as one task (the ``single_task`` fallback)."""
    tasks = scenario.tasks
    whole = tasks[0]._replace(
        id=0,
        **{f: np.concatenate([getattr(t, f) for t in tasks])
           for f in ("x_train", "y_train", "x_test", "y_test")},
        classes=np.unique(np.concatenate([t.classes for t in tasks])).astype(np.int32),
    )
    train = TrainArrays(whole.x_train, whole.y_train, np.zeros(len(whole.y_train), np.int32))
    return ctx._replace(task_index=0, tasks=(whole,), train=train)


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
        for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
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


def _logit_masks(scenario: Any) -> np.ndarray | None:
    """Task-incremental runs see only their task's classes (train and test)."""
    if not scenario.uses_task_ids:
        return None
    masks = np.zeros((scenario.num_tasks, scenario.num_classes), bool)
    for task in scenario.tasks:
        masks[task.id, task.classes] = True
    return masks


def _eval_period(train: ml_collections.ConfigDict) -> int:
    """ρ of continual evaluation: ``config.train.eval_every_steps`` (0: off)."""
    rho = train.eval_every_steps
    if isinstance(rho, bool) or not isinstance(rho, (int, np.integer)) or rho < 0:
        raise ValueError(
            f"config.train.eval_every_steps (ρ, evaluate every seen task every ρ steps) must "
            f"be an int >= 1, or 0 to turn continual evaluation off; got {rho!r}"
        )
    return int(rho)


class _Evaluator:
    """Accuracy of a state on each task's test set (full or a fixed subsample)."""

    def __init__(self, fns: StepFns, scenario: Any, batch_size: int, subsample: int | None,
                 seed: int):
        self._fns = fns
        self._sets = []
        for task in scenario.tasks:
            keep = feed.subsample(len(task.y_test), subsample, seed=seed + task.id)
            tids = np.full(len(keep), task.id, np.int32)
            batches, valid = feed.padded_eval_batches(
                task.x_test[keep], task.y_test[keep], tids, batch_size
            )
            self._sets.append((fns.replicate(batches), fns.replicate(valid), len(keep)))

    def accuracies(self, state: TrainState, tasks: range) -> list[float]:
        """Dispatches every task's evaluation, then reads all counts in one transfer."""
        counts = [self._fns.evaluate(state.params, state.model_state, state.memory,
                                      *self._sets[j][:2])
                  for j in tasks]
        return [int(c) / self._sets[j][2] for c, j in zip(jax.device_get(counts), tasks)]


class _ContinualEvaluator:
    """Continual evaluation: every seen task's fixed test subsample, in one jitted call.

    Each task's subsample (``subsample`` examples drawn once per task and seed) is padded to
    the same number of batches and the sets are stacked on the devices, so evaluating any set
    of tasks is one dispatch of `StepFns.evaluate_tasks` (the task count is traced: one
    compilation per run) and one host transfer of the counts.
    """

    def __init__(self, fns: StepFns, scenario: Any, batch_size: int, subsample: int | None,
                 seed: int):
        self._fns = fns
        sets, sizes = [], []
        for task in scenario.tasks:
            keep = feed.subsample(len(task.y_test), subsample, seed=seed + task.id)
            tids = np.full(len(keep), task.id, np.int32)
            sets.append(feed.padded_eval_batches(task.x_test[keep], task.y_test[keep], tids,
                                                 batch_size))
            sizes.append(len(keep))
        num_batches = max(len(valid) for _, valid in sets)

        def stack(*arrays):
            return np.stack([np.concatenate([a, np.zeros((num_batches - len(a), *a.shape[1:]),
                                                          a.dtype)]) for a in arrays])

        self._data = fns.replicate(jax.tree.map(stack, *[batches for batches, _ in sets]))
        self._valid = fns.replicate(stack(*[valid for _, valid in sets]))
        self._sizes = np.asarray(sizes)

    def accuracies(self, state: TrainState, tasks: range) -> list[float]:
        tasks = np.asarray(list(tasks), np.int32)
        index = np.zeros(len(self._sizes), np.int32)
        index[: len(tasks)] = tasks
        counts = self._fns.evaluate_tasks(state.params, state.model_state, state.memory,
                                          self._data, self._valid, index, np.int32(len(tasks)))
        counts = jax.device_get(counts)
        return [int(counts[n]) / int(self._sizes[j]) for n, j in enumerate(tasks)]


def _chunk_ends(start: int, steps: int, global_step: int, every: tuple[int, ...]) -> list[int]:
    """Step offsets within an epoch where a chunk must end (periodic evals/checkpoints)."""
    ends = set()
    for n in every:
        if n > 0:
            first = n - (global_step % n)  # steps until the next multiple of n
            ends.update(range(start + first, steps, n))
    ends.add(steps)
    return sorted(e for e in ends if e > start)


def _train_chunk(steps: StepFns, state: TrainState, data: Batch, train, idx: np.ndarray,
                 task_index: int, *, device_resident: bool,
                 capacity: int) -> tuple[TrainState, np.ndarray]:
    """Runs the steps of `idx` on either data path; returns the state and per-step losses."""
    if device_resident:
        state, m = steps.run_chunk(state, data, idx, task_index, capacity=capacity)
        return state, np.asarray(m.loss)
    losses = []
    for batch in feed.host_batches(train, idx):
        state, m = steps.train_step(state, steps.shard_batch(batch), task_index)
        losses.append(m.loss)
    return state, np.asarray(jax.device_get(losses))


def _check_finite(losses: np.ndarray, state: TrainState, name: str, task: int, epoch: int,
                  ckpt: Checkpointer | None) -> None:
    bad = ~np.isfinite(losses)
    if not bad.any():
        return
    at = int(state.step) - len(losses) + int(np.argmax(bad))
    kept = (f"the last good checkpoint is kept in {ckpt.directory}"
            if ckpt is not None and ckpt.latest() is not None else "no checkpoint was written")
    raise NonFiniteLossError(
        f"{name}: loss became {losses[bad][0]} at step {at} (task {task}, epoch {epoch}); "
        f"stopped without saving, {kept}. Lower config.optimizer.learning_rate (with a new "
        "--workdir: a changed config does not resume this one) or check the data."
    )


def train_continual(
    config: ml_collections.ConfigDict,
    workdir: str | None = None,
    *,
    scenario: Any = None,
    model: Any = None,
    method: Method | None = None,
    keep_state: bool = False,
) -> RunResult:
    """Trains on every task of the scenario in order; evaluates all tasks after each.

    With ``config.train.eval_every_steps = ρ > 0`` it also evaluates every seen task every ρ
    steps on a fixed subsample of its test set (continual evaluation, one jitted call per
    evaluation): the curves, their stability-gap metrics in the summary (see
    `clax.metrics.stability`) and the time spent evaluating (`RunResult.eval_time_s`).

    Args:
      config: a run config (see `clax.training.config.default_config`).
      workdir: where checkpoints and results go; None keeps everything in memory.
        Rerunning with the same workdir resumes (and refuses a different config).
      scenario: a prebuilt `clax.data.Scenario` (default: built from the config).
      model: a prebuilt NNX model (default: built from the config).
      method: a prebuilt `Method` (default: ``config.method``).
      keep_state: return the final `TrainState` and `ModelFns` in the result.

    Raises:
      NonFiniteLossError: the loss became NaN/inf; the last good checkpoint is kept.
      ValueError: inconsistent config, data and model (before anything is compiled), or
        a method that needs task boundaries on an online stream (``scenario.online``:
        one epoch per task, no task index or boundary hooks for the method; see
        `_online_mode`).
    """
    config_lib.validate_config(config)
    scenario = scenario if scenario is not None else config_lib.build_scenario(config)
    model = model if model is not None else config_lib.build_model(config, scenario)
    method = method if method is not None else config_lib.build_method(config)
    _check_model_fits(model, scenario)
    online = _online_mode(scenario, method, config.train)
    epochs = 1 if online else config.train.epochs_per_task
    if workdir is not None:
        _check_workdir_config(workdir, config)
    tc = config.train
    rho = _eval_period(tc)
    mesh = data_mesh(tc.num_devices or None)
    n_dev = mesh.devices.size
    for key in ("batch_size", "eval_batch_size"):
        if tc[key] % n_dev:
            raise ValueError(
                f"config.train.{key}={tc[key]} must be divisible by the {n_dev} devices the "
                "batch is sharded over (set config.train.num_devices to use fewer)"
            )

    fns_model, params, model_state = ModelFns.split(model)
    base_tx = config_lib.build_optimizer(config.optimizer)
    steps = StepFns(fns_model, method, method.optimizer(base_tx), mesh, _logit_masks(scenario))
    state = steps.init_state(params, model_state, config.seed)
    full_eval = _Evaluator(steps, scenario, tc.eval_batch_size, None, config.seed)
    sub_eval = (
        _ContinualEvaluator(steps, scenario, tc.eval_batch_size, tc.eval_subsample, config.seed)
        if rho > 0
        else None
    )

    T = scenario.num_tasks
    meta: dict[str, Any] = {
        "task": 0, "epoch": 0, "step_in_epoch": 0, "rows": [], "baseline": None,
        "curves": [], "train_time_s": 0.0, "task_train_time_s": [], "done": False,
        "eval_time_s": 0.0, "task_eval_time_s": [], "task_boundaries": [],
    }
    ckpt = None
    if workdir is not None:
        ckpt = Checkpointer(os.path.join(workdir, "checkpoints"),
                            max_to_keep=tc.checkpoints_to_keep)
        if ckpt.latest() is not None:
            state, meta = ckpt.restore(state)
            meta.setdefault("eval_time_s", 0.0)
            meta.setdefault("task_eval_time_s", [])
            meta.setdefault("task_boundaries", [])
            state = steps.place_state(state)
            log.info("%s: resumed from checkpoint %d in %s (task %d, epoch %d, step %d)",
                     config.name, ckpt.latest(), workdir, meta["task"], meta["epoch"],
                     meta["step_in_epoch"])
    if meta["baseline"] is None:
        meta["baseline"] = full_eval.accuracies(state, range(T))

    first_task = meta["task"]
    task_time0 = meta["train_time_s"]  # train time before this task (resumes mid-task too)
    if meta["epoch"] or meta["step_in_epoch"]:
        task_time0 -= meta.get("partial_task_time_s", 0.0)
    run_start = time.perf_counter()
    for t in range(first_task, T):
        task_start = time.perf_counter()
        task_step0 = int(state.step)
        train = method.training_data(scenario.tasks, t)
        if online:  # the method sees no task ids (and task index 0, below)
            train = train._replace(task_ids=np.zeros_like(train.task_ids))
        ctx = BoundaryContext(task_index=t, tasks=scenario.tasks, train=train, model=fns_model,
                              steps=steps, config=config,
                              rng=jax.random.fold_in(jax.random.key(config.seed), t))
        if meta["epoch"] == 0 and meta["step_in_epoch"] == 0:  # not resuming mid-task
            meta["task_boundaries"].append(task_step0)
            meta["eval_time_at_task_start"] = meta["eval_time_s"]
            if tc.reset_optimizer_per_task and t > 0:
                state = steps.place_state(state._replace(opt_state=steps.tx.init(state.params)))
            if method.before_task is not None and (not online or t == 0):
                hook_ctx = _stream_context(ctx, scenario) if online else ctx
                state = steps.place_state(_checked_hook_state(
                    method.before_task(state, hook_ctx), state, "before_task", method))
        data = Batch(x=train.x, y=train.y, task_ids=train.task_ids)
        if tc.device_resident:
            data = steps.replicate(pad_to_bucket(data))
        periods = [p for p in (tc.eval_every_steps, tc.checkpoint_every_steps) if p > 0]
        steps_per_epoch = len(train.y) // tc.batch_size
        capacity = next_power_of_two(min([steps_per_epoch, *periods]))
        last_loss = float("nan")
        for epoch in range(meta["epoch"], epochs):
            idx = feed.epoch_index_batches(len(train.y), tc.batch_size, seed=config.seed,
                                           task_index=t, epoch=epoch)
            start = meta["step_in_epoch"]
            ends = _chunk_ends(start, len(idx), int(state.step),
                               (tc.eval_every_steps, tc.checkpoint_every_steps))
            for end in ends:
                chunk_start = time.perf_counter()
                state, losses = _train_chunk(steps, state, data, train, idx[start:end],
                                             0 if online else t,
                                             device_resident=tc.device_resident,
                                             capacity=capacity)
                meta["train_time_s"] += time.perf_counter() - chunk_start
                _check_finite(losses, state, config.name, t, epoch, ckpt)
                last_loss = float(losses[-1])
                epoch_done = end == len(idx)
                start = end
                meta["epoch"] = epoch + 1 if epoch_done else epoch
                meta["step_in_epoch"] = 0 if epoch_done else end
                step_now = int(state.step)
                if sub_eval is not None and step_now % rho == 0:
                    eval_start = time.perf_counter()
                    accs = sub_eval.accuracies(state, range(t + 1))  # every seen task
                    meta["eval_time_s"] += time.perf_counter() - eval_start
                    meta["curves"] += [
                        {"step": step_now, "train_task": t, "eval_task": j, "accuracy": acc}
                        for j, acc in enumerate(accs)
                    ]
                task_ends_here = epoch_done and epoch + 1 == epochs
                every = tc.checkpoint_every_steps
                if ckpt is not None and every > 0 and step_now % every == 0 and not task_ends_here:
                    meta["partial_task_time_s"] = meta["train_time_s"] - task_time0
                    ckpt.save(state, meta)
        if method.consolidate is not None and (not online or t == T - 1):
            consolidate_start = time.perf_counter()
            hook_ctx = _stream_context(ctx, scenario) if online else ctx
            state = steps.place_state(_checked_hook_state(
                method.consolidate(state, hook_ctx), state, "consolidate", method))
            meta["train_time_s"] += time.perf_counter() - consolidate_start
        task_steps = int(state.step) - task_step0
        meta["task_train_time_s"].append(meta["train_time_s"] - task_time0)
        meta["task_eval_time_s"].append(
            meta["eval_time_s"] - meta.get("eval_time_at_task_start", meta["eval_time_s"]))
        task_time0 = meta["train_time_s"]
        row = full_eval.accuracies(state, range(T))
        meta["rows"].append(row)
        meta.update(task=t + 1, epoch=0, step_in_epoch=0, done=t + 1 == T)
        if ckpt is not None:
            ckpt.save(state, meta)
        dt = time.perf_counter() - task_start
        elapsed = time.perf_counter() - run_start
        eta = elapsed / (t + 1 - first_task) * (T - t - 1)
        log.info(
            "%s: task %d/%d  %d steps in %.1fs (%.0f steps/s)  loss %.3f  acc(seen) %.1f%%"
            "  elapsed %.1fs  ETA %.0fs",
            config.name, t + 1, T, task_steps, dt, task_steps / max(dt, 1e-9), last_loss,
            100 * float(np.mean(row[: t + 1])), elapsed, eta,
        )

    R = np.asarray(meta["rows"], dtype=np.float64)
    b = np.asarray(meta["baseline"], dtype=np.float64)
    summary = clax_metrics.run_summary(R, b, meta["curves"])  # + stability-gap metrics
    eval_overhead = (meta["eval_time_s"] / meta["train_time_s"]
                     if rho and meta["train_time_s"] > 0 else None)
    if rho:
        log.info("%s: continual evaluation every %d steps: %d evaluations in %.1fs (%.0f%% of "
                 "the %.1fs training time)", config.name, rho,
                 len({c["step"] for c in meta["curves"]}), meta["eval_time_s"],
                 100 * (eval_overhead or 0.0), meta["train_time_s"])
    if workdir is not None:
        summary = clax_metrics.write_run_results(
            workdir, name=config.name, R=R, b=b, curves=meta["curves"],
            extra={"train_time_s": meta["train_time_s"], "method": method.name,
                   "scenario": scenario.name, "eval_every_steps": rho,
                   "eval_subsample": tc.eval_subsample if rho else None,
                   "num_evaluations": len({c["step"] for c in meta["curves"]}),
                   "eval_time_s": meta["eval_time_s"], "eval_overhead": eval_overhead,
                   "total_steps": int(state.step)},
            task_boundaries=meta["task_boundaries"][1:],
        )
        ckpt.close()
    return RunResult(
        name=config.name,
        accuracy_matrix=R,
        baseline=b,
        summary=summary,
        curves=meta["curves"],
        train_time_s=meta["train_time_s"],
        task_train_time_s=meta["task_train_time_s"],
        eval_time_s=meta["eval_time_s"],
        task_eval_time_s=meta["task_eval_time_s"],
        task_boundaries=list(meta["task_boundaries"]),
        state=state if keep_state else None,
        model=fns_model if keep_state else None,
    )

