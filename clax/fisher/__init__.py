"""Diagonal Fisher information: estimators over a model and a dataset, and checks."""

from clax.fisher.estimators import (
    GRANULARITIES,
    LABELS,
    NORMALIZATIONS,
    check_fisher,
    diagonal_fisher,
    fisher_batch_update,
    fisher_group_update,
)

__all__ = [
    "GRANULARITIES",
    "LABELS",
    "NORMALIZATIONS",
    "check_fisher",
    "diagonal_fisher",
    "fisher_batch_update",
    "fisher_group_update",
]
