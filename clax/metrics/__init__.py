"""Continual-learning metrics, run reports and plots (pure numpy + matplotlib, no jax).

* :mod:`clax.metrics.continual`: ACC, BWT, FWT, forgetting and average incremental accuracy of
  the accuracy matrix ``R[i, j]`` (accuracy on task ``j`` after training on task ``i``), or of
  a lower-is-better metric matrix (``higher_is_better=False``: losses).
* :mod:`clax.metrics.curves`: the curve-point format ``(step, train_task, eval_task, value)``.
* :mod:`clax.metrics.io`: atomic file writes.
* :mod:`clax.metrics.report`: ``metrics.json`` / CSV run directories and markdown tables.
* :mod:`clax.metrics.stability`: continual-evaluation metrics of the stability gap (min-ACC,
  WC-ACC, windowed forgetting and plasticity, the latter in the paper's and in the official
  code's definition) from per-iteration curves.
* :mod:`clax.metrics.unlearning`: forget/retain accuracies, a membership-inference attack and
  the gap to a retrained reference, shared by every unlearning experiment.
* :mod:`clax.metrics.plots`: PNG heatmaps, accuracy curves and comparison bar charts (Agg canvas,
  never pyplot; matplotlib is imported on the first plot).

Layering, bottom up, with no import cycle: ``curves``, ``io``, ``continual`` (nothing from the
package), ``unlearning``; ``stability`` (continual, curves); ``plots`` (continual, curves, io);
``report`` (all of them). No metrics module imports jax, orbax or (at import time) matplotlib.
The rule for lower-is-better metrics is in :mod:`clax.metrics.continual`.
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
    validate_metric_matrix,
)
from clax.metrics.curves import normalize_curves
from clax.metrics.plots import (
    plot_accuracy_curves,
    plot_accuracy_matrix,
    plot_comparison,
    plot_curve_comparison,
)
from clax.metrics.report import (
    markdown_table,
    metric_files,
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
    "metric_files",
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
    "validate_metric_matrix",
    "windowed_forgetting",
    "windowed_plasticity",
    "worst_case_accuracy",
    "write_run_results",
]
