"""The contract every other layer of clax builds on.

`Batch` / `TrainArrays` / `DataSpec` (examples), `TrainState`, the objectives
(`Classification`, `LanguageModeling`), the functional model wrapper `ModelFns`, the
`Method` contract with its contexts, the method registry, and the `Unlearner` contract
with its registry. Imports only the leaf
libraries (`clax.data`, `clax.models`) and no building block, method or driver.
"""

from clax.core.batch import Batch, DataSpec, TrainArrays, example_spec, num_examples, take
from clax.core.method import (
    BoundaryContext,
    Method,
    OptimizerFn,
    Replay,
    StepContext,
    StepOutputs,
    after,
    around,
    before,
    chain_around,
    current_task_data,
    plain,
)
from clax.core.model_fns import ModelFns
from clax.core.objective import (
    Classification,
    LanguageModeling,
    MetricSpec,
    Objective,
    check_objective,
    correct_predictions,
    masked_cross_entropy,
    primary_metric,
)
from clax.core.registry import (
    make_method,
    method_hyperparameters,
    register_method,
    registered_methods,
)
from clax.core.state import TrainState
from clax.core.unlearning import (
    UnlearnContext,
    Unlearner,
    UnlearnStepContext,
    make_unlearner,
    register_unlearner,
    registered_unlearners,
    unlearner_hyperparameters,
)

__all__ = [
    "Batch",
    "BoundaryContext",
    "Classification",
    "DataSpec",
    "LanguageModeling",
    "Method",
    "MetricSpec",
    "ModelFns",
    "Objective",
    "OptimizerFn",
    "Replay",
    "StepContext",
    "StepOutputs",
    "TrainArrays",
    "TrainState",
    "UnlearnContext",
    "UnlearnStepContext",
    "Unlearner",
    "after",
    "around",
    "before",
    "chain_around",
    "check_objective",
    "correct_predictions",
    "current_task_data",
    "example_spec",
    "make_method",
    "make_unlearner",
    "masked_cross_entropy",
    "method_hyperparameters",
    "num_examples",
    "plain",
    "primary_metric",
    "register_method",
    "register_unlearner",
    "registered_methods",
    "registered_unlearners",
    "take",
    "unlearner_hyperparameters",
]
