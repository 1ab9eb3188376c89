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
from clax.data.streams import (
    BlurrySplit,
    RecurringSplit,
    as_online,
    blurry_split,
    recurring,
    recurring_split,
    si_blurry,
)

__all__ = [
    "KINDS",
    "SCENARIOS",
    "SOURCES",
    "BlurrySplit",
    "Dataset",
    "RecurringSplit",
    "Scenario",
    "Task",
    "as_online",
    "blurry_split",
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
    "recurring",
    "recurring_split",
    "rotate_images",
    "rotated",
    "si_blurry",
    "task_incremental",
]
