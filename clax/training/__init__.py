"""Continual training: the Method contract, jitted steps, the task loop."""

from clax.training import baselines  # noqa: F401  (registers finetune and joint)
from clax.training.baselines import finetune, joint, union_of_seen_tasks
from clax.training.config import (
    build_method,
    build_model,
    build_optimizer,
    build_scenario,
    default_config,
)
from clax.training.loop import NonFiniteLossError, RunResult, train_continual
from clax.training.method import (
    Batch,
    BoundaryContext,
    DataSpec,
    Method,
    StepContext,
    TrainArrays,
    TrainState,
    current_task_data,
    make_method,
    register_method,
    registered_methods,
)
from clax.training.model_fns import ModelFns
from clax.training.sharding import data_mesh
from clax.training.steps import StepFns, StepMetrics, correct_predictions, masked_cross_entropy

__all__ = [
    "Batch",
    "BoundaryContext",
    "DataSpec",
    "Method",
    "ModelFns",
    "NonFiniteLossError",
    "RunResult",
    "StepContext",
    "StepFns",
    "StepMetrics",
    "TrainArrays",
    "TrainState",
    "build_method",
    "build_model",
    "build_optimizer",
    "build_scenario",
    "correct_predictions",
    "current_task_data",
    "data_mesh",
    "default_config",
    "finetune",
    "joint",
    "make_method",
    "masked_cross_entropy",
    "register_method",
    "registered_methods",
    "train_continual",
    "union_of_seen_tasks",
]
import clax.methods  # noqa: F401, E402  (registers the weight-space methods)
