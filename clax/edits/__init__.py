"""Post-hoc parameter-space edits: weight averaging, LiNeS task-vector scaling, SSD."""

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
from clax.edits.ssd import SSDReport, SSDSearchResult, ssd_apply, ssd_dampen, ssd_search_alpha

__all__ = [
    "SSDReport",
    "SSDSearchResult",
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
    "ssd_apply",
    "ssd_dampen",
    "ssd_search_alpha",
    "weight_averaging",
]
