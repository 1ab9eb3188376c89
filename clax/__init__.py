"""clax: continual learning and machine unlearning for JAX / Flax NNX.

Methods are optax gradient transformations that compose with ``optax.chain`` around any
optimizer and any Flax model. Subpackages:

- `clax.data`: data sources (digits, IDX files, tfds) and continual scenarios.
- `clax.models`: NNX models (MLP, CNN, reduced ResNet-18, tiny ViT) and layer-input capture.
- `clax.training`: the `Method` contract, jitted steps, the continual task loop.
- `clax.metrics`: accuracy-matrix metrics (ACC, BWT, FWT, forgetting), reports, plots.
"""

from clax import data, metrics, models, training
from clax.data import Scenario, Task, load_source, make_scenario
from clax.edits import (
    average,
    averaged_params,
    interpolate,
    lines_merge,
    lines_scale,
    weight_averaging,
)
from clax.methods import adaptive_ema, ema, lines, slow_learner
from clax.methods import weight_averaging as weight_averaging_method
from clax.models import capture_layer_inputs, make_model
from clax.params import block_depths, head_backbone_labels, label_params
from clax.training import (
    Method,
    TrainState,
    default_config,
    make_method,
    register_method,
    registered_methods,
    train_continual,
)
from clax.transforms import ema_balancing, ema_params

__version__ = "0.1.0"

__all__ = [
    "Method",
    "Scenario",
    "Task",
    "TrainState",
    "adaptive_ema",
    "average",
    "averaged_params",
    "block_depths",
    "capture_layer_inputs",
    "data",
    "default_config",
    "ema",
    "ema_balancing",
    "ema_params",
    "head_backbone_labels",
    "interpolate",
    "label_params",
    "lines",
    "lines_merge",
    "lines_scale",
    "load_source",
    "make_method",
    "make_model",
    "make_scenario",
    "metrics",
    "models",
    "register_method",
    "registered_methods",
    "slow_learner",
    "train_continual",
    "training",
    "weight_averaging",
    "weight_averaging_method",
]
