"""Continual-learning metrics, run reports and plots (pure numpy + matplotlib, no jax).

* :mod:`clax.metrics.continual`: ACC, BWT, FWT, forgetting and average incremental accuracy of
  the accuracy matrix ``R[i, j]`` (accuracy on task ``j`` after training on task ``i``).
* :mod:`clax.metrics.report`: ``metrics.json`` / CSV run directories and markdown tables.
* :mod:`clax.metrics.plots`: PNG heatmaps, accuracy curves and comparison bar charts (Agg canvas,
  never pyplot; matplotlib is imported on the first plot).
"""

from clax.metrics.continual import (
    average_accuracy,
    average_forgetting,
    average_incremental_accuracy,
    backward_transfer,
    forward_transfer,
    pretrain_continual_summary,
    summarize,
    validate_accuracy_matrix,
    validate_baseline,
)
from clax.metrics.plots import plot_accuracy_curves, plot_accuracy_matrix, plot_comparison
from clax.metrics.report import (
    markdown_table,
    normalize_curves,
    read_run_results,
    results_table,
    write_run_results,
)

__all__ = [
    "average_accuracy",
    "average_forgetting",
    "average_incremental_accuracy",
    "backward_transfer",
    "forward_transfer",
    "markdown_table",
    "normalize_curves",
    "plot_accuracy_curves",
    "plot_accuracy_matrix",
    "plot_comparison",
    "pretrain_continual_summary",
    "read_run_results",
    "results_table",
    "summarize",
    "validate_accuracy_matrix",
    "validate_baseline",
    "write_run_results",
]
