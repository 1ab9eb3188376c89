"""Post-hoc parameter-space edits: weight averaging and LiNeS task-vector scaling."""

from clax.edits.averaging import (
    WeightAveragingState,
    average,
    averaged_params,
    interpolate,
    running_average_update,
    weight_averaging,
)
from clax.edits.lines import (
    lines_coefficients,
    lines_merge,
    lines_scale,
    merge_alpha,
    scale_task_vector,
)

__all__ = [
    "WeightAveragingState",
    "average",
    "averaged_params",
    "interpolate",
    "lines_coefficients",
    "lines_merge",
    "lines_scale",
    "merge_alpha",
    "running_average_update",
    "scale_task_vector",
    "weight_averaging",
]
