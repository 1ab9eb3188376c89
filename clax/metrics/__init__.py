"""Continual-learning metrics, run reports and plots (pure numpy + matplotlib, no jax).

* :mod:`clax.metrics.continual`: ACC, BWT, FWT, forgetting and average incremental accuracy of
  the accuracy matrix ``R[i, j]`` (accuracy on task ``j`` after training on task ``i``).
* :mod:`clax.metrics.report`: ``metrics.json`` / CSV run directories and markdown tables.
* :mod:`clax.metrics.stability`: continual-evaluation metrics of the stability gap (min-ACC,
  WC-ACC, windowed forgetting and plasticity) from per-iteration accuracy curves.
* :mod:`clax.metrics.unlearning`: forget/retain accuracies, a membership-inference attack and
  the gap to a retrained reference, shared by every unlearning experiment.
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
from clax.metrics.plots import (
    plot_accuracy_curves,
    plot_accuracy_matrix,
    plot_comparison,
    plot_curve_comparison,
)
from clax.metrics.report import (
    markdown_table,
    normalize_curves,
    read_run_curves,
    read_run_results,
    results_table,
    run_summary,
    stability_table,
    write_run_results,
)
from clax.metrics.stability import (
    EvaluationGrid,
    evaluation_grid,
    min_accuracy,
    stability_summary,
    tracking_metrics,
    windowed_forgetting,
    windowed_plasticity,
    worst_case_accuracy,
)
from clax.metrics.unlearning import (
    UnlearningSplit,
    membership_inference,
    reference_gap,
    unlearning_metrics,
)

__all__ = [
    "EvaluationGrid",
    "UnlearningSplit",
    "average_accuracy",
    "average_forgetting",
    "average_incremental_accuracy",
    "backward_transfer",
    "evaluation_grid",
    "forward_transfer",
    "markdown_table",
    "membership_inference",
    "min_accuracy",
    "normalize_curves",
    "plot_accuracy_curves",
    "plot_accuracy_matrix",
    "plot_comparison",
    "plot_curve_comparison",
    "pretrain_continual_summary",
    "read_run_curves",
    "read_run_results",
    "reference_gap",
    "results_table",
    "run_summary",
    "stability_summary",
    "stability_table",
    "summarize",
    "tracking_metrics",
    "unlearning_metrics",
    "validate_accuracy_matrix",
    "validate_baseline",
    "windowed_forgetting",
    "windowed_plasticity",
    "worst_case_accuracy",
    "write_run_results",
]
