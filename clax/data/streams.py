"""Realistic task streams: stochastic blurry boundaries, recurring tasks, online passes.

The scenarios of `clax.data.scenarios` have clean boundaries: each class belongs to one
task and tasks never come back. Real streams do not look like that. This module builds
`Scenario` objects the training loop runs unchanged:

- `si_blurry` (Moon et al., ICCV 2023, "Si-Blurry"): a mix of *disjoint* classes, seen in
  one task only, and *blurry* classes whose samples leak into other tasks; the number of
  classes and samples per task is random.
- `recurring` (SCoLe style, Lesort et al., CoLLAs 2023): long sequences (50+ tasks) of small
  random class subsets, where an earlier task comes back with a set probability.
- `as_online` (or ``make_scenario(..., online=True)`` for any registered scenario) marks
  a scenario as an online stream (``Scenario.online``): one pass over the data and no
  task boundaries given to the method. The training loop then trains one epoch per task,
  hides the task index from the method, and refuses methods that need boundaries
  (boundary hooks, their own training data).

The sample plans are plain index computations (`blurry_split`, `recurring_split`) over a
label vector, deterministic given ``seed``, so they can be inspected and tested apart from
the images. Both factories are registered in `clax.data.SCENARIOS` (``si_blurry``,
``recurring``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import numpy as np

from clax._validation import check_positive_int, check_unit_interval
from clax.data.dataset import Dataset
from clax.data.scenarios import (
    SCENARIOS,
    Scenario,
    Task,
    _check_dataset,
    _check_max,
    _check_num_tasks,
    _rng,
    _scenario_name,
)

__all__ = [
    "BlurrySplit",
    "RecurringSplit",
    "as_online",
    "blurry_split",
    "recurring",
    "recurring_split",
    "si_blurry",
]

# Random streams of this module (disjoint from scenarios.py's 0..3).
_STREAM_BLURRY, _STREAM_RECURRING, _STREAM_TRAIN_SUBSET, _STREAM_TEST_SUBSET = range(10, 14)
# Tolerance when a share times a count lands a hair below an integer (0.29 * 100).
_EPS = 1e-9


# --------------------------------------------------------------------------------------
# Checks and helpers


def _check_labels(labels: Any, num_classes: Any) -> tuple[np.ndarray, int]:
    num_classes = check_positive_int("num_classes", num_classes)
    y = np.asarray(labels)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be a 1-D int array, got {y.dtype} {y.shape}")
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(
            f"labels must lie in [0, num_classes={num_classes}), got [{y.min()}, {y.max()}]"
        )
    return y, num_classes


def _per_class_subsample(y: np.ndarray, limit: int | None, rng: np.random.Generator
                         ) -> np.ndarray:
    """Sorted indices keeping at most ``limit`` random examples of each class."""
    if limit is None:
        return np.arange(len(y))
    keep = [
        rng.choice(idx, size=min(limit, len(idx)), replace=False)
        for idx in (np.flatnonzero(y == c) for c in np.unique(y))
    ]
    return np.sort(np.concatenate(keep)) if keep else np.arange(0)


def _subsampled(dataset: Dataset, max_train_per_class: int | None,
                max_test_per_class: int | None, seed: int) -> Dataset:
    """The dataset with at most that many random examples per class (train / test)."""
    _check_max(max_train_per_class, "max_train_per_class")
    _check_max(max_test_per_class, "max_test_per_class")
    if max_train_per_class is None and max_test_per_class is None:
        return dataset
    tr = _per_class_subsample(dataset.y_train, max_train_per_class,
                              _rng(seed, _STREAM_TRAIN_SUBSET))
    te = _per_class_subsample(dataset.y_test, max_test_per_class,
                              _rng(seed, _STREAM_TEST_SUBSET))
    return dataset._replace(
        x_train=dataset.x_train[tr], y_train=dataset.y_train[tr],
        x_test=dataset.x_test[te], y_test=dataset.y_test[te],
    )


def _frozen(a: np.ndarray) -> np.ndarray:
    """Marks an array read-only (tasks share test arrays; nobody may write through one)."""
    a.flags.writeable = False
    return a


def _input_shape(dataset: Dataset) -> tuple[int, ...]:
    return tuple(int(d) for d in dataset.x_train.shape[1:])


# --------------------------------------------------------------------------------------
# Si-Blurry


class BlurrySplit(NamedTuple):
    """The sample plan of a stochastic blurry stream (see `blurry_split`).

    Attributes:
        task_indices: per task, int64 indices into the training labels, in stream order.
            Together they hold every training index exactly once.
        home: (C,) int32, the task each class belongs to (its test samples are evaluated
            as part of that task).
        disjoint: (C,) bool, the class appears in its home task only.
        task_weights: (T,) float64, the Dirichlet weights that sent leaked samples to tasks.
    """

    task_indices: tuple[np.ndarray, ...]
    home: np.ndarray
    disjoint: np.ndarray
    task_weights: np.ndarray


def blurry_split(
    labels: np.ndarray,
    *,
    num_classes: int,
    num_tasks: int = 5,
    disjoint_share: float = 0.5,
    blurry_share: float = 0.1,
    seed: int = 0,
) -> BlurrySplit:
    """Plans a Si-Blurry stream: which training sample goes to which task.

    Steps (all draws from ``np.random.default_rng([seed, 10])``):

    1. **Home tasks.** The classes are shuffled and cut into ``num_tasks`` non-empty groups
       at ``num_tasks - 1`` distinct random cut points, so every task owns at least one
       class and the number of classes per task is random.
    2. **Disjoint / blurry mix.** ``floor(disjoint_share * C)`` classes, drawn at random
       independently of the homes, are *disjoint*: all their samples go to the home task.
       The others are *blurry*.
    3. **Leaks.** Task weights ``w ~ Dirichlet(1, ..., 1)`` are drawn once (Si-Blurry's
       random cut points over the moved samples, so task sizes vary). Each blurry class
       with ``n`` training samples sends ``floor(blurry_share * n)`` random ones to other
       tasks, each to task ``t != home`` with probability ``w_t / sum_{s != home} w_s``;
       the rest stay home. A blurry class therefore spans its home and a random set of
       other tasks, earlier or later (a class may show up before its home task, as in
       Si-Blurry).
    4. Each task's samples are shuffled into stream order.

    Differences from the official sampler (``OnlineSampler`` of the MVP code, with
    ``varing_NM=True``): there the disjoint and blurry classes are cut into tasks
    separately (a task may get no class at all, and the disjoint count is rounded down to a
    multiple of the task count) and the moved samples are pooled across classes before
    being cut into tasks; here every task owns a class and each class leaks its own share.

    Args:
        labels: (N,) int training labels in ``[0, num_classes)``.
        num_classes: the number of classes C.
        num_tasks: the number of tasks T, at most C (every task owns a class).
        disjoint_share: fraction of classes that are disjoint (Si-Blurry's N / 100).
        blurry_share: fraction of each blurry class's samples that leave its home task
            (Si-Blurry's M / 100).
        seed: the stream's seed.

    Returns:
        A `BlurrySplit`.

    Raises:
        TypeError: naming the argument: a share or ``num_classes`` of the wrong type.
        ValueError: naming the argument: ``num_tasks`` < 1 or larger than ``num_classes``,
            a share outside [0, 1], bad labels or seed, or a task left without samples.
    """
    y, C = _check_labels(labels, num_classes)
    T = _check_num_tasks(num_tasks)
    d = check_unit_interval("disjoint_share", disjoint_share)
    m = check_unit_interval("blurry_share", blurry_share)
    if T > C:
        raise ValueError(
            f"num_tasks={T} is more than the {C} classes (num_classes): every task of a "
            "blurry stream needs at least one class of its own"
        )
    rng = _rng(seed, _STREAM_BLURRY)
    order = rng.permutation(C)
    cuts = np.sort(rng.choice(np.arange(1, C), size=T - 1, replace=False))
    home = np.empty(C, np.int32)
    for t, group in enumerate(np.split(order, cuts)):
        home[group] = t
    disjoint = np.zeros(C, bool)
    disjoint[rng.choice(C, size=int(np.floor(d * C + _EPS)), replace=False)] = True
    weights = rng.dirichlet(np.ones(T))

    parts: list[list[np.ndarray]] = [[] for _ in range(T)]
    for c in range(C):
        idx = rng.permutation(np.flatnonzero(y == c))
        h = int(home[c])
        leak = 0 if (disjoint[c] or T == 1) else int(np.floor(m * len(idx) + _EPS))
        parts[h].append(idx[leak:])
        if leak:
            p = weights.copy()
            p[h] = 0.0
            dest = rng.choice(T, size=leak, p=p / p.sum())
            for t in range(T):
                parts[t].append(idx[:leak][dest == t])
    task_indices = []
    for t in range(T):
        idx = np.concatenate(parts[t]) if parts[t] else np.zeros(0, np.int64)
        if idx.size == 0:
            raise ValueError(
                f"task {t} of the blurry stream got no training samples (its classes have "
                f"none, or blurry_share={m} moved them all); lower num_tasks or blurry_share, "
                "or change the seed"
            )
        task_indices.append(rng.permutation(idx).astype(np.int64))
    return BlurrySplit(tuple(task_indices), home, disjoint, weights)


def si_blurry(
    dataset: Dataset,
    *,
    num_tasks: int = 5,
    disjoint_share: float = 0.5,
    blurry_share: float = 0.1,
    seed: int = 0,
    max_train_per_class: int | None = None,
    max_test_per_class: int | None = None,
) -> Scenario:
    """Si-Blurry stream: stochastic blurry task boundaries (Moon et al., ICCV 2023).

    Training samples are split by `blurry_split` (every sample in exactly one task).
    Task t's test set holds the test samples of the classes whose home is t, so the
    columns of the accuracy matrix partition the test set; ``Task.classes`` lists the
    classes present in the task's *training* samples (home classes plus leaked ones).

    Defaults follow the paper's setting (N = 50% disjoint classes, M = 10% blurry
    samples, 5 tasks). Si-Blurry is an online protocol: wrap the scenario in `as_online`
    (or pass ``online=True`` to `make_scenario`) to train one pass without boundaries.

    Args:
        dataset: the data (every class takes part).
        num_tasks: the number of tasks, at most the number of classes.
        disjoint_share: fraction of classes that appear in one task only.
        blurry_share: fraction of each blurry class's samples spread to other tasks.
        seed: seeds the plan and the subsampling.
        max_train_per_class: keep at most this many random training examples per class
            (before planning, so each kept example still appears exactly once).
        max_test_per_class: keep at most this many random test examples per class.

    Returns:
        A ``class_incremental`` `Scenario` named ``"si_blurry/<dataset>"``.

    References:
        Moon, Park, Kim, Park. Online Class Incremental Learning on Stochastic Blurry Task
        Boundary via Mask and Visual Prompt Tuning. ICCV 2023. arXiv:2308.09303.
    """
    _check_dataset(dataset)
    _rng(seed, 0)  # Validates seed before anything is copied.
    data = _subsampled(dataset, max_train_per_class, max_test_per_class, seed)
    plan = blurry_split(data.y_train, num_classes=data.num_classes, num_tasks=num_tasks,
                        disjoint_share=disjoint_share, blurry_share=blurry_share, seed=seed)
    tasks = []
    for t, idx in enumerate(plan.task_indices):
        y_tr = data.y_train[idx]
        test = np.flatnonzero(np.isin(data.y_test, np.flatnonzero(plan.home == t)))
        tasks.append(Task(t, data.x_train[idx], y_tr, data.x_test[test], data.y_test[test],
                          np.unique(y_tr).astype(np.int32)))
    return Scenario(
        name=_scenario_name("si_blurry", dataset),
        kind="class_incremental",
        tasks=tuple(tasks),
        num_classes=dataset.num_classes,
        input_shape=_input_shape(dataset),
    )


# --------------------------------------------------------------------------------------
# Recurring (SCoLe style)


class RecurringSplit(NamedTuple):
    """The sample plan of a recurring stream (see `recurring_split`).

    Attributes:
        task_classes: per task, the sorted int32 class ids it trains on.
        task_indices: per task, int64 indices into the training labels.
        repeats: (T,) int32: for a task that brings back an earlier one, the index of the
            task that first drew that class set; -1 for a fresh draw.
    """

    task_classes: tuple[np.ndarray, ...]
    task_indices: tuple[np.ndarray, ...]
    repeats: np.ndarray


def recurring_split(
    labels: np.ndarray,
    *,
    num_classes: int,
    num_tasks: int = 50,
    classes_per_task: int = 2,
    recurrence: float = 0.5,
    samples_per_class: int | None = None,
    seed: int = 0,
) -> RecurringSplit:
    """Plans a recurring (SCoLe-style) stream: class subsets that come back.

    Task 0 draws ``classes_per_task`` distinct classes uniformly at random. Every later
    task, independently with probability ``recurrence``, *repeats* an earlier task: it
    takes the class set of one of the fresh draws so far, chosen uniformly. Otherwise it
    is a fresh uniform draw. So ``recurrence`` is the expected fraction of tasks 1..T-1
    that bring back an earlier task. With few classes a fresh draw can also hit an
    earlier class set by chance (probability at most ``#fresh sets / (C choose k)``);
    ``repeats`` marks only the scheduled recurrences.

    Samples: with ``samples_per_class=None`` each class's training samples are shuffled
    and dealt out evenly (``np.array_split``) over the tasks it occurs in, so the stream
    is one pass: every sample of a class that occurs appears exactly once. With an int,
    each occurrence takes that many distinct random samples of the class, independently
    of other occurrences (data recurs too, as in SCoLe's finite environment).

    Args:
        labels: (N,) int training labels in ``[0, num_classes)``.
        num_classes: the number of classes C.
        num_tasks: the number of tasks T (SCoLe studies 50 to 1000+).
        classes_per_task: the classes of each task, k <= C.
        recurrence: the probability that a task after the first repeats an earlier one.
        samples_per_class: samples of each class per occurrence (None: deal every sample
            out once).
        seed: the stream's seed (draws from ``np.random.default_rng([seed, 11])``).

    Returns:
        A `RecurringSplit`.

    Raises:
        TypeError: naming the argument: a count or ``recurrence`` of the wrong type.
        ValueError: naming the argument: ``num_tasks`` or ``classes_per_task`` < 1,
            ``classes_per_task`` > ``num_classes``, ``recurrence`` outside [0, 1],
            ``samples_per_class`` larger than a class, or a class occurring more often
            than it has samples.
    """
    y, C = _check_labels(labels, num_classes)
    T = _check_num_tasks(num_tasks)
    k = check_positive_int("classes_per_task", classes_per_task)
    r = check_unit_interval("recurrence", recurrence)
    if k > C:
        raise ValueError(
            f"classes_per_task={k} is more than the {C} classes (num_classes)"
        )
    if samples_per_class is not None:
        samples_per_class = check_positive_int("samples_per_class", samples_per_class)
    rng = _rng(seed, _STREAM_RECURRING)
    task_classes: list[np.ndarray] = []
    repeats = np.full(T, -1, np.int32)
    fresh: list[int] = []
    for t in range(T):
        if t > 0 and rng.random() < r:
            src = fresh[int(rng.integers(len(fresh)))]
            repeats[t] = src
            task_classes.append(task_classes[src])
        else:
            fresh.append(t)
            task_classes.append(np.sort(rng.choice(C, size=k, replace=False)).astype(np.int32))

    by_class = [np.flatnonzero(y == c) for c in range(C)]
    occurrences = [[t for t in range(T) if c in task_classes[t]] for c in range(C)]
    chunks: dict[tuple[int, int], np.ndarray] = {}
    for c in range(C):
        idx, occ = by_class[c], occurrences[c]
        if not occ:
            continue
        if samples_per_class is None:
            if len(idx) < len(occ):
                raise ValueError(
                    f"class {c} occurs in {len(occ)} tasks but has only {len(idx)} training "
                    "samples to deal out; lower num_tasks or pass samples_per_class"
                )
            for t, part in zip(occ, np.array_split(rng.permutation(idx), len(occ)), strict=False):
                chunks[(t, c)] = part
        else:
            if len(idx) < samples_per_class:
                raise ValueError(
                    f"samples_per_class={samples_per_class} is more than the {len(idx)} "
                    f"training samples of class {c}"
                )
            for t in occ:
                chunks[(t, c)] = rng.choice(idx, size=samples_per_class, replace=False)
    task_indices = tuple(
        rng.permutation(np.concatenate([chunks[(t, c)] for c in task_classes[t]]))
        .astype(np.int64)
        for t in range(T)
    )
    return RecurringSplit(tuple(task_classes), task_indices, repeats)


def recurring(
    dataset: Dataset,
    *,
    num_tasks: int = 50,
    classes_per_task: int = 2,
    recurrence: float = 0.5,
    samples_per_class: int | None = None,
    seed: int = 0,
    max_train_per_class: int | None = None,
    max_test_per_task: int | None = None,
) -> Scenario:
    """Recurring stream (SCoLe style): many small class subsets; earlier tasks come back.

    The plan is `recurring_split`. Task t's test set holds the test samples of its
    classes (at most ``max_test_per_task`` of them, a random subset fixed per class set,
    so a repeated task is evaluated on exactly the same samples as the task it repeats;
    repeated tasks share their read-only test arrays).

    The loop evaluates every task after each task, so the cost of evaluation grows with
    ``num_tasks ** 2``: use ``max_test_per_task`` for long streams.

    Args:
        dataset: the data.
        num_tasks: the number of tasks.
        classes_per_task: the classes of each task.
        recurrence: the probability that a task after the first repeats an earlier one.
        samples_per_class: samples of each class per occurrence (None: every training
            sample of a class is dealt out once over its occurrences).
        seed: seeds the plan and the subsampling.
        max_train_per_class: keep at most this many random training examples per class
            before planning.
        max_test_per_task: keep at most this many random test examples per task.

    Returns:
        A ``class_incremental`` `Scenario` named ``"recurring/<dataset>"``.

    References:
        Lesort, Ostapenko, Misra, Arefin, Rodríguez, Charlin, Rish. Challenging Common
        Assumptions about Catastrophic Forgetting (SCoLe). CoLLAs 2023. arXiv:2207.04543.
    """
    _check_dataset(dataset)
    _rng(seed, 0)  # Validates seed before anything is copied.
    _check_max(max_test_per_task, "max_test_per_task")
    data = _subsampled(dataset, max_train_per_class, None, seed)
    plan = recurring_split(
        data.y_train, num_classes=data.num_classes, num_tasks=num_tasks,
        classes_per_task=classes_per_task, recurrence=recurrence,
        samples_per_class=samples_per_class, seed=seed,
    )
    tests: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    tasks = []
    for t, (classes, idx) in enumerate(zip(plan.task_classes, plan.task_indices, strict=False)):
        src = t if plan.repeats[t] < 0 else int(plan.repeats[t])
        if src not in tests:
            test = np.flatnonzero(np.isin(data.y_test, classes))
            if max_test_per_task is not None and len(test) > max_test_per_task:
                sub = _rng(seed, _STREAM_TEST_SUBSET, src)
                test = np.sort(sub.choice(test, size=max_test_per_task, replace=False))
            tests[src] = (_frozen(data.x_test[test]), _frozen(data.y_test[test]))
        x_te, y_te = tests[src]
        tasks.append(Task(t, data.x_train[idx], data.y_train[idx], x_te, y_te,
                          classes.copy()))
    return Scenario(
        name=_scenario_name("recurring", dataset),
        kind="class_incremental",
        tasks=tuple(tasks),
        num_classes=dataset.num_classes,
        input_shape=_input_shape(dataset),
    )


# --------------------------------------------------------------------------------------
# Online streams


def as_online(scenario: Scenario) -> Scenario:
    """The same tasks as an online stream: one pass, boundaries hidden from the method.

    Equivalent to ``make_scenario(name, dataset, online=True, ...)``. The training loop
    (`clax.training.train_continual`) then trains one epoch per task whatever
    ``config.train.epochs_per_task`` says, passes task index 0 and task ids 0 to the
    method's step hooks, and refuses methods that need boundaries (``before_task`` or
    ``consolidate`` hooks, their own ``training_data``). Evaluation still reports every
    task.

    Raises:
        TypeError: ``scenario`` is not a `Scenario`.
        ValueError: for a ``task_incremental`` scenario (its task ids reveal the tasks).
    """
    if not isinstance(scenario, Scenario):
        raise TypeError(f"scenario must be a clax.data.Scenario, got {type(scenario)}")
    return dataclasses.replace(scenario, online=True)


# Registered here: scenarios.py cannot import this module (this module imports it).
SCENARIOS.update({"si_blurry": si_blurry, "recurring": recurring})
