r"""The unlearning driver: one pipeline for every unlearner (GA, NPO, GU, SSD, ACU, ...).

``unlearn(config, workdir)`` runs, with checkpoints, progress output and a resumable
workdir:

1. **The original model** (`train_original`): the configured continual run
   (``config.scenario``, ``config.method``: a single task holding every class by default,
   or e.g. an ``acil`` run for ACU), trained with `train_continual` or, when its workdir
   holds the finished run, restored from its checkpoint (``<workdir>/original``, or
   ``config.unlearn.original_workdir`` to share one original between unlearning runs).
2. **The four sets** (`forget_sets`): forget-train ``D_f`` / retain-train ``D_r`` (the
   training data of every task, split) and forget-test / retain-test, chosen by
   ``config.unlearn.forget``: ``"classes"`` (every example of ``forget_classes``),
   ``"tasks"`` (every example of ``forget_tasks``; any objective) or ``"fraction"`` (a
   random ``forget_fraction`` of the training set; the test set is split at random,
   ``forget_test_fraction`` of it being forget-test).
3. **The reference** (``config.unlearn.reference``): ``"retrain"`` trains the same run from
   scratch without ``D_f`` (``<workdir>/reference``), ``"closed_form"`` asks the unlearner
   for the exact retrained model (`clax.core.Unlearner.retrain`, e.g. ACU's ridge refit),
   ``"none"`` skips it.
4. **The unlearner** (``config.unlearn.name``, hyperparameters in
   ``config.unlearn.<name>``): a gradient procedure runs ``config.unlearn.steps`` jitted
   steps (one forget batch and one retain batch per step, each drawn uniformly with
   replacement from a key folded with the step number, so a resumed run draws the same
   batches), in compiled chunks that end at each stop check (``eval_every``) and each
   checkpoint (``checkpoint_every_steps``); it stops early once the forget-train primary
   metric reaches ``target`` (or the reference's plus ``target_margin``). A one-shot edit
   runs once (plus ``repeats`` timed repeats).
5. **The metrics** (`clax.metrics.unlearning`): for a classifier, accuracy on the four
   sets, their loss and the membership-inference score (MIA, ``mia_feature``); for any
   other objective, each of its metrics on the four sets. For the original, the unlearned
   model and the reference, with the gaps ``unlearned − reference``. Written to
   ``<workdir>/unlearn_metrics.json`` and ``unlearn_metrics.md``.

Unlearning runs on one device, under ``jax.enable_x64(config.unlearn.x64)`` (ACIL's
closed forms are exact in float64). Time (`UnlearnResult.times`): ``unlearn_s`` is the
unlearning steps only (compiled beforehand, stop checks excluded) or the median of the
compiled repeats of an edit; ``unlearn_first_s`` the first edit, compilation included.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import statistics
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from ml_collections.config_dict import placeholder

from clax import metrics as clax_metrics
from clax._validation import check_bool, check_choice, check_int, check_real
from clax.core import (
    Batch,
    Classification,
    DataSpec,
    Method,
    ModelFns,
    Objective,
    TrainArrays,
    TrainState,
    UnlearnContext,
    Unlearner,
    UnlearnStepContext,
    example_spec,
    make_unlearner,
    num_examples,
    primary_metric,
    registered_unlearners,
    take,
    unlearner_hyperparameters,
)
from clax.core.objective import masked_logits
from clax.data import Scenario
from clax.metrics.io import atomic_write_text
from clax.metrics.unlearning import UnlearningSplit, reference_gap, unlearning_metrics
from clax.training import config as config_lib
from clax.training import feed
from clax.training.checkpoint import Checkpointer
from clax.training.loop import (
    NonFiniteLossError,
    RunResult,
    progress_from_json,
    train_continual,
)
from clax.training.sharding import data_mesh
from clax.training.steps import StepFns, next_power_of_two
from clax.typing import PyTree

log = logging.getLogger("clax")

__all__ = [
    "UnlearnResult",
    "UnlearnSets",
    "build_unlearner",
    "default_unlearn_config",
    "forget_sets",
    "train_original",
    "unlearn",
]

SETS = ("forget_train", "retain_train", "forget_test", "retain_test")
FORGET_MODES = ("classes", "tasks", "fraction")
REFERENCES = ("none", "retrain", "closed_form")
OPTIMIZERS = ("adam", "sgd")
MIA_FEATURES = ("entropy", "loss")
# Keys of config.unlearn that may change when a run resumes (they do not change results).
OPERATIONAL_KEYS = ("checkpoints_to_keep", "repeats")
METRICS_FILE = "unlearn_metrics.json"
TABLE_FILE = "unlearn_metrics.md"


# ---------------------------------------------------------------------------- config


def default_unlearn_config() -> ml_collections.ConfigDict:
    """`default_config()` for one task holding every class, plus the ``unlearn`` section.

    ``config.unlearn`` (the continual sections train the original model as usual):

    - ``name``: the unlearner (``ga``, ``npo``, ``ssd``, ``acu``, ...), one subsection per
      registered unlearner with its hyperparameters: ``--config.unlearn.npo.gu=True``.
    - ``forget``: ``"classes"`` (``forget_classes``), ``"tasks"`` (``forget_tasks``) or
      ``"fraction"`` (``forget_fraction`` of the training set at random; the test set split
      at random with ``forget_test_fraction`` forget-test), drawn with ``forget_seed``.
    - gradient unlearners: at most ``steps`` steps of a ``batch_size`` forget batch and a
      ``retain_batch_size`` retain batch; ``optimizer`` (``adam`` with ``b1`` / ``b2`` /
      ``eps``, GU's β1 = 0 by default, or ``sgd`` with ``momentum``; ``learning_rate``);
      every ``eval_every`` steps the forget-train primary metric is measured and the run
      stops once it reaches ``target`` (accuracy ``<=``, a loss ``>=``; ``< 0``: off) or
      the reference's value plus ``target_margin`` (``< 0``: off).
    - ``reference``: ``"retrain"``, ``"closed_form"`` or ``"none"`` (module docstring).
    - ``mia_feature``: the membership attack's feature, ``"entropy"`` or ``"loss"``.
    - ``repeats``: timed repeats of an edit (and of a closed-form reference).
    - ``x64``: run under ``jax.enable_x64`` (float64 closed forms).
    - ``checkpoint_every_steps`` (0: only when done), ``checkpoints_to_keep``,
      ``original_workdir`` (default ``<workdir>/original``).
    """
    c = config_lib.default_config()
    c.name = "unlearn"
    c.scenario.classes_per_task = 10  # one task holding all classes (digits, Fashion-MNIST)
    c.optimizer.name = "adam"
    c.optimizer.learning_rate = 1e-3
    c.train.epochs_per_task = 5
    u = ml_collections.ConfigDict()
    u.name = "ga"
    for name in registered_unlearners():
        u[name] = config_lib.defaults_section(unlearner_hyperparameters(name))
    u.forget = "classes"
    u.forget_classes = (0,)
    u.forget_tasks = (0,)
    u.forget_fraction = 0.1
    u.forget_test_fraction = 0.5
    u.forget_seed = 0
    u.steps = 100
    u.batch_size = 128
    u.retain_batch_size = 128
    u.eval_every = 10
    u.target = -1.0
    u.target_margin = -1.0
    u.optimizer = ml_collections.ConfigDict(
        {"name": "adam", "learning_rate": 1e-4, "b1": 0.0, "b2": 0.999, "eps": 1e-8,
         "momentum": 0.0})
    u.reference = "retrain"
    u.mia_feature = "entropy"
    u.repeats = 0
    u.x64 = False
    u.checkpoint_every_steps = 0
    u.checkpoints_to_keep = 2
    u.original_workdir = placeholder(str)
    c.unlearn = u
    return c


def _fail(key: str, expected: str, value: Any) -> None:
    raise ValueError(f"config.unlearn.{key} must be {expected}, got {value!r}")


def _validate(config: ml_collections.ConfigDict) -> None:
    """The ``unlearn`` section against `default_unlearn_config` (one line per problem)."""
    if "unlearn" not in config:
        raise ValueError("config lacks the unlearn section; start from "
                         "clax.training.unlearn.default_unlearn_config()")
    u, ref = config.unlearn, default_unlearn_config().unlearn
    for section, got, want in (("unlearn", u, ref),
                               ("unlearn.optimizer", u.optimizer, ref.optimizer)):
        unknown = sorted(set(got.keys()) - set(want.keys()))
        if unknown:
            raise ValueError(f"unknown key config.{section}.{unknown[0]}; valid keys of "
                             f"config.{section}: {', '.join(sorted(want.keys()))}")
    name = "config.unlearn."
    check_choice(name + "name", u.name, registered_unlearners())
    check_choice(name + "forget", u.forget, FORGET_MODES)
    check_choice(name + "reference", u.reference, REFERENCES)
    check_choice(name + "mia_feature", u.mia_feature, MIA_FEATURES)
    check_choice(name + "optimizer.name", u.optimizer.name, OPTIMIZERS)
    for key in ("steps", "batch_size", "retain_batch_size", "eval_every", "checkpoints_to_keep"):
        check_int(name + key, u[key], low=1)
    for key in ("repeats", "checkpoint_every_steps", "forget_seed"):
        check_int(name + key, u[key], low=0)
    check_bool(name + "x64", u.x64)
    for key in ("forget_fraction", "forget_test_fraction"):
        check_real(name + key, u[key], 0.0, 1.0, low_open=True, high_open=True)
    check_real(name + "optimizer.learning_rate", u.optimizer.learning_rate, 0.0, np.inf,
               low_open=True, high_open=True)
    for key in ("b1", "b2"):
        check_real(name + "optimizer." + key, u.optimizer[key], 0.0, 1.0, low_open=False,
                   high_open=True)
    for key in ("optimizer.eps", "optimizer.momentum"):
        check_real(name + key, u.optimizer[key.split(".")[1]], 0.0, np.inf, low_open=False,
                   high_open=True)
    for key in ("target", "target_margin"):
        check_real(name + key, u[key], -np.inf, np.inf, low_open=True, high_open=True)
    if u.target_margin >= 0 and u.reference == "none":
        raise ValueError("config.unlearn.target_margin >= 0 stops at the reference's forget "
                         "metric plus the margin, but config.unlearn.reference is 'none': set "
                         "it to 'retrain' (or 'closed_form'), or target_margin = -1")
    if u.target >= 0 and u.target_margin >= 0:
        raise ValueError("config.unlearn.target and config.unlearn.target_margin are both set; "
                         "keep one (the other = -1)")


def build_unlearner(config: ml_collections.ConfigDict) -> Unlearner:
    """``config.unlearn.name`` with the hyperparameters of its subsection."""
    name = config.unlearn.name
    sub = config.unlearn.get(name)
    kwargs = {} if sub is None else {k: v for k, v in sub.to_dict().items() if v is not None}
    return make_unlearner(name, **kwargs)


def build_unlearn_optimizer(opt: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """The base optimizer of gradient unlearning (``config.unlearn.optimizer``)."""
    if opt.name == "adam":
        return optax.adam(opt.learning_rate, b1=opt.b1, b2=opt.b2, eps=opt.eps)
    return optax.sgd(opt.learning_rate, momentum=opt.momentum or None)


def continual_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config` without its ``unlearn`` section: the run that trains the original model."""
    c = copy.deepcopy(config)
    with c.unlocked():
        if "unlearn" in c:
            del c["unlearn"]
    return c


# ---------------------------------------------------------------------------- the sets


class UnlearnSets(NamedTuple):
    """The sets of an unlearning run (host arrays; ``task_ids`` per example)."""

    train: TrainArrays  # D: every task's training data, in task order
    forget_train: TrainArrays  # D_f ⊂ D
    retain_train: TrainArrays  # D_r = D \ D_f
    forget_test: TrainArrays
    retain_test: TrainArrays
    forget_mask: np.ndarray  # bool (|D|,): D_f within D

    def sizes(self) -> dict[str, int]:
        """Examples in each of the four sets."""
        return {name: int(len(getattr(self, name).task_ids)) for name in SETS}


def _concat(tasks, split: str) -> TrainArrays:
    xs = [getattr(t, f"x_{split}") for t in tasks]
    ys = [getattr(t, f"y_{split}") for t in tasks]
    ids = [np.full(num_examples(y), t.id, np.int32) for t, y in zip(tasks, ys, strict=False)]
    return TrainArrays(x=jax.tree.map(lambda *a: np.concatenate(a), *xs),
                       y=jax.tree.map(lambda *a: np.concatenate(a), *ys),
                       task_ids=np.concatenate(ids))


def _subset(arrays: TrainArrays, mask: np.ndarray) -> TrainArrays:
    idx = np.flatnonzero(mask)
    return TrainArrays(x=take(arrays.x, idx), y=take(arrays.y, idx), task_ids=arrays.task_ids[idx])


def _int_tuple(key: str, value: Any, high: int, what: str) -> tuple[int, ...]:
    values = tuple(value) if isinstance(value, (tuple, list)) else (value,)
    if not values or any(isinstance(v, bool) or not isinstance(v, (int, np.integer))
                         or not 0 <= v < high for v in values):
        _fail(key, f"a non-empty tuple of {what} in [0, {high})", value)
    return tuple(int(v) for v in values)


def forget_sets(unlearn_config: ml_collections.ConfigDict, scenario: Scenario) -> UnlearnSets:
    """The forget / retain train and test sets chosen by ``config.unlearn.forget``.

    Raises:
      ValueError: a class or task out of range, class forgetting of targets that are not
        class ids, or an empty forget or retain set.
    """
    u = unlearn_config
    train, test = _concat(scenario.tasks, "train"), _concat(scenario.tasks, "test")
    if u.forget == "classes":
        if np.ndim(train.y) != 1 or not np.issubdtype(np.asarray(train.y).dtype, np.integer):
            raise ValueError(
                "config.unlearn.forget='classes' needs class-id targets (one int per example); "
                f"this scenario's targets have shape {np.shape(train.y)[1:]} per example: use "
                "forget='tasks' or forget='fraction'")
        classes = _int_tuple("forget_classes", u.forget_classes, scenario.num_classes,
                             "class ids")
        forget, forget_test = np.isin(train.y, classes), np.isin(test.y, classes)
    elif u.forget == "tasks":
        tasks = _int_tuple("forget_tasks", u.forget_tasks, scenario.num_tasks, "task indices")
        forget, forget_test = np.isin(train.task_ids, tasks), np.isin(test.task_ids, tasks)
    else:
        rng = np.random.default_rng([u.forget_seed, 1])
        n, n_test = len(train.task_ids), len(test.task_ids)
        forget = np.zeros(n, bool)
        forget[rng.permutation(n)[: max(1, round(u.forget_fraction * n))]] = True
        forget_test = np.zeros(n_test, bool)
        forget_test[rng.permutation(n_test)[: round(u.forget_test_fraction * n_test)]] = True
    if forget.all() or not forget.any():
        raise ValueError(f"config.unlearn.forget={u.forget!r} selects {int(forget.sum())} of the "
                         f"{len(forget)} training examples; the forget and the retain set must "
                         "both be non-empty")
    if forget_test.all() or not forget_test.any():
        raise ValueError(f"config.unlearn.forget={u.forget!r} selects {int(forget_test.sum())} "
                         f"of the {len(forget_test)} test examples; the forget-test and the "
                         "retain-test set must both be non-empty")
    return UnlearnSets(train=train, forget_train=_subset(train, forget),
                       retain_train=_subset(train, ~forget),
                       forget_test=_subset(test, forget_test),
                       retain_test=_subset(test, ~forget_test), forget_mask=forget)


def retained_scenario(scenario: Scenario, sets: UnlearnSets, *, multi_head: bool) -> Scenario:
    """`scenario` with the forget set removed from each task's training data.

    Tasks left without training examples are dropped and the rest renumbered (refused for
    multi-head models, whose heads are numbered by task).
    """
    tasks, start = [], 0
    for task in scenario.tasks:
        n = num_examples(task.y_train)
        keep = np.flatnonzero(~sets.forget_mask[start:start + n])
        start += n
        if len(keep):
            tasks.append(task._replace(id=len(tasks), x_train=take(task.x_train, keep),
                                       y_train=take(task.y_train, keep)))
        elif multi_head:
            raise ValueError(f"reference 'retrain': task {task.id} has no retained training "
                             "example; a multi-head model cannot drop it (use reference='none')")
    return dataclasses.replace(scenario, name=scenario.name + "/retained", tasks=tuple(tasks))


# ---------------------------------------------------------------------------- evaluation


class _Evaluator:
    """Metrics of a state on host sets; the continual method's ``predict`` hook included."""

    def __init__(self, steps: StepFns, batch_size: int):
        self.steps, self.objective, self.batch_size = steps, steps.objective, batch_size
        self._predict = jax.jit(steps.predict)

    def prepare(self, arrays: TrainArrays) -> tuple[Batch, jax.Array]:
        """Padded evaluation batches of `arrays`, on the device."""
        batches, valid = feed.padded_eval_batches(arrays.x, arrays.y, arrays.task_ids,
                                                  self.batch_size)
        return jax.device_put((batches, valid))

    def metrics(self, state: TrainState, arrays: TrainArrays | tuple[Batch, jax.Array]
                ) -> dict[str, float]:
        """The objective's metrics (``finalize``) of `state` on `arrays` (or prepared)."""
        prepared = self.prepare(arrays) if isinstance(arrays, TrainArrays) else arrays
        sums = self.steps.evaluate(state.params, state.model_state, state.memory, *prepared)
        return self.objective.finalize(jax.device_get(sums))

    def outputs(self, state: TrainState, arrays: TrainArrays) -> np.ndarray:
        """Evaluation outputs (logits, masked like the loss) in fixed-size padded batches."""
        n, b, parts = len(arrays.task_ids), self.batch_size, []
        for i in range(0, n, b):
            idx = np.arange(i, min(i + b, n))
            pad = np.concatenate([idx, np.full(b - len(idx), idx[0])])
            x, task_ids = take(arrays.x, pad), arrays.task_ids[pad]
            out = self._predict(state.params, state.model_state, state.memory, x, task_ids)
            if isinstance(self.objective, Classification):
                out = masked_logits(out, self.objective.mask_for(task_ids))
            parts.append(np.asarray(out, np.float32)[: len(idx)])
        return np.concatenate(parts)


def _metric_key(objective: Objective, set_name: str) -> str:
    """The report key of the primary metric on a set (``forget_train_acc`` for accuracy)."""
    name = primary_metric(objective).name
    if isinstance(objective, Classification) and name == "accuracy":
        return f"{set_name}_acc"
    return f"{set_name}_{name}"


def model_metrics(ev: _Evaluator, state: TrainState, sets: UnlearnSets, *,
                  mia_feature: str = "entropy") -> dict[str, float]:
    """Unlearning metrics of `state` (module docstring, step 5)."""
    out: dict[str, float] = {}
    per_set = {name: ev.metrics(state, getattr(sets, name)) for name in SETS}
    if isinstance(ev.objective, Classification):
        logits = [ev.outputs(state, getattr(sets, name)) for name in SETS]
        table = np.concatenate(logits)
        offsets = np.cumsum([0] + [len(a) for a in logits])
        # The metrics read logits through an index: every set's logits are computed above
        # with its task ids (multi-head models, logit masks).
        split = UnlearningSplit(*((np.arange(offsets[k], offsets[k + 1]),
                                   np.asarray(getattr(sets, name).y))
                                  for k, name in enumerate(SETS)))
        out.update(unlearning_metrics(lambda idx: table[idx], split, feature=mia_feature,
                                      batch_size=max(len(table), 1)))
        out.update({f"{name}_loss": per_set[name]["loss"] for name in SETS})
    else:
        out.update({f"{name}_{metric.name}": per_set[name][metric.name]
                    for name in SETS for metric in ev.objective.metrics})
    return out


# ---------------------------------------------------------------------------- progress


@dataclasses.dataclass
class _Progress:
    """Where the unlearning is: saved with every checkpoint (as JSON)."""

    step: int = 0
    done: bool = False
    reached_target: bool | None = None
    unlearn_s: float = 0.0  # in the steps (compiled) or the timed edit
    unlearn_first_s: float | None = None  # the first edit, compilation included
    unlearn_repeats_s: list[float] = dataclasses.field(default_factory=list)
    eval_s: float = 0.0  # in the stop checks
    last_loss: float | None = None  # the loss of the last step taken
    trace: list[dict[str, float]] = dataclasses.field(default_factory=list)
    info: dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_json(cls, meta: dict[str, Any]) -> _Progress:
        return progress_from_json(cls, meta, "unlearning checkpoint")


@dataclasses.dataclass
class UnlearnResult:
    """What `unlearn` returns (also written to the workdir)."""

    name: str
    unlearner: str
    method: str  # the continual method that trained the original model
    metrics: dict[str, float]  # the unlearned model
    original_metrics: dict[str, float]
    reference_metrics: dict[str, float] | None
    gap: dict[str, float] | None  # unlearned − reference, per metric ("<key>_gap")
    sizes: dict[str, int]
    steps: int  # gradient steps taken (0 for an edit)
    reached_target: bool | None  # None: no stop target
    times: dict[str, Any]
    info: dict[str, Any]  # the edit's report (SSD: what was dampened), the stop-check trace
    state: TrainState
    model: ModelFns
    original: RunResult | None = None  # the original run (state included)
    reference: TrainState | None = None  # the reference model, when one was built

    def as_json(self) -> dict[str, Any]:
        """The JSON document of ``unlearn_metrics.json``."""
        keys = ("name", "unlearner", "method", "metrics", "original_metrics",
                "reference_metrics", "gap", "sizes", "steps", "reached_target", "times", "info")
        return {k: getattr(self, k) for k in keys}


# ---------------------------------------------------------------------------- the parts


def train_original(config: ml_collections.ConfigDict, workdir: str | None = None, *,
                   scenario: Scenario | None = None, model: nnx.Module | None = None,
                   method: Method | None = None, objective: Objective | None = None
                   ) -> RunResult:
    """The original model: `train_continual` of ``config`` (its ``unlearn`` section dropped).

    With a `workdir` holding the finished run, this restores it from its checkpoint.
    """
    return train_continual(continual_config(config), workdir, scenario=scenario, model=model,
                           method=method, objective=objective, keep_state=True)


def _single_device(tree: PyTree) -> PyTree:
    """A copy of `tree` in fresh buffers on one device (safe to donate)."""
    tree = jax.device_put(tree, jax.devices()[0])
    return jax.jit(lambda t: jax.tree.map(jnp.copy, t))(tree)


def _data_spec(model: ModelFns, state: TrainState, scenario: Scenario) -> DataSpec:
    first = scenario.tasks[0]
    example = example_spec(TrainArrays(first.x_train, first.y_train,
                                       np.zeros(num_examples(first.y_train), np.int32)))
    output = jax.eval_shape(
        lambda p, s, x, t: model.apply(p, s, x, t, train=False)[0], state.params,
        state.model_state,
        jax.tree.map(lambda a: jax.ShapeDtypeStruct((1, *a.shape), a.dtype), example.x),
        jax.ShapeDtypeStruct((1,), np.int32))
    return DataSpec(example, jax.ShapeDtypeStruct(output.shape[1:], output.dtype))


def _check_unlearn_workdir(workdir: str, config: ml_collections.ConfigDict) -> None:
    """Refuses to resume unlearning whose ``config.unlearn`` (or seed) differs."""
    path = os.path.join(workdir, "unlearn_config.json")
    current = json.loads(config.unlearn.to_json_best_effort())
    current = {"seed": config.seed, **current}
    started = any(os.path.isdir(os.path.join(workdir, d, "checkpoints"))
                  and os.listdir(os.path.join(workdir, d, "checkpoints"))
                  for d in ("unlearn", "reference"))
    if os.path.exists(path) and started:
        with open(path) as f:
            saved = json.load(f)
        name = current["name"]
        diffs = [k for k in sorted(set(saved) | set(current))
                 if saved.get(k) != current.get(k) and k not in OPERATIONAL_KEYS
                 and (k not in registered_unlearners() or k == name)]
        if diffs:
            raise ValueError(
                f"workdir {workdir!r} holds an unlearning run with a different config "
                f"(differing keys: {', '.join('config.unlearn.' + k for k in diffs)}); use "
                "another --workdir (config.unlearn.original_workdir can share the original "
                "model). Nothing in the workdir was changed.")
    os.makedirs(workdir, exist_ok=True)
    atomic_write_text(path, json.dumps(current, indent=2, sort_keys=True))


def _make_chunk(unlearner: Unlearner, tx, model: ModelFns, objective: Objective,
                batch_sizes: tuple[int, int], capacity: int):
    """``(state, forget, retain, reference, num_steps) -> (state, losses)``, jitted and
    donating the state: `num_steps` (traced) steps of the unlearner's loss."""
    bf, br = batch_sizes

    def step(state: TrainState, forget: Batch, retain: Batch, reference: PyTree):
        key = jax.random.fold_in(state.rng, state.step)
        kf, kr, key = jax.random.split(key, 3)
        fb = take(forget, jax.random.randint(kf, (bf,), 0, num_examples(forget)))
        rb = take(retain, jax.random.randint(kr, (br,), 0, num_examples(retain)))

        def apply(params, x, task_ids):
            return model.apply(params, state.model_state, x, task_ids, train=False)[0]

        ctx = UnlearnStepContext(reference=reference, model_state=state.model_state,
                                 memory=state.memory, rng=key, step=state.step,
                                 objective=objective, apply=apply)
        loss, grads = jax.value_and_grad(unlearner.loss)(state.params, fb, rb, ctx)
        extra = ({} if unlearner.extra_args is None
                 else unlearner.extra_args(state.params, fb, rb, ctx))
        updates, opt_state = tx.update(grads, state.opt_state, state.params, **extra)
        params = optax.apply_updates(state.params, updates)
        return state._replace(params=params, opt_state=opt_state, step=state.step + 1), loss

    def chunk(state, forget, retain, reference, num_steps):
        def body(s, carry):
            state, losses = carry
            state, loss = step(state, forget, retain, reference)
            return state, losses.at[s].set(loss)

        zeros = jnp.zeros((capacity,), jnp.float32)
        return jax.lax.fori_loop(0, num_steps, body, (state, zeros))

    return jax.jit(chunk, donate_argnums=(0,))


def _run_chunk(compiled, state: TrainState, forget: Batch, retain: Batch, reference: PyTree,
               num_steps: int) -> tuple[TrainState, np.ndarray]:
    """One compiled chunk of `num_steps` unlearning steps; returns their losses."""
    state, losses = compiled(state, forget, retain, reference, np.int32(num_steps))
    return state, np.asarray(losses)[:num_steps]


def _reached(value: float, target: float, higher_is_better: bool) -> bool:
    return value <= target if higher_is_better else value >= target


@dataclasses.dataclass
class _Run:
    """What one unlearning run is made of; the parts below read it."""

    config: ml_collections.ConfigDict
    unlearner: Unlearner
    method: Method
    objective: Objective
    model: ModelFns
    original: TrainState  # on one device; never donated
    sets: UnlearnSets
    ev: _Evaluator
    ckpt: Checkpointer | None

    @property
    def name(self) -> str:
        return self.config.name

    def context(self) -> UnlearnContext:
        return UnlearnContext(
            model=self.model, objective=self.objective, method=self.method,
            train=self.sets.train, forget=self.sets.forget_train,
            retain=self.sets.retain_train, evaluate=self.ev.metrics,
            rng=jax.random.fold_in(jax.random.key(self.config.seed), 0x554E),
            log=lambda msg: log.info("%s: %s", self.name, msg))

    def save(self, state: TrainState, progress: _Progress) -> None:
        if self.ckpt is not None:
            self.ckpt.save(state, dataclasses.asdict(progress))

    def restore(self, template: TrainState) -> tuple[TrainState, _Progress]:
        if self.ckpt is None or self.ckpt.latest() is None:
            return template, _Progress()
        state, meta = self.ckpt.restore(template)
        progress = _Progress.from_json(meta)
        log.info("%s: resumed unlearning from checkpoint %d (step %d%s)", self.name,
                 self.ckpt.latest(), progress.step, ", done" if progress.done else "")
        return _single_device(state), progress


def _checked_edit(run: _Run, new: TrainState, what: str) -> TrainState:
    """An edit must keep every shape and dtype (checkpoints restore into the original's)."""
    if not isinstance(new, TrainState):
        raise TypeError(f"unlearner {run.unlearner.name!r}: {what} must return (TrainState, "
                        f"dict), got {type(new).__name__}")
    old = run.original
    for part in ("params", "model_state", "memory"):
        a, b = getattr(old, part), getattr(new, part)
        same = jax.tree.structure(a) == jax.tree.structure(b) and all(
            np.shape(x) == np.shape(y) and jnp.result_type(x) == jnp.result_type(y)
            for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=False))
        if not same:
            raise ValueError(f"unlearner {run.unlearner.name!r}: {what} changed the structure, "
                             f"shapes or dtypes of state.{part}; keep them")
    return new


