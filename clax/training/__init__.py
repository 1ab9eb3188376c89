"""The driver: the continual task loop, its jitted steps, config, checkpoints.

The top layer of clax: it imports the contract (`clax.core`), the registered methods
(`clax.methods`, imported explicitly by `clax.training.config`) and the metrics; nothing
below imports it.
"""

from clax.training.checkpoint import CorruptCheckpointError
from clax.training.config import (
    build_method,
    build_model,
    build_objective,
    build_optimizer,
    build_scenario,
    default_config,
)
from clax.training.health import NonFiniteLossError, NonFiniteStateError
from clax.training.loop import Progress, RunResult, train_continual
from clax.training.sharding import (
    ShardingRules,
    data_mesh,
    logical_axes,
    make_mesh,
    state_shardings,
)
from clax.training.steps import StepFns, StepMetrics

# The unlearning driver is `clax.training.unlearn.unlearn` (the submodule keeps its name).
from clax.training.unlearn import UnlearnResult, default_unlearn_config
from clax.training.workdir import WorkdirInUseError, WorkdirLock

__all__ = [
    "CorruptCheckpointError",
    "NonFiniteLossError",
    "NonFiniteStateError",
    "Progress",
    "RunResult",
    "ShardingRules",
    "StepFns",
    "StepMetrics",
    "UnlearnResult",
    "WorkdirInUseError",
    "WorkdirLock",
    "build_method",
    "build_model",
    "build_objective",
    "build_optimizer",
    "build_scenario",
    "data_mesh",
    "default_config",
    "default_unlearn_config",
    "logical_axes",
    "make_mesh",
    "state_shardings",
    "train_continual",
]
