"""Prototype heads on frozen features: nearest class mean (SimpleCIL), TEEN, FSA's LDA.

All three heads are functions of the same exact streaming sufficient statistics
(:class:`PrototypeStats`): per-class example counts and feature sums, and the uncentred
second moment ``Σ x xᵀ`` of all examples. Updating is a sum, so statistics computed on any
split of the data (batches in any order, shards on different devices) combine exactly by
:func:`merge_stats` (associative and commutative), or by :func:`psum_stats` inside
``shard_map``/``pmap``. The heads are then read off the merged statistics:

* :func:`ncm_logits`: nearest class mean by cosine similarity (SimpleCIL: the classifier
  of class ``c`` is the mean of its un-normalised embeddings, scored ``cos(x, μ_c)``).
* :func:`teen_calibrate`: TEEN's training-free calibration of new-class prototypes
  towards the base-class prototypes they resemble.
* :func:`lda_head` / :func:`lda_logits`: FSA's LDA head with the *total* covariance of all
  seen features (not the pooled within-class one) plus a shrinkage ridge.

Classes with no examples get the logit ``-1e9`` (they cannot be predicted).

References:
  Zhou et al., "Revisiting Class-Incremental Learning with Pre-Trained Models:
  Generalizability and Adaptivity are All You Need", IJCV 2024,
  https://arxiv.org/abs/2303.07338 (code ``zhoudw-zdw/RevisitingCIL``, ``simplecil.py``).
  Wang et al., "Few-shot Class-incremental Learning via Training-free Prototype
  Calibration" (TEEN), NeurIPS 2023, https://arxiv.org/abs/2312.05229 (code
  ``wangkiw/TEEN``, ``Network.soft_calibration``).
  Panos et al., "First Session Adaptation: A Strong Replay-Free Baseline for
  Class-Incremental Learning" (FSA), ICCV 2023, https://arxiv.org/abs/2303.13199 (code
  ``aresPanos/fsa``, ``compute_lda_head``).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import numpy as np

from clax._validation import check_positive_int, check_real

__all__ = [
    "PrototypeStats",
    "class_means",
    "cosine_logits",
    "init_stats",
    "lda_head",
    "lda_logits",
    "merge_stats",
    "ncm_logits",
    "psum_stats",
    "teen_calibrate",
    "total_covariance",
    "update_stats",
]

UNSEEN_LOGIT = -1e9
# TEEN's defaults (``wangkiw/TEEN`` scripts): softmax temperature and shift weight.
TEEN_TAU = 16.0
TEEN_ALPHA = 0.5
# FSA's shrinkage added to the total covariance (``compute_lda_head``: ``+ 1.0 * I``).
LDA_SHRINKAGE = 1.0
_mm = functools.partial(jnp.matmul, precision=jax.lax.Precision.HIGHEST)
_EPS = 1e-12


class PrototypeStats(NamedTuple):
    """Exact streaming sufficient statistics of labelled features (mergeable by sums)."""

    counts: jax.Array  # (C,) int32: examples of each class
    sums: jax.Array  # (C, D) float: per-class feature sums
    second_moment: jax.Array  # (D, D) float: Σ x xᵀ over all examples (uncentred)


def init_stats(num_classes: int, dim: int, *, dtype=jnp.float32) -> PrototypeStats:
    """Empty statistics for ``num_classes`` classes of ``dim``-dimensional features.

    Raises:
      TypeError: on a size that is not an int.
      ValueError: on a size ``< 1`` or a non-floating dtype.
    """
    num_classes = check_positive_int("num_classes", num_classes)
    dim = check_positive_int("dim", dim)
    if not jnp.issubdtype(jnp.dtype(dtype), jnp.floating):
        raise ValueError(f"dtype must be a floating type, got {jnp.dtype(dtype)}")
    return PrototypeStats(
        counts=jnp.zeros((num_classes,), jnp.int32),
        sums=jnp.zeros((num_classes, dim), dtype),
        second_moment=jnp.zeros((dim, dim), dtype),
    )


def update_stats(stats: PrototypeStats, features: jax.Array, labels: jax.Array, *,
                 mask: jax.Array | None = None) -> PrototypeStats:
    """Adds a batch of labelled features (jit-able; fixed shapes).

    Args:
      stats: the statistics so far.
      features: ``(n, D)``.
      labels: ``(n,)`` int class ids in ``[0, C)``.
      mask: optional ``(n,)`` bool; False rows (padding) are ignored.

    Returns:
      ``stats`` plus this batch.

    Raises:
      ValueError: on a feature dimension other than ``D``, mismatched shapes, or (for
        concrete inputs) a label outside ``[0, C)``; under jit such rows are ignored.
    """
    num_classes, dim = stats.sums.shape
    features = jnp.asarray(features)
    labels = jnp.asarray(labels)
    if features.ndim != 2 or features.shape[1] != dim:
        raise ValueError(f"features must have shape (n, {dim}) (the statistics' feature "
                         f"dimension), got {tuple(features.shape)}")
    n = features.shape[0]
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape ({n},), got {tuple(labels.shape)}")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(f"labels must be integer class ids, got dtype {labels.dtype}")
    if mask is not None and jnp.shape(mask) != (n,):
        raise ValueError(f"mask must have shape ({n},), got {tuple(jnp.shape(mask))}")
    if not isinstance(labels, jax.core.Tracer) and not isinstance(mask, jax.core.Tracer):
        used = np.asarray(labels) if mask is None else np.asarray(labels)[np.asarray(mask, bool)]
        bad = used[(used < 0) | (used >= num_classes)]
        if bad.size:
            raise ValueError(f"labels must be class ids in [0, {num_classes}), got "
                             f"{int(bad[0])}; use `mask` to mark padding rows")
    return _update_stats(stats, features, labels, mask)


@jax.jit
def _update_stats(stats: PrototypeStats, features, labels, mask) -> PrototypeStats:
    num_classes = stats.sums.shape[0]
    valid = (labels >= 0) & (labels < num_classes)
    if mask is not None:
        valid = valid & jnp.asarray(mask, bool)
    x = jnp.where(valid[:, None], features.astype(stats.sums.dtype), 0)
    onehot = jax.nn.one_hot(labels, num_classes, dtype=x.dtype) * valid[:, None]
    return PrototypeStats(
        counts=stats.counts + jnp.sum(onehot, 0).astype(jnp.int32),
        sums=stats.sums + _mm(onehot.T, x),
        second_moment=stats.second_moment + _mm(x.T, x),
    )


def merge_stats(a: PrototypeStats, b: PrototypeStats) -> PrototypeStats:
    """The statistics of the union of two disjoint data sets (a sum: associative)."""
    return jax.tree.map(jnp.add, a, b)


def psum_stats(stats: PrototypeStats, axis_name) -> PrototypeStats:
    """:func:`merge_stats` over a mapped axis (inside ``shard_map`` / ``pmap``)."""
    return jax.lax.psum(stats, axis_name)


def class_means(stats: PrototypeStats) -> jax.Array:
    """``(C, D)`` class means (rows of classes without examples are 0)."""
    n = jnp.maximum(stats.counts, 1).astype(stats.sums.dtype)
    return stats.sums / n[:, None]


def _normalize(x: jax.Array) -> jax.Array:
    # F.normalize: x / max(‖x‖, eps)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), _EPS)


def cosine_logits(prototypes: jax.Array, seen: jax.Array, features: jax.Array, *,
                  scale: float = 1.0) -> jax.Array:
    """``scale · cos(x, p_c)`` for each class, ``-1e9`` where ``seen`` is False.

    Args:
      prototypes: ``(C, D)``.
      seen: ``(C,)`` bool.
      features: ``(n, D)``.
      scale: SimpleCIL's ``σ`` (initialised to 1 and never trained).

    Returns:
      ``(n, C)`` logits.
    """
    logits = scale * _mm(_normalize(features.astype(prototypes.dtype)),
                         _normalize(prototypes).T)
    return jnp.where(seen, logits, UNSEEN_LOGIT)


@jax.jit
def ncm_logits(stats: PrototypeStats, features: jax.Array) -> jax.Array:
    """SimpleCIL / nearest class mean: cosine similarity to each class mean, ``(n, C)``."""
    return cosine_logits(class_means(stats), stats.counts > 0, features)


def teen_calibrate(prototypes: jax.Array, base: jax.Array, new: jax.Array, *,
                   alpha: float = TEEN_ALPHA, tau: float = TEEN_TAU) -> jax.Array:
    """TEEN's training-free calibration of new-class prototypes.

    For each new class ``n`` (``new[n]``), with ``p̂ = p/‖p‖``:

    .. math::

       w = \\operatorname{softmax}_b(\\tau\\, \\hat p_n \\cdot \\hat p_b), \\quad
       \\Delta = \\frac{\\sum_b w_b \\hat p_b}{\\lVert \\sum_b w_b \\hat p_b \\rVert}, \\quad
       p_n \\leftarrow (1 - \\alpha)\\, \\hat p_n + \\alpha\\, \\Delta

    over the base classes ``b`` (``base[b]``). The result is not re-normalised (TEEN's
    classifier is cosine, so only its direction matters). Other rows are returned as is.

    Args:
      prototypes: ``(C, D)`` class prototypes (means).
      base: ``(C,)`` bool, the base-session classes (at least one, when any ``new``).
      new: ``(C,)`` bool, the classes to calibrate (disjoint from ``base``).
      alpha: shift weight ``α`` in ``[0, 1]`` (TEEN: 0.5 default / miniImageNet and CUB,
        0.1 for CIFAR-100); ``0`` leaves new prototypes unchanged in direction.
      tau: softmax temperature ``τ > 0`` (TEEN: 16).

    Returns:
      ``(C, D)`` prototypes with new rows calibrated.
    """
    alpha = check_real("alpha", alpha, 0.0, 1.0, low_open=False, high_open=False)
    tau = check_real("tau", tau, 0.0, math.inf, low_open=True, high_open=True)
    return _teen(prototypes, jnp.asarray(base, bool), jnp.asarray(new, bool),
                 alpha=alpha, tau=tau)


@functools.partial(jax.jit, static_argnames=("alpha", "tau"))
def _teen(prototypes, base, new, *, alpha: float, tau: float) -> jax.Array:
    unit = _normalize(prototypes)
    sim = tau * _mm(unit, unit.T)  # (new n, base b)
    weights = jax.nn.softmax(jnp.where(base[None, :], sim, -jnp.inf), axis=-1)
    weights = jnp.where(base[None, :], weights, 0.0)  # no NaN rows without base classes
    delta = _normalize(_mm(weights, unit))
    calibrated = (1.0 - alpha) * unit + alpha * delta
    return jnp.where(new[:, None], calibrated, prototypes)


@jax.jit
def total_covariance(stats: PrototypeStats) -> jax.Array:
    """Unbiased covariance ``(D, D)`` of all examples (all classes pooled, global mean).

    ``(Σ xxᵀ − N μ μᵀ)/(N − 1)`` with ``μ`` the mean of all ``N`` examples, as
    ``torch.cov`` of the stacked features; 0 when ``N < 2``. Computed from raw moments:
    in float32, features whose mean is large against their spread lose precision to
    cancellation (use float64 statistics there).
    """
    n = jnp.sum(stats.counts).astype(stats.sums.dtype)
    total = jnp.sum(stats.sums, axis=0)
    mean = total / jnp.maximum(n, 1)
    scatter = stats.second_moment - n * jnp.outer(mean, mean)
    return jnp.where(n > 1, scatter / jnp.maximum(n - 1, 1), 0.0)


def lda_head(stats: PrototypeStats, *, shrinkage: float = LDA_SHRINKAGE
             ) -> tuple[jax.Array, jax.Array]:
    """FSA's LDA head: ``W = Σ⁻¹ M`` and ``b_c = μ_cᵀ Σ⁻¹ μ_c`` (equal priors).

    ``Σ = total_covariance + shrinkage · I`` (FSA: the unbiased covariance of all seen
    features plus ``1.0 · I``), solved by Cholesky; logits are ``xᵀW − b/2``
    (:func:`lda_logits`).

    Returns:
      ``(W (D, C), b (C,))``; columns of unseen classes are 0 (their logits are masked).
    """
    shrinkage = check_real("shrinkage", shrinkage, 0.0, math.inf, low_open=True,
                           high_open=True)
    return _lda_head(stats, shrinkage=shrinkage)


@functools.partial(jax.jit, static_argnames=("shrinkage",))
def _lda_head(stats: PrototypeStats, *, shrinkage: float) -> tuple[jax.Array, jax.Array]:
    means = class_means(stats)  # (C, D)
    dim = means.shape[1]
    sigma = total_covariance(stats) + shrinkage * jnp.eye(dim, dtype=means.dtype)
    chol = jnp.linalg.cholesky(sigma)
    w = jsl.cho_solve((chol, True), means.T)  # (D, C)
    b = jnp.sum(means.T * w, axis=0)
    return w, b


def lda_logits(stats: PrototypeStats, features: jax.Array, *,
               shrinkage: float = LDA_SHRINKAGE) -> jax.Array:
    """``xᵀ Σ⁻¹ μ_c − ½ μ_cᵀ Σ⁻¹ μ_c`` for each seen class, ``(n, C)``."""
    w, b = lda_head(stats, shrinkage=shrinkage)
    logits = _mm(features.astype(w.dtype), w) - 0.5 * b
    return jnp.where(stats.counts > 0, logits, UNSEEN_LOGIT)