def _timed_edit(run: _Run, fn, repeats: int) -> tuple[TrainState, dict, float, list[float]]:
    """``fn(original, ctx)`` once (compiles) and `repeats` more times; the first result."""
    ctx = run.context()
    start = time.perf_counter()
    state, info = fn(run.original, ctx)
    state = jax.block_until_ready(state)
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(run.original, ctx)[0])
        times.append(time.perf_counter() - start)
    return state, dict(info), first, times


def _run_edit(run: _Run) -> tuple[TrainState, _Progress]:
    state, progress = run.restore(run.original)
    if progress.done:
        return state, progress
    u = run.config.unlearn
    log.info("%s: %s edit (%d forget / %d retain examples)", run.name, run.unlearner.name,
             len(run.sets.forget_train.task_ids), len(run.sets.retain_train.task_ids))
    state, info, first, times = _timed_edit(run, run.unlearner.edit, u.repeats)
    state = _single_device(_checked_edit(run, state, "edit"))
    progress.unlearn_first_s, progress.unlearn_repeats_s = first, times
    progress.unlearn_s = statistics.median(times) if times else first
    progress.info, progress.done = info, True
    log.info("%s: edit done in %.2fs%s", run.name, first,
             f" (compiled: median {progress.unlearn_s:.3f}s of {len(times)})" if times else "")
    run.save(state, progress)
    return state, progress


