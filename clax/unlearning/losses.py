"""Forget losses for gradient-based unlearning of a classifier: gradient ascent and NPO.

All losses take logits ``(B, C)`` and integer labels ``(B,)`` and return a scalar to
*minimise*; ``weights`` (``(B,)``, optional) weighs examples (e.g. 0 for padding), and
the mean is over the weighted examples. ``log π(y|x)`` is the log-softmax of the logits
at the label.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from clax._validation import check_real

__all__ = ["gradient_ascent_loss", "log_likelihood", "npo_loss", "retain_loss"]


def _check(logits: jax.Array, labels: jax.Array, name: str = "logits") -> None:
    if jnp.ndim(logits) != 2:
        raise ValueError(f"{name} must have shape (B, C), got {jnp.shape(logits)}")
    if jnp.shape(labels) != (jnp.shape(logits)[0],):
        raise ValueError(
            f"labels must have shape ({jnp.shape(logits)[0]},) to match {name} "
            f"{jnp.shape(logits)}, got {jnp.shape(labels)}"
        )


def _mean(values: jax.Array, weights: jax.Array | None) -> jax.Array:
    if weights is None:
        return jnp.mean(values)
    if jnp.shape(weights) != jnp.shape(values):
        raise ValueError(f"weights must have shape {jnp.shape(values)}, got {jnp.shape(weights)}")
    weights = weights.astype(values.dtype)
    return jnp.sum(weights * values) / jnp.maximum(jnp.sum(weights), 1e-12)


def log_likelihood(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """``log π(y_b | x_b)`` for each example: shape (B,), float32."""
    _check(logits, labels)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]


def retain_loss(logits: jax.Array, labels: jax.Array, *, weights: jax.Array | None = None
                ) -> jax.Array:
    """Cross-entropy (mean NLL) ``E[−log π(y|x)]``, the usual retain objective."""
    return -_mean(log_likelihood(logits, labels), weights)


def gradient_ascent_loss(logits: jax.Array, labels: jax.Array, *,
                         weights: jax.Array | None = None) -> jax.Array:
    """Gradient ascent (GA) on the forget set: ``L_GA = E[log π(y|x)] = −NLL``.

    Minimising it raises the forget set's cross-entropy without bound (GA is unbounded
    below, hence the usual early stopping or a retain term).
    """
    return _mean(log_likelihood(logits, labels), weights)


def npo_loss(logits: jax.Array, ref_logits: jax.Array, labels: jax.Array, *,
             beta: float = 0.1, weights: jax.Array | None = None) -> jax.Array:
    r"""Negative Preference Optimization (Zhang, Lin, Bai, Mei, COLM 2024).

    .. math::

       L_{NPO} = \frac{2}{β}\, E\Big[\log\Big(1 + \big(\tfrac{π_θ(y|x)}{π_{ref}(y|x)}\big)^{β}
       \Big)\Big] = \frac{2}{β}\, E\big[\mathrm{softplus}\big(β(\log π_θ - \log π_{ref})\big)
       \big]

    with ``π_ref`` the frozen model before unlearning (pass its logits on the same batch;
    no gradient flows into them). Its gradient is GA's weighted by
    ``2σ(β·log-ratio) ∈ (0, 2)``, which fades once an example is forgotten (``π_θ ≪
    π_ref``), so NPO diverges much more slowly than GA; as ``β → 0`` it tends to GA
    (plus a constant ``2 log 2 / β``). Written with ``softplus`` as in open-unlearning's
    ``-logsigmoid(β·(NLL_θ − NLL_ref))·2/β``, stable for any log-ratio.

    Args:
        logits: (B, C) logits of the model being unlearned.
        ref_logits: (B, C) logits of the reference model (treated as constants).
        labels: (B,) int labels.
        beta: Inverse temperature ``β > 0`` (open-unlearning's default 0.1).
        weights: Optional (B,) example weights.

    Returns:
        The scalar loss.

    Raises:
        TypeError: ``beta`` is not a number.
        ValueError: ``beta`` is not finite and ``> 0``, or the shapes do not match.
    """
    _check(logits, labels)
    _check(ref_logits, labels, "ref_logits")
    beta = check_real("beta", beta, 0.0, math.inf, low_open=True, high_open=True)
    log_ratio = log_likelihood(logits, labels) - jax.lax.stop_gradient(
        log_likelihood(ref_logits, labels))
    return (2.0 / beta) * _mean(jax.nn.softplus(beta * log_ratio), weights)
