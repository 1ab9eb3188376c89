"""Continual-learning methods registered with the `Method` contract.

Importing this package registers them (``clax`` imports it), so
``clax.training.default_config()`` lists their hyperparameters under ``config.method``;
it also registers the unlearners of `clax.methods.unlearning` (the `Unlearner` contract).
"""

# Importing the modules registers their methods. Factories named like their module (gpm,
# coso, ewc) are not re-exported here: they would hide the module (`clax.methods.gpm`);
# build them with `clax.make_method(name, ...)` or import them from the module.
from clax.methods import analytic, baselines, coso, ewc, gpm, replay, weight_space  # noqa: F401
# Unlearners (ga, npo, ssd, acu): build them with `clax.core.make_unlearner(name, ...)`.
from clax.methods import unlearning  # noqa: F401
from clax.methods.analytic import acil, lda, ncm
from clax.methods.baselines import finetune, joint, union_of_seen_tasks
from clax.methods.ewc import l2, online_ewc
from clax.methods.gpm import gpm_consolidate, gpm_memory
from clax.methods.replay import agem, derpp, er, replay_reptile
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
    "acil",
    "adaptive_ema",
    "agem",
    "align_classifier",
    "class_statistics",
    "derpp",
    "ema",
    "er",
    "finetune",
    "gpm_consolidate",
    "gpm_memory",
    "joint",
    "l2",
    "lda",
    "lines",
    "ncm",
    "online_ewc",
    "replay_reptile",
    "slow_learner",
    "swap_in",
    "union_of_seen_tasks",
    "weight_averaging",
]