def _run_gradient(run: _Run, target: float | None) -> tuple[TrainState, _Progress]:
    u, unlearner = run.config.unlearn, run.unlearner
    tx = unlearner.optimizer(build_unlearn_optimizer(u.optimizer))
    if not isinstance(tx, optax.GradientTransformationExtraArgs):
        raise TypeError(f"unlearner {unlearner.name!r}: optimizer must return an "
                        "optax.GradientTransformationExtraArgs that forwards **extra_args, got "
                        f"{type(tx).__name__}")
    o = run.original
    template = _single_device(TrainState(
        params=o.params, model_state=o.model_state, opt_state=tx.init(o.params),
        memory=o.memory, rng=jax.random.fold_in(jax.random.key(run.config.seed), 0x554E),
        step=jnp.zeros((), jnp.int32)))
    state, progress = run.restore(template)
    if progress.done:
        return state, progress
    steps, every, ckpt_every = u.steps, u.eval_every, u.checkpoint_every_steps
    capacity = next_power_of_two(min(every, ckpt_every or every, steps))
    put = jax.devices()[0]
    forget = jax.device_put(Batch(*run.sets.forget_train), put)
    retain = jax.device_put(Batch(*run.sets.retain_train), put)
    chunk = _make_chunk(unlearner, tx, run.model, run.objective,
                        (u.batch_size, u.retain_batch_size), capacity)
    start = time.perf_counter()
    compiled = chunk.lower(state, forget, retain, o.params, np.int32(1)).compile()
    log.info("%s: %s, %d steps at most; step compiled in %.1fs", run.name, unlearner.name,
             steps, time.perf_counter() - start)
    forget_eval = run.ev.prepare(run.sets.forget_train)
    spec = primary_metric(run.objective)
    key = _metric_key(run.objective, "forget_train")
    run_start = time.perf_counter()
    while True:
        s = progress.step
        checked = bool(progress.trace) and progress.trace[-1]["step"] == s
        if (s % every == 0 or s == steps) and not checked:
            start = time.perf_counter()
            value = run.ev.metrics(state, forget_eval)[spec.name]
            progress.eval_s += time.perf_counter() - start
            progress.trace.append({"step": s, key: value, "loss": progress.last_loss})
            elapsed = time.perf_counter() - run_start
            log.info("%s: step %d/%d  loss %s  %s %.4g%s  elapsed %.1fs", run.name, s, steps,
                     "–" if progress.last_loss is None else f"{progress.last_loss:.4g}", key,
                     value,
                     "" if target is None else f" (target {target:.4g})", elapsed)
            if target is not None:
                progress.reached_target = _reached(value, target, spec.higher_is_better)
                if progress.reached_target:
                    break
        if s >= steps:
            break
        ends = [steps, (s // every + 1) * every]
        if ckpt_every:
            ends.append((s // ckpt_every + 1) * ckpt_every)
        end = min(ends)
        start = time.perf_counter()
        state, losses = _run_chunk(compiled, state, forget, retain, o.params, end - s)
        progress.unlearn_s += time.perf_counter() - start
        bad = ~np.isfinite(losses)
        if bad.any():
            raise NonFiniteLossError(
                f"{run.name}: unlearning loss became {losses[bad][0]} at step "
                f"{s + int(np.argmax(bad))}; stopped without saving. Lower "
                "config.unlearn.optimizer.learning_rate or set a stop target "
                "(config.unlearn.target / target_margin), with a new --workdir")
        progress.last_loss = float(losses[-1])
        progress.step = end
        if ckpt_every and end % ckpt_every == 0 and end < steps:
            run.save(state, progress)
    progress.done = True
    run.save(state, progress)
    return state, progress


def _reference(run: _Run, workdir: str | None, scenario: Scenario, model: nnx.Module | None
               ) -> tuple[TrainState | None, dict[str, float] | None, dict[str, Any]]:
    """The reference model (config.unlearn.reference), its metrics and its times."""
    u = run.config.unlearn
    if u.reference == "none":
        return None, None, {}
    if u.reference == "closed_form":
        state, info, first, times = _timed_edit(run, run.unlearner.retrain, u.repeats)
        state = _checked_edit(run, state, "retrain")
        seconds = statistics.median(times) if times else first
        log.info("%s: closed-form reference in %.2fs", run.name, first)
        times_out = {"reference_s": seconds, "reference_first_s": first,
                     "reference_repeats_s": times}
        return state, model_metrics(run.ev, state, run.sets, mia_feature=u.mia_feature), {
            **times_out, "reference_info": info}
    retained = retained_scenario(scenario, run.sets,
                                 multi_head=bool(run.config.model.get("multi_head", False)))
    log.info("%s: retraining the reference without the forget set", run.name)
    result = train_continual(continual_config(run.config),
                             None if workdir is None else os.path.join(workdir, "reference"),
                             scenario=retained, model=model, method=run.method,
                             objective=run.objective, keep_state=True)
    state = _single_device(result.state)
    return state, model_metrics(run.ev, state, run.sets, mia_feature=u.mia_feature), {
        "reference_s": result.train_time_s}


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.generic, jax.Array)):
        return np.asarray(obj).tolist()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serializable")


def _markdown(result: UnlearnResult) -> str:
    rows = [{"model": "original", **result.original_metrics},
            {"model": f"unlearned ({result.unlearner})", **result.metrics}]
    if result.reference_metrics is not None:
        rows.append({"model": "reference (retrained)", **result.reference_metrics})
        rows.append({"model": "gap (unlearned − reference)",
                     **{k: result.gap.get(f"{k}_gap") for k in result.metrics}})
    keys = list(result.metrics)
    table = clax_metrics.markdown_table(rows, [("model", "model"), *[(k, k) for k in keys]],
                                        floatfmt=".4f")
    times = ", ".join(f"{k} {v:.3f}" for k, v in result.times.items()
                      if isinstance(v, float))
    stop = ("" if result.reached_target is None
            else f" Stop target reached: {result.reached_target}.")
    return (f"# Unlearning {result.name}: {result.unlearner} on a {result.method} model\n\n"
            f"Sizes: {result.sizes}. Steps: {result.steps}.{stop} Times (s): {times}.\n\n"
            f"{table}\n")


def unlearn(
    config: ml_collections.ConfigDict,
    workdir: str | None = None,
    *,
    scenario: Scenario | None = None,
    model: nnx.Module | None = None,
    method: Method | None = None,
    objective: Objective | None = None,
    unlearner: Unlearner | None = None,
    original: RunResult | None = None,
    reference_metrics: dict[str, float] | None = None,
) -> UnlearnResult:
    """Unlearns the configured forget set from the original model (module docstring).

    Args:
      config: an unlearning config (`default_unlearn_config`, edited).
      workdir: where the original run, the reference, the unlearning checkpoints and
        ``unlearn_metrics.json`` / ``.md`` go; None keeps everything in memory. Rerunning
        with the same workdir resumes (and refuses a different ``config.unlearn``).
      scenario, model, method, objective: prebuilt components of the continual run
        (default: from the config), as in `train_continual`; ``model`` is the initial model.
      unlearner: a prebuilt `Unlearner` (default: ``config.unlearn.name``).
      original: the finished original run (a `RunResult` with its state, e.g. from
        `train_original`), to unlearn several times without retraining it.
      reference_metrics: the reference's metrics on the same sets (e.g. a previous
        result's ``reference_metrics``), to skip building the reference.

    Returns:
      The `UnlearnResult`.

    Raises:
      ValueError: a bad config (one line naming the key), an unlearner that cannot unlearn
        this model (e.g. 'acu' on a model not trained with 'acil'), or a workdir holding a
        different unlearning run.
      NonFiniteLossError: the unlearning loss became NaN or infinite.
    """
    _validate(config)
    with jax.enable_x64(bool(config.unlearn.x64)):
        return _unlearn(config, workdir, scenario, model, method, objective, unlearner,
                        original, reference_metrics)


def _unlearn(config, workdir, scenario, model, method, objective, unlearner, original,
             reference_metrics) -> UnlearnResult:
    u = config.unlearn
    continual = continual_config(config)
    scenario = scenario if scenario is not None else config_lib.build_scenario(continual)
    method = method if method is not None else config_lib.build_method(continual)
    objective = (objective if objective is not None
                 else config_lib.build_objective(continual, scenario))
    unlearner = unlearner if unlearner is not None else build_unlearner(config)
    sets = forget_sets(u, scenario)
    if u.reference == "closed_form" and unlearner.retrain is None:
        raise ValueError(f"config.unlearn.reference='closed_form' needs an unlearner with a "
                         f"closed-form retrain (e.g. 'acu'); {unlearner.name!r} has none: use "
                         "'retrain' or 'none'")
    if unlearner.is_gradient and method.predict is not None:
        raise ValueError(f"unlearner {unlearner.name!r} updates the model's parameters, but "
                         f"continual method {method.name!r} predicts from its memory "
                         "(Method.predict); use an edit of that memory (e.g. 'acu' for 'acil')")
    if workdir is not None:
        _check_unlearn_workdir(workdir, config)
    total_start = time.perf_counter()
    if original is None:
        original_dir = u.original_workdir or (None if workdir is None
                                              else os.path.join(workdir, "original"))
        log.info("%s: original model (%s, %s)%s", config.name, method.name, scenario.name,
                 "" if original_dir is None else f" in {original_dir}")
        original = train_original(config, original_dir, scenario=scenario, model=model,
                                  method=method, objective=objective)
    if original.state is None or original.model is None:
        raise ValueError("original must be a RunResult with its state (train_continual(..., "
                         "keep_state=True) or train_original)")
    fns, state0 = original.model, _single_device(original.state)
    steps = StepFns(fns, method, optax.identity(), data_mesh(1), objective,
                    _data_spec(fns, state0, scenario))
    ev = _Evaluator(steps, config.train.eval_batch_size)
    ckpt = None if workdir is None else Checkpointer(
        os.path.join(workdir, "unlearn", "checkpoints"), max_to_keep=u.checkpoints_to_keep)
    run = _Run(config=config, unlearner=unlearner, method=method, objective=objective,
               model=fns, original=state0, sets=sets, ev=ev, ckpt=ckpt)

    original_metrics = model_metrics(ev, state0, sets, mia_feature=u.mia_feature)
    times: dict[str, Any] = {"train_s": original.train_time_s}
    reference_state, info_extra = None, {}
    if reference_metrics is None:
        reference_state, reference_metrics, ref_times = _reference(run, workdir, scenario, model)
        info_extra = {"reference": ref_times.pop("reference_info")} \
            if "reference_info" in ref_times else {}
        times.update(ref_times)
    key = _metric_key(objective, "forget_train")
    target = None
    if u.target >= 0:
        target = float(u.target)
    elif u.target_margin >= 0:
        sign = 1.0 if primary_metric(objective).higher_is_better else -1.0
        target = float(reference_metrics[key]) + sign * float(u.target_margin)

    if unlearner.is_gradient:
        state, progress = _run_gradient(run, target)
    else:
        state, progress = _run_edit(run)
    metrics = model_metrics(ev, state, sets, mia_feature=u.mia_feature)
    times.update(unlearn_s=progress.unlearn_s, eval_s=progress.eval_s)
    if progress.unlearn_first_s is not None:
        times.update(unlearn_first_s=progress.unlearn_first_s,
                     unlearn_repeats_s=progress.unlearn_repeats_s)
    times["total_s"] = time.perf_counter() - total_start
    info = dict(progress.info, **info_extra)
    if unlearner.is_gradient:
        info.update(trace=progress.trace, target=target)
    result = UnlearnResult(
        name=config.name, unlearner=unlearner.name, method=method.name, metrics=metrics,
        original_metrics=original_metrics, reference_metrics=reference_metrics,
        gap=None if reference_metrics is None else reference_gap(metrics, reference_metrics),
        sizes=sets.sizes(), steps=progress.step, reached_target=progress.reached_target,
        times=times, info=info, state=state, model=fns, original=original,
        reference=reference_state)
    log.info("%s: %s %.4g -> %.4g%s in %.2fs", config.name, key, original_metrics[key],
             metrics[key], "" if reference_metrics is None
             else f" (reference {reference_metrics[key]:.4g})", progress.unlearn_s)
    if workdir is not None:
        doc = json.dumps(result.as_json(), indent=2, default=_json_default)
        atomic_write_text(os.path.join(workdir, METRICS_FILE), doc)
        atomic_write_text(os.path.join(workdir, TABLE_FILE), _markdown(result))
        ckpt.close()
    return result
