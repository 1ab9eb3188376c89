"""Continual-learning scenarios: a `Dataset` split into a fixed sequence of tasks.

Three kinds:

- ``class_incremental``: each task brings new classes; the model is never told the task
  and must tell all seen classes apart (one shared output layer).
- ``task_incremental``: the same class splits, but the model gets the task id (the
  training code builds per-task heads or logit masks from `Task.classes`).
- ``domain_incremental`` (`permuted`, `rotated`): every task has all classes, and the
  input distribution changes from task to task.

Labels stay global (class 7 is label 7 in every task). Every factory is deterministic
given ``seed`` (``np.random.default_rng``, no global state), and accepts
``max_train_per_task`` / ``max_test_per_task`` to keep a fixed random subset of each
task's examples for quick runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

from clax.data.rotation import rotate_images
from clax.data.sources import Dataset, _call_checked

__all__ = [
    "KINDS",
    "SCENARIOS",
    "Scenario",
    "Task",
    "class_incremental",
    "make_scenario",
    "permuted",
    "pretrain_continual",
    "rotated",
    "task_incremental",
]

KINDS = ("class_incremental", "task_incremental", "domain_incremental")

# Independent random streams (so e.g. subsampling does not change the class order).
_STREAM_CLASSES, _STREAM_PERMUTATION, _STREAM_TRAIN, _STREAM_TEST = range(4)


class Task(NamedTuple):
    """One task of a scenario (a plain pytree of arrays).

    Attributes:
        id: the task's index in its scenario (0, 1, ...).
        x_train: float32 images (N, H, W, C).
        y_train: int32 global labels (N,).
        x_test: float32 images (M, H, W, C).
        y_test: int32 global labels (M,).
        classes: int32 sorted global class ids this task contains.
    """

    id: int
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: np.ndarray


# eq=False: the tasks hold arrays, which have no single truth value to compare or hash.
@dataclasses.dataclass(frozen=True, eq=False)
class Scenario:
    """A sequence of tasks and what a model needs to know to learn them.

    Attributes:
        name: ``"<factory>/<dataset>"``, e.g. ``"class_incremental/digits"``.
        kind: ``"class_incremental"``, ``"task_incremental"`` or ``"domain_incremental"``.
        tasks: the tasks, in training order.
        num_classes: the size of the model's output layer (labels are global).
        input_shape: the image shape (H, W, C).
        online: an online stream: one pass over the data, task boundaries hidden from the
            method (the loop trains one epoch per task and gives the method no task index
            and no boundary hooks; see `clax.data.streams`).
    """

    name: str
    kind: str
    tasks: tuple[Task, ...] = dataclasses.field(repr=False)
    num_classes: int
    input_shape: tuple[int, ...]
    online: bool = False

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.online and self.kind == "task_incremental":
            raise ValueError(
                f"scenario {self.name!r}: an online stream hides task boundaries from the "
                "method, but a task_incremental scenario gives it task ids"
            )
        if not self.tasks:
            raise ValueError(f"scenario {self.name!r} needs at least one task")
        for i, task in enumerate(self.tasks):
            if task.id != i:
                raise ValueError(f"scenario {self.name!r}: task {i} has id {task.id}")

    @property
    def num_tasks(self) -> int:
        """The number of tasks."""
        return len(self.tasks)

    @property
    def uses_task_ids(self) -> bool:
        """Whether the model is given task ids (task-incremental only)."""
        return self.kind == "task_incremental"


# --------------------------------------------------------------------------------------
# Helpers


def _rng(seed: int, stream: int, *more: int) -> np.random.Generator:
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    return np.random.default_rng([int(seed), stream, *more])


def _check_dataset(dataset: Dataset) -> None:
    if not isinstance(dataset, Dataset):
        raise ValueError(
            f"dataset must be a clax.data.Dataset (from load_source), got {type(dataset)}"
        )
    if dataset.x_train.ndim != 4 or dataset.x_test.ndim != 4:
        raise ValueError(
            f"dataset {dataset.name!r} images must be (N, H, W, C), got "
            f"{dataset.x_train.shape} and {dataset.x_test.shape}"
        )


def _check_max(value: int | None, arg: str) -> None:
    if value is not None and (
        not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1
    ):
        raise ValueError(f"{arg} must be None or a positive int, got {value!r}")


def _subsample(n: int, limit: int | None, rng: np.random.Generator) -> np.ndarray | None:
    """Sorted indices of ``limit`` random examples out of n, or None to keep them all."""
    if limit is None or n <= limit:
        return None
    return np.sort(rng.choice(n, size=limit, replace=False))


def _take(x: np.ndarray, y: np.ndarray, keep: np.ndarray | None) -> tuple[np.ndarray, ...]:
    return (x, y) if keep is None else (x[keep], y[keep])


def _scenario_name(factory: str, dataset: Dataset) -> str:
    return f"{factory}/{dataset.name}"


# --------------------------------------------------------------------------------------
# Class splits


def _class_order(
    num_classes: int, class_order: Sequence[int] | None, shuffle_classes: bool, seed: int
) -> np.ndarray:
    if class_order is None:
        if shuffle_classes:
            return _rng(seed, _STREAM_CLASSES).permutation(num_classes)
        return np.arange(num_classes)
    if shuffle_classes:
        raise ValueError("pass either class_order or shuffle_classes=True, not both")
    order = np.asarray(class_order)
    if order.ndim != 1 or order.size == 0 or not np.issubdtype(order.dtype, np.integer):
        raise ValueError(f"class_order must be a non-empty sequence of ints, got {class_order!r}")
    if order.min() < 0 or order.max() >= num_classes:
        raise ValueError(
            f"class_order must hold class ids in [0, {num_classes}), got {order.tolist()}"
        )
    if len(np.unique(order)) != len(order):
        raise ValueError(f"class_order must not repeat classes, got {order.tolist()}")
    return order


def _task_sizes(
    classes_per_task: int | Sequence[int], num_tasks: int | None, available: int
) -> list[int]:
    """Number of classes of each task, checked against the classes available."""
    if isinstance(classes_per_task, (int, np.integer)) and not isinstance(classes_per_task, bool):
        cpt = int(classes_per_task)
        if cpt < 1:
            raise ValueError(f"classes_per_task must be >= 1, got {cpt}")
        if num_tasks is None:
            if available % cpt:
                raise ValueError(
                    f"{available} classes do not split evenly into tasks of {cpt}; pass "
                    "num_tasks to use only the first num_tasks * classes_per_task classes, "
                    "or a sequence of per-task class counts"
                )
            num_tasks = available // cpt
        sizes = [cpt] * int(num_tasks)
    else:
        try:
            sizes = [int(s) for s in classes_per_task]
        except TypeError:
            raise ValueError(
                f"classes_per_task must be an int or a sequence of ints, got {classes_per_task!r}"
            ) from None
        if not sizes or min(sizes) < 1:
            raise ValueError(f"classes_per_task entries must be >= 1, got {sizes}")
        if num_tasks is not None and num_tasks != len(sizes):
            raise ValueError(
                f"num_tasks={num_tasks} does not match the {len(sizes)} entries of "
                f"classes_per_task={sizes}"
            )
    if not sizes:
        raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
    if sum(sizes) > available:
        raise ValueError(
            f"the tasks need {sum(sizes)} classes ({sizes}) but only {available} are available"
        )
    return sizes


def _split_by_class(
    dataset: Dataset,
    kind: str,
    factory: str,
    classes_per_task: int | Sequence[int],
    num_tasks: int | None,
    class_order: Sequence[int] | None,
    shuffle_classes: bool,
    seed: int,
    max_train_per_task: int | None,
    max_test_per_task: int | None,
) -> Scenario:
    _check_dataset(dataset)
    _check_max(max_train_per_task, "max_train_per_task")
    _check_max(max_test_per_task, "max_test_per_task")
    if num_tasks is not None:
        num_tasks = _check_num_tasks(num_tasks)
    order = _class_order(dataset.num_classes, class_order, shuffle_classes, seed)
    sizes = _task_sizes(classes_per_task, num_tasks, len(order))
    bounds = np.cumsum([0, *sizes])
    tasks = []
    for t in range(len(sizes)):
        classes = np.sort(order[bounds[t] : bounds[t + 1]]).astype(np.int32)
        train = np.isin(dataset.y_train, classes)
        test = np.isin(dataset.y_test, classes)
        x_tr, y_tr = dataset.x_train[train], dataset.y_train[train]
        x_te, y_te = dataset.x_test[test], dataset.y_test[test]
        keep_tr = _subsample(len(y_tr), max_train_per_task, _rng(seed, _STREAM_TRAIN, t))
        keep_te = _subsample(len(y_te), max_test_per_task, _rng(seed, _STREAM_TEST, t))
        x_tr, y_tr = _take(x_tr, y_tr, keep_tr)
        x_te, y_te = _take(x_te, y_te, keep_te)
        tasks.append(Task(t, x_tr, y_tr, x_te, y_te, classes))
    return Scenario(
        name=_scenario_name(factory, dataset),
        kind=kind,
        tasks=tuple(tasks),
        num_classes=dataset.num_classes,
        input_shape=tuple(int(d) for d in dataset.x_train.shape[1:]),
    )


def class_incremental(
    dataset: Dataset,
    *,
    classes_per_task: int | Sequence[int] = 2,
    num_tasks: int | None = None,
    class_order: Sequence[int] | None = None,
    shuffle_classes: bool = False,
    seed: int = 0,
    max_train_per_task: int | None = None,
    max_test_per_task: int | None = None,
) -> Scenario:
    """Splits the classes into tasks; the model is not told which task an input is from.

    Args:
        dataset: the data to split.
        classes_per_task: classes per task: an int, or one count per task (uneven tasks).
        num_tasks: the number of tasks. With an int ``classes_per_task`` it defaults to
            all classes split evenly (an error if they do not divide); a smaller value uses
            only the first ``num_tasks * classes_per_task`` classes of the order.
        class_order: the order classes are introduced in: a permutation of the class ids,
            or of a subset of them (the rest are left out). Default: natural order.
        shuffle_classes: use a ``seed``-shuffled class order instead of the natural one.
        seed: seeds the class shuffle and the subsampling.
        max_train_per_task: keep at most this many random training examples per task.
        max_test_per_task: keep at most this many random test examples per task.

    Returns:
        A ``class_incremental`` `Scenario` with global labels and ``num_classes`` equal to
        the dataset's.
    """
    return _split_by_class(
        dataset, "class_incremental", "class_incremental", classes_per_task, num_tasks,
        class_order, shuffle_classes, seed, max_train_per_task, max_test_per_task,
    )


def task_incremental(
    dataset: Dataset,
    *,
    classes_per_task: int | Sequence[int] = 2,
    num_tasks: int | None = None,
    class_order: Sequence[int] | None = None,
    shuffle_classes: bool = False,
    seed: int = 0,
    max_train_per_task: int | None = None,
    max_test_per_task: int | None = None,
) -> Scenario:
    """The class splits of `class_incremental`, with task ids given to the model.

    Labels stay global; the training code builds per-task heads or logit masks from
    `Task.classes`. The arguments are those of `class_incremental`.

    Returns:
        A ``task_incremental`` `Scenario`.
    """
    return _split_by_class(
        dataset, "task_incremental", "task_incremental", classes_per_task, num_tasks,
        class_order, shuffle_classes, seed, max_train_per_task, max_test_per_task,
    )


# --------------------------------------------------------------------------------------
# Domain-incremental


def _check_num_tasks(num_tasks: Any) -> int:
    if not isinstance(num_tasks, (int, np.integer)) or isinstance(num_tasks, bool) or num_tasks < 1:
        raise ValueError(f"num_tasks must be a positive int, got {num_tasks!r}")
    return int(num_tasks)


def _domain_scenario(
    dataset: Dataset,
    factory: str,
    transforms: Sequence[Callable[[np.ndarray], np.ndarray]],
    seed: int,
    max_train_per_task: int | None,
    max_test_per_task: int | None,
) -> Scenario:
    """One task per transform, each over all classes (subsampled before transforming)."""
    classes = np.arange(dataset.num_classes, dtype=np.int32)
    tasks = []
    for t, transform in enumerate(transforms):
        keep_tr = _subsample(len(dataset.y_train), max_train_per_task,
                             _rng(seed, _STREAM_TRAIN, t))
        keep_te = _subsample(len(dataset.y_test), max_test_per_task, _rng(seed, _STREAM_TEST, t))
        x_tr, y_tr = _take(dataset.x_train, dataset.y_train, keep_tr)
        x_te, y_te = _take(dataset.x_test, dataset.y_test, keep_te)
        # Copy labels so tasks never alias each other's (or the dataset's) arrays.
        tasks.append(Task(t, transform(x_tr), y_tr.copy(), transform(x_te), y_te.copy(),
                          classes.copy()))
    return Scenario(
        name=_scenario_name(factory, dataset),
        kind="domain_incremental",
        tasks=tuple(tasks),
        num_classes=dataset.num_classes,
        input_shape=tuple(int(d) for d in dataset.x_train.shape[1:]),
    )


def permuted(
    dataset: Dataset,
    *,
    num_tasks: int = 5,
    seed: int = 0,
    first_identity: bool = True,
    max_train_per_task: int | None = None,
    max_test_per_task: int | None = None,
) -> Scenario:
    """Permuted inputs (e.g. Permuted MNIST): each task shuffles the pixels its own way.

    Task t applies one fixed random permutation to the flattened H*W*C values of every
    image, train and test alike: ``x_t.reshape(N, -1) == x.reshape(N, -1)[:, perm_t]``.

    Args:
        dataset: the data (all classes appear in every task).
        num_tasks: the number of tasks.
        seed: seeds the permutations and the subsampling.
        first_identity: task 0 sees the unpermuted images.
        max_train_per_task: keep at most this many random training examples per task.
        max_test_per_task: keep at most this many random test examples per task.

    Returns:
        A ``domain_incremental`` `Scenario` named ``"permuted/<dataset>"``.
    """
    _check_dataset(dataset)
    num_tasks = _check_num_tasks(num_tasks)
    _check_max(max_train_per_task, "max_train_per_task")
    _check_max(max_test_per_task, "max_test_per_task")
    size = int(np.prod(dataset.x_train.shape[1:]))
    perms = [
        np.arange(size) if (t == 0 and first_identity)
        else _rng(seed, _STREAM_PERMUTATION, t).permutation(size)
        for t in range(num_tasks)
    ]

    def make(perm: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
        def apply(x: np.ndarray) -> np.ndarray:
            return np.take(x.reshape(len(x), -1), perm, axis=1).reshape(x.shape)
        return apply

    return _domain_scenario(dataset, "permuted", [make(p) for p in perms], seed,
                            max_train_per_task, max_test_per_task)


def rotated(
    dataset: Dataset,
    *,
    num_tasks: int | None = None,
    max_angle: float | None = None,
    angles: Sequence[float] | None = None,
    seed: int = 0,
    max_train_per_task: int | None = None,
    max_test_per_task: int | None = None,
) -> Scenario:
    """Rotated inputs (e.g. Rotated MNIST): task t sees every image turned by angle t.

    By default the angles are evenly spaced from 0 to ``max_angle`` inclusive:
    ``np.linspace(0, max_angle, num_tasks)`` (5 tasks up to 180 degrees: 0, 45, 90, 135,
    180). Rotation is `rotate_images` (counter-clockwise as displayed, bilinear, zeros
    outside the image).

    Args:
        dataset: the data (all classes appear in every task).
        num_tasks: the number of tasks (default 5, or ``len(angles)``).
        max_angle: the last task's angle in degrees (default 180); not with ``angles``.
        angles: explicit per-task angles in degrees instead.
        seed: seeds the subsampling.
        max_train_per_task: keep at most this many random training examples per task.
        max_test_per_task: keep at most this many random test examples per task.

    Returns:
        A ``domain_incremental`` `Scenario` named ``"rotated/<dataset>"``.
    """
    _check_dataset(dataset)
    _check_max(max_train_per_task, "max_train_per_task")
    _check_max(max_test_per_task, "max_test_per_task")
    _rng(seed, 0)  # Validates seed.
    if angles is not None:
        if max_angle is not None:
            raise ValueError("pass either angles or max_angle, not both")
        try:
            angle_list = [float(a) for a in angles]
        except (TypeError, ValueError):
            raise ValueError(f"angles must be a sequence of numbers, got {angles!r}") from None
        if not angle_list:
            raise ValueError("angles must not be empty")
        if num_tasks is not None and _check_num_tasks(num_tasks) != len(angle_list):
            raise ValueError(
                f"num_tasks={num_tasks} does not match the {len(angle_list)} angles {angle_list}"
            )
    else:
        num_tasks = _check_num_tasks(5 if num_tasks is None else num_tasks)
        max_angle = 180.0 if max_angle is None else max_angle
        if not isinstance(max_angle, (int, float, np.number)) or not np.isfinite(max_angle):
            raise ValueError(f"max_angle must be a finite number of degrees, got {max_angle!r}")
        angle_list = np.linspace(0.0, float(max_angle), num_tasks).tolist()

    def make(angle: float) -> Callable[[np.ndarray], np.ndarray]:
        return lambda x: rotate_images(x, angle)

    return _domain_scenario(dataset, "rotated", [make(a) for a in angle_list], seed,
                            max_train_per_task, max_test_per_task)


def pretrain_continual(
    dataset: Dataset,
    *,
    base_classes: Sequence[int] | None = None,
    classes_per_task: int | Sequence[int] = 2,
    seed: int = 0,
    max_train_per_task: int | None = None,
    max_test_per_task: int | None = None,
) -> Scenario:
    """Pretrain-then-continual: a base task of many classes, then small new-class tasks.

    Task 0 is the base ("pretraining", or control) split; tasks 1.. bring the remaining
    classes class-incrementally, in natural order. Report how much of the base accuracy
    survives the later tasks and how well they are learned
    (``clax.metrics.pretrain_continual_summary``). This is the setting of weight-space
    methods that protect a pre-trained model: EMA balancing (Qiao et al., ICML 2025),
    weight averaging (ZSCL, Zheng et al., ICCV 2023), LiNeS (Wang et al., ICLR 2025), SLCA
    (Zhang et al., ICCV 2023).

    Args:
        dataset: the data to split.
        base_classes: class ids of the base task; default the first half
            (``num_classes // 2``) of the classes.
        classes_per_task: classes per later task: an int (when it does not divide the
            remaining classes, the last task takes the remainder) or one count per task
            (summing to at most the remaining classes).
        seed: seeds the subsampling.
        max_train_per_task: keep at most this many random training examples per task.
        max_test_per_task: keep at most this many random test examples per task.

    Returns:
        A ``class_incremental`` `Scenario`.

    Raises:
        ValueError: bad ``base_classes`` (empty, repeated, out of range, or all classes)
            or ``classes_per_task``.
    """
    _check_dataset(dataset)
    n = dataset.num_classes
    if base_classes is None:
        base = np.arange(n // 2)
    else:
        base = np.asarray(base_classes)
        if base.ndim != 1 or base.size == 0 or not np.issubdtype(base.dtype, np.integer):
            raise ValueError(
                f"base_classes must be a non-empty sequence of ints, got {base_classes!r}"
            )
        if base.min() < 0 or base.max() >= n or len(np.unique(base)) != len(base):
            raise ValueError(
                f"base_classes must hold distinct class ids in [0, {n}), got {base.tolist()}"
            )
    rest = np.setdiff1d(np.arange(n), base)
    if base.size == 0 or rest.size == 0:
        raise ValueError(
            f"base_classes must leave classes for the later tasks and hold at least one; got "
            f"{base.tolist()} of {n} classes"
        )
    if isinstance(classes_per_task, (int, np.integer)) and not isinstance(classes_per_task, bool):
        cpt = int(classes_per_task)
        if cpt < 1:
            raise ValueError(f"classes_per_task must be >= 1, got {cpt}")
        sizes = [cpt] * (len(rest) // cpt) + ([len(rest) % cpt] if len(rest) % cpt else [])
    else:
        sizes = _task_sizes(classes_per_task, None, len(rest))
    return _split_by_class(
        dataset, "class_incremental", "pretrain_continual", [len(base), *sizes], None,
        [*base.tolist(), *rest.tolist()], False, seed, max_train_per_task, max_test_per_task,
    )


# --------------------------------------------------------------------------------------
# Registry

SCENARIOS: dict[str, Callable[..., Scenario]] = {
    "class_incremental": class_incremental,
    "task_incremental": task_incremental,
    "permuted": permuted,
    "rotated": rotated,
    "pretrain_continual": pretrain_continual,
}


def make_scenario(
    name: str, dataset: Dataset, /, *, online: bool = False, **kwargs: Any
) -> Scenario:
    """Builds the scenario registered as ``name`` (see `SCENARIOS`) from ``dataset``.

    Args:
        name: one of ``class_incremental``, ``task_incremental``, ``permuted``, ``rotated``,
            ``pretrain_continual``, ``si_blurry``, ``recurring`` (`clax.data.streams`).
        dataset: the data to split.
        online: make it an online stream (``Scenario.online``; any scenario but
            ``task_incremental``).
        **kwargs: that scenario factory's keyword arguments.

    Returns:
        The `Scenario`.
    """
    if name not in SCENARIOS:
        raise ValueError(f"unknown scenario {name!r}; valid choices: {sorted(SCENARIOS)}")
    if not isinstance(online, (bool, np.bool_)):
        raise TypeError(f"online must be a bool, got {online!r}")
    scenario = _call_checked(SCENARIOS[name], kwargs, f"scenario {name!r}", dataset=dataset)
    return dataclasses.replace(scenario, online=True) if online else scenario
