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
from clax.models import capture_layer_inputs, make_model
from clax.training import (
    Method,
    TrainState,
    default_config,
    make_method,
    register_method,
    registered_methods,
    train_continual,
)

__version__ = "0.1.0"

__all__ = [
    "Method",
    "Scenario",
    "Task",
    "TrainState",
    "capture_layer_inputs",
    "data",
    "default_config",
    "load_source",
    "make_method",
    "make_model",
    "make_scenario",
    "metrics",
    "models",
    "register_method",
    "registered_methods",
    "train_continual",
    "training",
]
