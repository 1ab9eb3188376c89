"""Closed-form heads on frozen features: analytic learning/unlearning and prototype heads.

- `clax.analytic.rls`: ACIL / G-ACIL recursive least squares with exact ACU unlearning
  (``init``, ``learn``, ``unlearn``, ``fit``, ``predict``), optionally on a frozen random
  ReLU expansion (ACIL's buffer layer).
- `clax.analytic.prototypes`: mergeable streaming statistics and the heads read off them:
  nearest class mean (SimpleCIL), TEEN calibration, FSA's LDA head.

The registered methods built on them (``acil``, ``ncm``, ``lda``) are in
`clax.methods.analytic`.
"""

from clax.analytic import prototypes, rls
from clax.analytic.prototypes import (
    PrototypeStats,
    class_means,
    cosine_logits,
    init_stats,
    lda_head,
    lda_logits,
    merge_stats,
    ncm_logits,
    psum_stats,
    teen_calibrate,
    total_covariance,
    update_stats,
)
from clax.analytic.rls import RLSState, inverse_is_consistent

__all__ = [
    "PrototypeStats",
    "RLSState",
    "class_means",
    "cosine_logits",
    "init_stats",
    "inverse_is_consistent",
    "lda_head",
    "lda_logits",
    "merge_stats",
    "ncm_logits",
    "prototypes",
    "psum_stats",
    "rls",
    "teen_calibrate",
    "total_covariance",
    "update_stats",
]
