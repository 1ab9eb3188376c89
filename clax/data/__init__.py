"""Data for continual learning: sources that load datasets, scenarios that split them.

A source (`load_source`, `SOURCES`) returns a `Dataset` of numpy arrays; a scenario
factory (`make_scenario`, `SCENARIOS`) splits it into a deterministic sequence of `Task`s
held in a `Scenario`.
"""

from clax.data.rotation import rotate_images
from clax.data.scenarios import (
    KINDS,
    SCENARIOS,
    Scenario,
    Task,
    class_incremental,
    make_scenario,
    permuted,
    pretrain_continual,
    rotated,
    task_incremental,
)
from clax.data.sources import (
    SOURCES,
    Dataset,
    load_digits,
    load_fashion_mnist,
    load_idx,
    load_source,
    load_tfds,
    read_idx,
)

__all__ = [
    "KINDS",
    "SCENARIOS",
    "SOURCES",
    "Dataset",
    "Scenario",
    "Task",
    "class_incremental",
    "load_digits",
    "load_fashion_mnist",
    "load_idx",
    "load_source",
    "load_tfds",
    "make_scenario",
    "permuted",
    "pretrain_continual",
    "read_idx",
    "rotate_images",
    "rotated",
    "task_incremental",
]
