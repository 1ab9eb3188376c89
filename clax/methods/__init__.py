"""Continual-learning methods registered with the `Method` contract.

Importing this package registers them (``clax`` imports it), so
``clax.training.default_config()`` lists their hyperparameters under ``config.method``;
it also registers the unlearners of `clax.methods.unlearning` (the `Unlearner` contract).
"""

# Importing the modules registers their methods, and the unlearners (ga, npo, ssd, acu:
# build them with `clax.core.make_unlearner(name, ...)`). Factories named like their module
# (gpm, coso, ewc) are not re-exported here: they would hide the module (`clax.methods.gpm`);
# build them with `clax.make_method(name, ...)` or import them from the module. The
# `*_update_memory` functions are each method's task-end consolidation as a plain function,
# for a user's own loop (nnx.Optimizer); the methods' consolidate hooks call them.
from clax.methods import (  # noqa: F401
    analytic,
    baselines,
    coso,
    ewc,
    gpm,
    replay,
    unlearning,
    weight_space,
)
from clax.methods.analytic import acil, lda, ncm
from clax.methods.baselines import finetune, joint, union_of_seen_tasks
from clax.methods.coso import coso_update_memory
from clax.methods.ewc import ewc_update_memory, l2, l2_update_memory, online_ewc
from clax.methods.gpm import gpm_consolidate, gpm_memory, gpm_update_memory
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
    "coso_update_memory",
    "derpp",
    "ema",
    "er",
    "ewc_update_memory",
    "finetune",
    "gpm_consolidate",
    "gpm_memory",
    "gpm_update_memory",
    "joint",
    "l2",
    "l2_update_memory",
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
