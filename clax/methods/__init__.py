"""Continual-learning methods registered with the `Method` contract.

Importing this package registers them (``clax`` imports it), so
``clax.training.default_config()`` lists their hyperparameters under ``config.method``.
"""

from clax.methods import weight_space  # noqa: F401  (registers the methods)
from clax.methods.weight_space import (
    adaptive_ema,
    align_classifier,
    class_statistics,
    ema,
    lines,
    slow_learner,
    swap_in,
    weight_averaging,
)

__all__ = [
    "adaptive_ema",
    "align_classifier",
    "class_statistics",
    "ema",
    "lines",
    "slow_learner",
    "swap_in",
    "weight_averaging",
]
