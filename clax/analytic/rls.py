"""Analytic (closed-form) continual learning and unlearning: ACIL, G-ACIL and ACU.

A linear classifier on frozen features is kept as the exact ridge-regression solution on
all the data it has learned, updated one batch at a time by recursive least squares (the
Woodbury identity), with no gradients and no stored examples:

.. math::

   W = (X^\\top X + \\gamma I)^{-1} X^\\top Y, \\qquad R = (X^\\top X + \\gamma I)^{-1}.

Learning a batch ``(X_b, Y_b)`` (ACIL, Eqs. 9-10) and unlearning one (ACU, the same
identity with the sign flipped) are

.. math::

   \\begin{align*}
   K &= R X_b^\\top (I \\pm X_b R X_b^\\top)^{-1} \\\\
   W &\\leftarrow W \\pm K (Y_b - X_b W) \\\\
   R &\\leftarrow R \\mp K X_b R
   \\end{align*}

(``K`` equals ``R_new X_bᵀ``, so this is ACIL's ``W ← W + R X_bᵀ(Y_b − X_b W)`` with the
updated ``R``; the ``n × n`` system is solved by Cholesky, and taking ``K`` from the old
``R`` avoids the cancellation in ``R_new`` for the weights),

so after any sequence of :func:`learn` and :func:`unlearn` calls the weights equal ridge
regression refit on the data that remains (the tests check it to 1e-5 in float32 and 1e-9
in float64 on well-conditioned problems; in float32, ``R`` shrinks from ``I/γ`` by the
factor ``λ_max(XᵀX)/γ`` through subtractions, so a small ``γ`` against large features
loses digits: ACIL computes in float64). The same update serves G-ACIL's generalized
setting, where one batch mixes old and new classes and classes recur: the label matrix
has a fixed number of columns (the capacity ``C``), a class's column stays exactly zero
until it has examples, and ``class_counts`` says which classes are present.

Optionally the features first pass through ACIL's frozen random "buffer" layer,
``ReLU(x · P)`` with ``P ~ U(±1/√d_in)`` (PyTorch's default ``nn.Linear`` init, which
ACIL uses), stored in the state so learning, unlearning and prediction always agree.

Every function is pure and jit-able over a :class:`RLSState`. Called on concrete arrays
(not under ``jax.jit``), :func:`unlearn` also checks that the request can be a subset of
what was learned; see its docstring for what can and cannot be detected.

References:
  Zhuang et al., "ACIL: Analytic Class-Incremental Learning with Absolute Memorization and
  Privacy Protection", NeurIPS 2022, https://arxiv.org/abs/2205.14922 (code
  ``ZHUANGHP/Analytic-continual-learning``, ``RecursiveLinear.fit``).
  Zhuang et al., "G-ACIL: Analytic Learning for Exemplar-Free Generalized Class
  Incremental Learning", https://arxiv.org/abs/2403.15706.
  Tang et al., "Analytic Continual Unlearning", https://arxiv.org/abs/2505.12239.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import numpy as np

from clax._validation import check_int, check_positive_int, check_real

__all__ = [
    "RLSState",
    "embed",
    "fit",
    "init",
    "inverse_is_consistent",
    "learn",
    "predict",
    "unlearn",
]

# Logits of classes without examples (finite, like the training loop's masked logits).
UNSEEN_LOGIT = -1e9
# Gradient-free closed forms in low precision are useless: every product is exact-f32/f64
# (on GPU/TPU the default matmul precision would otherwise round inputs to bf16/tf32).
_HIGHEST = jax.lax.Precision.HIGHEST
_mm = functools.partial(jnp.matmul, precision=_HIGHEST)


class RLSState(NamedTuple):
    """A ridge-regression classifier kept by recursive least squares.

    ``d`` is the dimension the regression sees: ``buffer_size`` with a random buffer
    layer, else the input feature dimension.
    """

    weights: jax.Array  # (d, C) float: W = R XᵀY (features x classes, ACIL's layout)
    inverse: jax.Array  # (d, d) float: R = (XᵀX + γI)⁻¹, symmetric positive-definite
    class_counts: jax.Array  # (C,) int32: examples of each class currently learned
    num_examples: jax.Array  # () int32: examples currently learned
    gamma: jax.Array  # () float: the ridge regularisation γ
    projection: jax.Array | None  # (d_in, d) float: frozen buffer layer P, or None


# ----------------------------------------------------------------------------- helpers


def _batch(batch_size) -> int | None:
    return check_int("batch_size", batch_size, low=1, optional=True)


def _is_concrete(*arrays) -> bool:
    return not any(isinstance(a, jax.core.Tracer) for a in arrays if a is not None)


def _input_dim(state: RLSState) -> int:
    p = state.projection
    return int(state.inverse.shape[0] if p is None else p.shape[0])


def embed(state: RLSState, features: jax.Array) -> jax.Array:
    """The regression's inputs: ``ReLU(features · P)`` with a buffer layer, else features.

    Args:
      state: the classifier (gives ``P`` and the dtype).
      features: ``(n, d_in)``.

    Returns:
      ``(n, d)`` in the state's dtype.

    Raises:
      ValueError: if ``features`` is not 2-D with the state's input dimension.
    """
    features = jnp.asarray(features)
    d_in = _input_dim(state)
    if features.ndim != 2 or features.shape[1] != d_in:
        raise ValueError(
            f"features must have shape (n, {d_in}) (the feature dimension this classifier "
            f"was initialised with), got {tuple(features.shape)}"
        )
    x = features.astype(state.inverse.dtype)
    if state.projection is None:
        return x
    return jax.nn.relu(_mm(x, state.projection))


def _check_inputs(state: RLSState, features, labels, mask) -> None:
    """Shape/dtype checks (also under jit) and label-range checks (concrete inputs only)."""
    d_in = _input_dim(state)
    shape = tuple(jnp.shape(features))
    if len(shape) != 2 or shape[1] != d_in:
        raise ValueError(
            f"features must have shape (n, {d_in}) (the feature dimension this classifier "
            f"was initialised with), got {shape}"
        )
    n = shape[0]
    if jnp.shape(labels) != (n,):
        raise ValueError(f"labels must have shape ({n},) (one per feature row), "
                         f"got {tuple(jnp.shape(labels))}")
    if not jnp.issubdtype(jnp.result_type(labels), jnp.integer):
        raise TypeError(f"labels must be integer class ids, got dtype {jnp.result_type(labels)}")
    if mask is not None and jnp.shape(mask) != (n,):
        raise ValueError(f"mask must have shape ({n},), got {tuple(jnp.shape(mask))}")
    if _is_concrete(labels, mask):
        num_classes = state.weights.shape[1]
        used = np.asarray(labels) if mask is None else np.asarray(labels)[np.asarray(mask, bool)]
        bad = used[(used < 0) | (used >= num_classes)]
        if bad.size:
            raise ValueError(
                f"labels must be class ids in [0, {num_classes}) (the classifier's "
                f"capacity), got {int(bad[0])}; use `mask` to mark padding rows"
            )


def _prepare(state: RLSState, features, labels, mask):
    """Embedded inputs, one-hot targets and per-row validity, padding rows zeroed.

    Under jit, rows whose label is outside ``[0, C)`` cannot raise; they are ignored like
    masked rows (contribute nothing to R, W or the counts).
    """
    x = embed(state, features)
    labels = jnp.asarray(labels)
    num_classes = state.weights.shape[1]
    valid = (labels >= 0) & (labels < num_classes)
    if mask is not None:
        valid = valid & jnp.asarray(mask, bool)
    x = jnp.where(valid[:, None], x, 0)
    y = jax.nn.one_hot(labels, num_classes, dtype=x.dtype) * valid[:, None]
    return x, y, valid


def _rank_update(state: RLSState, x: jax.Array, y: jax.Array, valid: jax.Array,
                 sign: int) -> RLSState:
    """One update (sign +1: learn, -1: unlearn) of a batch of n rows.

    ``n <= d``: the Woodbury form, an ``n × n`` Cholesky solve (ACIL's update). ``n > d``:
    the same result in ``d``-space, ``R_new = (I ± R XᵀX)⁻¹ R`` and
    ``W_new = W ± R_new (XᵀY − XᵀX W)``, which costs ``O(n d² + d³)`` instead of
    ``O(n³ + n² d + n d²)``. Either way a downdate that is not positive-definite gives NaN.
    """
    r, w = state.inverse, state.weights
    n, d = x.shape
    if n <= d:
        a = _mm(x, r)  # X R, (n, d) (R is symmetric)
        s = jnp.eye(n, dtype=x.dtype) + sign * _mm(a, x.T)  # I ± X R Xᵀ, SPD if valid
        chol = jnp.linalg.cholesky(s)  # NaN when not positive-definite (impossible downdate)
        gain = jsl.cho_solve((chol, True), a).T  # K = R Xᵀ(I ± X R Xᵀ)⁻¹ = R_new Xᵀ (d, n)
        # W ± R_new Xᵀ (Y − X W), with R_new Xᵀ taken as the gain K: it is computed from the
        # old R, before the cancellation in R − K X R (float32 stays closer to ridge).
        w = w + sign * _mm(gain, y - _mm(x, w))
        r = r - sign * _mm(gain, a)
    else:
        g = _mm(x.T, x)
        r = jnp.linalg.solve(jnp.eye(d, dtype=x.dtype) + sign * _mm(r, g), r)
        if sign < 0:  # R_new = (R⁻¹ − XᵀX)⁻¹ must be positive-definite
            ok = jnp.all(jnp.isfinite(jnp.linalg.cholesky(0.5 * (r + r.T))))
            r = jnp.where(ok, r, jnp.nan)
        w = w + sign * _mm(r, _mm(x.T, y) - _mm(g, w))
    r = 0.5 * (r + r.T)  # keep R exactly symmetric against rounding drift
    counts = state.class_counts + sign * jnp.sum(y, axis=0).astype(jnp.int32)
    w = jnp.where(counts > 0, w, 0)  # a class with no examples has an exactly-zero column
    num = state.num_examples + sign * jnp.sum(valid).astype(jnp.int32)
    return state._replace(weights=w, inverse=r, class_counts=counts, num_examples=num)


def _batched(update, state: RLSState, x, y, valid, batch_size: int | None) -> RLSState:
    """Applies `update` to consecutive chunks of `batch_size` rows (one scan)."""
    n = x.shape[0]
    if batch_size is None or n <= batch_size:
        return update(state, x, y, valid)
    chunks = -(-n // batch_size)
    pad = chunks * batch_size - n

    def split(a):
        a = jnp.concatenate([a, jnp.zeros((pad, *a.shape[1:]), a.dtype)])
        return a.reshape(chunks, batch_size, *a.shape[1:])

    def body(s, chunk):
        return update(s, *chunk), None

    state, _ = jax.lax.scan(body, state, (split(x), split(y), split(valid)))
    return state


@functools.partial(jax.jit, static_argnames=("sign", "batch_size"))
def _update(state: RLSState, features, labels, mask, *, sign: int,
            batch_size: int | None) -> RLSState:
    x, y, valid = _prepare(state, features, labels, mask)
    return _batched(functools.partial(_rank_update, sign=sign), state, x, y, valid, batch_size)


@functools.partial(jax.jit, static_argnames=("chunk_size",))
def _fit(state: RLSState, features, labels, mask, *, chunk_size: int) -> RLSState:
    n = features.shape[0]
    valid_in = jnp.ones((n,), bool) if mask is None else jnp.asarray(mask, bool)
    chunks = max(1, -(-n // chunk_size))
    pad = chunks * chunk_size - n

    def split(a):
        a = jnp.concatenate([a, jnp.zeros((pad, *a.shape[1:]), a.dtype)])
        return a.reshape(chunks, chunk_size, *a.shape[1:])

    d, num_classes = state.weights.shape
    dtype = state.inverse.dtype

    def body(carry, chunk):
        x, y, valid = _prepare(state, *chunk)
        g, xy, counts, num = carry
        return (g + _mm(x.T, x), xy + _mm(x.T, y),
                counts + jnp.sum(y, 0).astype(jnp.int32),
                num + jnp.sum(valid).astype(jnp.int32)), None

    init_carry = (jnp.zeros((d, d), dtype), jnp.zeros((d, num_classes), dtype),
                  jnp.zeros((num_classes,), jnp.int32), jnp.zeros((), jnp.int32))
    (g, xy, counts, num), _ = jax.lax.scan(
        body, init_carry, (split(jnp.asarray(features)), split(jnp.asarray(labels)),
                           split(valid_in)))
    chol = jnp.linalg.cholesky(g + state.gamma * jnp.eye(d, dtype=dtype))
    r = jsl.cho_solve((chol, True), jnp.eye(d, dtype=dtype))
    w = jsl.cho_solve((chol, True), xy)
    w = jnp.where(counts > 0, w, 0)
    return state._replace(weights=w, inverse=0.5 * (r + r.T), class_counts=counts,
                          num_examples=num)


# ----------------------------------------------------------------------------- public API


def init(
    feature_dim: int,
    num_classes: int,
    *,
    gamma: float = 0.1,
    buffer_size: int | None = None,
    key: jax.Array | None = None,
    dtype=jnp.float32,
) -> RLSState:
    """An empty classifier: ``R = I/γ``, ``W = 0``, no classes seen.

    Args:
      feature_dim: dimension ``d_in`` of the features it will be given.
      num_classes: capacity ``C``: labels are ids in ``[0, C)``; classes may appear in any
        order and any batch (G-ACIL), unseen ones keep a zero column.
      gamma: ridge regularisation ``γ > 0`` (ACIL's command-line default 0.1). Small values
        with large ``d`` make ``R`` ill-conditioned: prefer float64 there.
      buffer_size: if set, a frozen random ReLU expansion to this many features (ACIL's
        buffer layer; 8192 for CIFAR-100 in ACIL); ``key`` then draws ``P``.
      key: PRNG key for the buffer layer (required with ``buffer_size``).
      dtype: float32 or float64 (float64 needs ``jax.enable_x64``); ACIL uses float64.

    Returns:
      The initial :class:`RLSState`.

    Raises:
      TypeError: on a size that is not an int or a ``gamma`` that is not a number.
      ValueError: on a non-positive size, ``gamma`` not a finite number ``> 0``, a missing
        key, or a dtype that is not a floating type available in this JAX configuration.
    """
    feature_dim = check_positive_int("feature_dim", feature_dim)
    num_classes = check_positive_int("num_classes", num_classes)
    gamma = check_real("gamma", gamma, 0.0, math.inf, low_open=True, high_open=True)
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"dtype must be a floating type, got {dtype}")
    if jax.dtypes.canonicalize_dtype(dtype) != dtype:
        raise ValueError(f"dtype {dtype} is not available: enable it with "
                         "`with jax.enable_x64(True):` (or jax_enable_x64)")
    projection = None
    d = feature_dim
    if buffer_size is not None:
        d = check_positive_int("buffer_size", buffer_size)
        if key is None:
            raise ValueError("buffer_size needs a PRNG `key` to draw the random buffer layer")
        bound = 1.0 / math.sqrt(feature_dim)
        projection = jax.random.uniform(key, (feature_dim, d), dtype, -bound, bound)
    return RLSState(
        weights=jnp.zeros((d, num_classes), dtype),
        inverse=jnp.eye(d, dtype=dtype) / jnp.asarray(gamma, dtype),
        class_counts=jnp.zeros((num_classes,), jnp.int32),
        num_examples=jnp.zeros((), jnp.int32),
        gamma=jnp.asarray(gamma, dtype),
        projection=projection,
    )


def learn(state: RLSState, features: jax.Array, labels: jax.Array, *,
          mask: jax.Array | None = None, batch_size: int | None = None) -> RLSState:
    """Adds a batch to the regression (ACIL Eqs. 9-10; G-ACIL for mixed batches).

    The result is exactly ridge regression on everything learned so far plus this batch,
    whatever classes it holds (old, new or both).

    Args:
      state: the classifier.
      features: ``(n, d_in)``.
      labels: ``(n,)`` int class ids in ``[0, C)``.
      mask: optional ``(n,)`` bool; False rows are padding and are ignored (fixed shapes).
      batch_size: if set, rows are added in chunks of this size (one ``lax.scan``): the
        Woodbury step inverts an ``n × n`` matrix, so bound ``n`` for large inputs.

    Returns:
      The updated state.

    Raises:
      ValueError: on a feature dimension other than the state's, mismatched shapes, or
        (for concrete inputs) a label outside ``[0, C)``. Under jit such labels are
        ignored like masked rows.
    """
    _check_inputs(state, features, labels, mask)
    return _update(state, features, labels, mask, sign=1, batch_size=_batch(batch_size))


def unlearn(state: RLSState, features: jax.Array, labels: jax.Array, *,
            mask: jax.Array | None = None, batch_size: int | None = None) -> RLSState:
    """Removes previously learned examples exactly (ACU: the Woodbury downdate).

    The result equals ridge regression refit on the data that remains; a class whose last
    example is removed gets an exactly-zero column and ``class_counts == 0`` (it is no
    longer predicted). The examples' features must be the ones that were learned (same
    frozen backbone and buffer).

    What can be detected (checked when called on concrete arrays, i.e. not under jit):

    * a label of a class with fewer learned examples than the request removes (e.g. a
      class never seen): the counts would go negative;
    * a request whose downdate matrix ``I − X R Xᵀ`` is not positive-definite: no subset
      of the learned data has that property, so these rows were not all learned (the
      check is the finiteness of the result: the Cholesky factor of a matrix that is not
      positive-definite is NaN; under jit the weights then come back NaN).

    :func:`inverse_is_consistent` checks the stronger necessary condition
    ``R⁻¹ − γI ⪰ 0`` at ``O(d³)`` cost. What cannot be detected: the state keeps no
    examples (that is the point of analytic unlearning), so an example that was never
    learned but carries the label of a learned class and keeps the downdate
    positive-definite (e.g. one close to the learned data) is "removed" silently, leaving
    ridge regression on a data set with a negatively weighted example; likewise features
    that differ slightly from the learned ones (another backbone, float rounding of a
    recomputation), or labels swapped between learned classes.

    Args:
      state: the classifier.
      features: ``(n, d_in)`` features of the examples to forget.
      labels: ``(n,)`` their labels, as learned.
      mask: optional ``(n,)`` bool; False rows are ignored.
      batch_size: if set, rows are removed in chunks of this size (one ``lax.scan``).

    Returns:
      The updated state.

    Raises:
      ValueError: as :func:`learn`; and for concrete inputs, a request that removes more
        examples of a class than were learned, or whose downdate is not
        positive-definite (the message says which).
    """
    _check_inputs(state, features, labels, mask)
    concrete = _is_concrete(state.class_counts, labels, mask)
    if concrete:
        used = np.asarray(labels) if mask is None else np.asarray(labels)[np.asarray(mask, bool)]
        remove = np.bincount(used, minlength=state.weights.shape[1])
        have = np.asarray(state.class_counts, np.int64)
        over = np.flatnonzero(remove > have)
        if over.size:
            c = int(over[0])
            raise ValueError(
                f"cannot unlearn {int(remove[c])} example(s) of class {c}: only {int(have[c])} "
                "are learned; these examples were not (all) learned"
            )
    new = _update(state, features, labels, mask, sign=-1, batch_size=_batch(batch_size))
    if concrete and not bool(jnp.all(jnp.isfinite(new.inverse))):
        raise ValueError(
            "unlearn: the downdate I − X R Xᵀ (equivalently R⁻¹ − XᵀX) is not "
            "positive-definite, so these rows were "
            "not all learned (or their features differ from the learned ones: same backbone, "
            "buffer layer and dtype?). The state was not changed."
        )
    return new


def fit(state: RLSState, features: jax.Array, labels: jax.Array, *,
        mask: jax.Array | None = None, chunk_size: int = 4096) -> RLSState:
    """Ridge regression from scratch on these data, in the layout of `state`.

    ``R = (XᵀX + γI)⁻¹`` and ``W = R XᵀY`` by one Cholesky factorisation, with ``XᵀX``
    and ``XᵀY`` accumulated over chunks of ``chunk_size`` rows. Keeps the state's ``γ``,
    capacity and buffer layer and discards what it had learned: this is "refitting from
    scratch", the reference that :func:`learn`/:func:`unlearn` reproduce incrementally.

    Args:
      state: gives ``γ``, ``C``, the buffer layer and the dtype.
      features, labels, mask: as in :func:`learn`.
      chunk_size: rows per accumulation step (bounds memory).

    Returns:
      The fitted state (counts from the given labels).
    """
    chunk_size = check_positive_int("chunk_size", chunk_size)
    _check_inputs(state, features, labels, mask)
    return _fit(state, features, labels, mask, chunk_size=chunk_size)


def predict(state: RLSState, features: jax.Array, *, mask_unseen: bool = True) -> jax.Array:
    """Logits ``embed(features) · W``, shape ``(n, C)``.

    Args:
      state: the classifier.
      features: ``(n, d_in)``.
      mask_unseen: give classes without learned examples the logit ``-1e9`` (their ridge
        output is exactly 0, which could otherwise beat negative scores of seen classes;
        ACIL's classifier has no column for them at all).
    """
    return _predict(state, features, mask_unseen=bool(mask_unseen))


@functools.partial(jax.jit, static_argnames=("mask_unseen",))
def _predict(state: RLSState, features, *, mask_unseen: bool) -> jax.Array:
    logits = _mm(embed(state, features), state.weights)
    if mask_unseen:
        logits = jnp.where(state.class_counts > 0, logits, UNSEEN_LOGIT)
    return logits


def inverse_is_consistent(state: RLSState, *, rtol: float = 1e-4) -> bool:
    """Whether ``R⁻¹ − γI`` is positive semi-definite (``λ_max(R) ≤ (1 + rtol)/γ``).

    True for every state reached by learning and then unlearning a subset of the learned
    examples; False proves an unlearn request removed something that was not learned.
    Costs an ``O(d³)`` eigendecomposition; host-side (not jit-able).
    """
    top = float(jnp.linalg.eigvalsh(state.inverse)[-1])
    return bool(top <= (1.0 + rtol) / float(state.gamma))
