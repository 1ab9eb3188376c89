"""Optax wrappers that track extra parameter copies during training (EMA balancing)."""

from clax.transforms.agem import AGEMState, agem, agem_project
from clax.transforms.coso import (
    CoSOState,
    coso,
    coso_bases,
    coso_mask,
    coso_task_end,
    merge_sketch,
    reset_coso_state,
)
from clax.transforms.disentangle import (
    GeometricUnlearningState,
    geometric_disentanglement,
    geometric_unlearning_adam,
)
from clax.transforms.ema import EMABalancingState, ema_balancing, ema_params, find_state
from clax.transforms.ewc import (
    EWCMemory,
    consolidate_ewc,
    ewc_penalty,
    ewc_penalty_value,
    init_ewc_memory,
    l2_penalty,
)
from clax.transforms.projection import one_dimensional, subspace_projection

__all__ = [
    "AGEMState",
    "CoSOState",
    "EMABalancingState",
    "EWCMemory",
    "GeometricUnlearningState",
    "agem",
    "agem_project",
    "consolidate_ewc",
    "coso",
    "coso_bases",
    "coso_mask",
    "coso_task_end",
    "ema_balancing",
    "ema_params",
    "ewc_penalty",
    "ewc_penalty_value",
    "find_state",
    "geometric_disentanglement",
    "geometric_unlearning_adam",
    "init_ewc_memory",
    "l2_penalty",
    "merge_sketch",
    "one_dimensional",
    "reset_coso_state",
    "subspace_projection",
]
