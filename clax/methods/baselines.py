"""Baselines: `finetune` (lower bound) and `joint` (multitask upper bound)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from clax.core import Method, TrainArrays, register_method
from clax.data.scenarios import Task


@register_method("finetune")
def finetune() -> Method:
    """Plain sequential training: each task is learned with the base optimizer alone.

    The usual lower bound of continual learning: nothing protects earlier tasks.
    """
    return Method(name="finetune")


def union_of_seen_tasks(tasks: Sequence[Task], index: int) -> TrainArrays:
    """Training arrays of tasks ``0..index`` concatenated (each example keeps its task id)."""
    seen = tasks[: index + 1]
    return TrainArrays(
        x=np.concatenate([t.x_train for t in seen]),
        y=np.concatenate([t.y_train for t in seen]),
        task_ids=np.concatenate([np.full(t.y_train.shape, t.id, np.int32) for t in seen]),
    )


@register_method("joint")
def joint() -> Method:
    """Multitask upper bound: at task i, train on the union of tasks 0..i.

    Training continues from the current parameters, one schedule per task as for every
    other method, so its cost grows with the number of tasks seen.
    """
    return Method(name="joint", training_data=union_of_seen_tasks)
