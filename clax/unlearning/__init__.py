"""Machine unlearning: forget losses (gradient ascent, NPO) for gradient-based unlearning.

The update rules live with the other transforms
(:func:`clax.transforms.disentangle.geometric_disentanglement`); metrics in
:mod:`clax.metrics.unlearning`.
"""

from clax.unlearning.losses import (
    gradient_ascent_loss,
    log_likelihood,
    npo_loss,
    retain_loss,
)

__all__ = ["gradient_ascent_loss", "log_likelihood", "npo_loss", "retain_loss"]
