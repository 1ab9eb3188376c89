"""Weight averaging in parameter space: interpolation, weighted means, running averages.

Pure functions over parameter trees (plain nested dicts from ``nnx.to_pure_dict``), plus an
optax wrapper that keeps a running average of the parameters during training.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from clax._validation import check_params_given, check_positive_int
from clax.params.paths import check_same_structure
from clax.transforms.ema import find_state
from clax.typing import PyTree


def _concrete_float(name: str, value: Any) -> float | None:
    """``value`` as a float, or None when it is traced (cannot be checked under jit)."""
    if isinstance(value, jax.core.Tracer):
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.ndarray, jax.Array)):
        raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    if np.ndim(value) != 0:
        raise ValueError(f"{name} must be a scalar, got shape {np.shape(value)}")
    return float(value)


def interpolate(reference: PyTree, finetuned: PyTree, *, weight: float) -> PyTree:
    """Linear interpolation ``(1 − w)·reference + w·finetuned`` (WiSE-FT).

    Wortsman et al., "Robust fine-tuning of zero-shot models", CVPR 2022. ``w = 0`` returns
    ``reference`` and ``w = 1`` returns ``finetuned`` exactly (for finite values).

    Args:
        reference: Reference (e.g. pre-trained / zero-shot) parameters.
        finetuned: Fine-tuned parameters, same structure and shapes.
        weight: ``w`` in ``[0, 1]`` (may be a traced scalar under jit, then unchecked).

    Returns:
        The interpolated tree.

    Raises:
        TypeError: If ``weight`` is not a number.
        ValueError: If ``weight`` is not in ``[0, 1]`` or the trees differ (naming the first
            differing path).
    """
    w = _concrete_float("weight", weight)
    if w is not None and not 0.0 <= w <= 1.0:
        raise ValueError(f"weight must be in [0, 1], got {weight!r}")
    check_same_structure(reference, finetuned, ("reference", "finetuned"))
    return jax.tree.map(
        lambda r, f: (1 - weight) * jnp.asarray(r) + weight * jnp.asarray(f), reference, finetuned
    )


def average(trees: Sequence[PyTree], *, weights: Sequence[float] | None = None) -> PyTree:
    """Weighted mean ``Σ_i w_i·θ_i / Σ_i w_i`` of several parameter trees.

    Args:
        trees: A non-empty sequence of trees with the same structure and shapes.
        weights: Non-negative weights, one per tree, not all zero; normalised to sum to 1.
            ``None`` gives the uniform mean.

    Returns:
        The averaged tree.

    Raises:
        ValueError: On an empty ``trees``, mismatched trees (naming the first differing
            path), or bad ``weights`` (wrong length, negative, non-finite or all zero).
    """
    if isinstance(trees, dict) or not isinstance(trees, Sequence) or len(trees) == 0:
        raise ValueError(f"trees must be a non-empty sequence of parameter trees, got {trees!r}")
    for i, tree in enumerate(trees[1:], start=1):
        check_same_structure(trees[0], tree, ("trees[0]", f"trees[{i}]"))
    if weights is None:
        w = np.full(len(trees), 1.0 / len(trees))
    else:
        if len(weights) != len(trees):
            raise ValueError(
                f"weights must have one entry per tree ({len(trees)}), got {len(weights)}"
            )
        w = np.asarray([_concrete_float(f"weights[{i}]", x) for i, x in enumerate(weights)])
        if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
            raise ValueError(
                f"weights must be finite, non-negative and not all zero, got {list(weights)}"
            )
        w = w / w.sum()
    return jax.tree.map(
        lambda *leaves: sum(
            float(wi) * jnp.asarray(leaf) for wi, leaf in zip(w, leaves, strict=True)
        ),
        *trees,
    )


def running_average_update(
    avg: PyTree, params: PyTree, count: int | jax.Array
) -> tuple[PyTree, int | jax.Array]:
    """One step of the running mean: ``avg ← avg + (params − avg)/(count + 1)``.

    After ``n`` calls starting from ``count = 0`` (``avg`` arbitrary, e.g. the first
    parameters) ``avg`` is the mean of the ``n`` parameter sets seen. This is ZSCL's
    weight ensemble in parameter space (Zheng et al., "Preventing Zero-Shot Transfer
    Degradation in Continual Learning of Vision-Language Models", ICCV 2023).

    Args:
        avg: Current average.
        params: New parameters, same structure and shapes.
        count: Number of parameter sets already averaged (int or int array, ``>= 0``).

    Returns:
        ``(avg, count + 1)``; the new average keeps ``avg``'s dtypes.

    Raises:
        TypeError: If a concrete ``count`` is not an integer.
        ValueError: If a concrete ``count`` is negative or not a scalar, or the trees
            differ (naming the first differing path).
    """
    if not isinstance(count, jax.core.Tracer):
        if isinstance(count, bool) or not (
            isinstance(count, (int, np.integer))
            or (hasattr(count, "dtype") and jnp.issubdtype(count.dtype, jnp.integer))
        ):
            raise TypeError(f"count must be a non-negative integer, got {count!r} "
                            f"({type(count).__name__})")
        if np.ndim(count) != 0 or int(count) < 0:
            raise ValueError(f"count must be a non-negative integer scalar, got {count!r}")
    check_same_structure(avg, params, ("avg", "params"))
    # Exactly `params` on the first step (count = 0), whatever avg held.
    new = jax.tree.map(
        lambda a, p: jnp.where(count == 0, p, a + (p - a) / (count + 1)).astype(a.dtype),
        avg,
        params,
    )
    return new, count + 1


class WeightAveragingState(NamedTuple):
    """State of :func:`weight_averaging`; a pytree."""

    count: jax.Array  # int32 (): updates applied so far
    inner: optax.OptState  # state of the wrapped transformation
    average: PyTree  # mean of the averaged parameters; a copy of params before the first
    num_averaged: jax.Array  # int32 (): parameter sets in `average`


def weight_averaging(
    inner: optax.GradientTransformation, *, every: int = 1
) -> optax.GradientTransformationExtraArgs:
    """Wraps ``inner`` and keeps the running mean of the parameters every ``every`` steps.

    After update ``t = k·every`` (``k = 1, 2, ...``) the new parameters ``θ_t = params +
    updates`` enter the mean, ``avg ← avg + (θ_t − avg)/(n + 1)``, so ``average`` is
    ``mean(θ_every, θ_2·every, ...)`` (stochastic weight averaging, Izmailov et al., UAI 2018;
    ZSCL's weight ensemble). Updates pass through unchanged; keep the wrapper last in a
    chain so ``θ_t`` are the real parameters. Read the mean with :func:`averaged_params`.

    Args:
        inner: The optimizer to wrap (extra args are passed through).
        every: Averaging period in updates, a positive int.

    Returns:
        An ``optax.GradientTransformationExtraArgs`` with :class:`WeightAveragingState`.
        ``update`` requires ``params``.

    Raises:
        TypeError: If ``every`` is not an int.
        ValueError: If ``every < 1``; at update time if ``params`` is None.
    """
    every = check_positive_int("every", every)
    inner = optax.with_extra_args_support(inner)

    def init_fn(params: PyTree) -> WeightAveragingState:
        return WeightAveragingState(
            count=jnp.zeros((), jnp.int32),
            inner=inner.init(params),
            # A copy, not an alias: training steps donate params and opt_state together.
            average=jax.tree.map(lambda p: jnp.array(p, copy=True), params),
            num_averaged=jnp.zeros((), jnp.int32),
        )

    def update_fn(
        updates: PyTree, state: WeightAveragingState, params: PyTree | None = None, **extra_args
    ) -> tuple[PyTree, WeightAveragingState]:
        check_params_given(params, "weight_averaging")
        updates, inner_state = inner.update(updates, state.inner, params, **extra_args)
        new_params = optax.apply_updates(params, updates)
        count = optax.safe_increment(state.count)
        take = count % every == 0
        n = state.num_averaged
        moved, _ = running_average_update(state.average, new_params, n)
        average = jax.tree.map(lambda m, a: jnp.where(take, m, a), moved, state.average)
        return updates, WeightAveragingState(
            count=count,
            inner=inner_state,
            average=average,
            num_averaged=jnp.where(take, n + 1, n).astype(jnp.int32),
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def averaged_params(opt_state: optax.OptState) -> PyTree:
    """The running mean inside the :class:`WeightAveragingState` found in ``opt_state``.

    Before the first averaged step (``num_averaged == 0``) this is a copy of the initial
    parameters.

    Raises:
        ValueError: If ``opt_state`` holds no, or several, ``WeightAveragingState``.
    """
    return find_state(opt_state, WeightAveragingState).average
