"""EMA balancing: an exponential moving average of the parameters, fixed or adaptive.

The adaptive rate is the "dynamic EMA" of the Large Continual Instruction Assistant
(Qiao et al., ICML 2025; code ``JingyangQiao/CoIN`` @efa9cb4,
``CoIN/peft/tuners/lora.py::ema_update``). The wrapper form follows ``optax.lookahead`` /
``optax.MultiSteps``: it wraps a whole optimizer, passes its updates through unchanged and
keeps the EMA copy of the parameters in its own state.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from clax._validation import check_bool, check_params_given, check_real
from clax.typing import PyTree


class EMABalancingState(NamedTuple):
    """State of :func:`ema_balancing`; a pytree (jit, scan and checkpoint friendly)."""

    count: jax.Array  # int32 (): updates applied so far
    inner: optax.OptState  # state of the wrapped transformation
    ema: PyTree  # θ*, like params (same shapes and dtypes); a copy of params before step 1
    prev_grads: PyTree  # g_{t-1}, like params (zeros before step 1); () when not adaptive
    rates: PyTree  # float32 () per tensor: the α used at the last update (0 before step 1)


def _l1(x: jax.Array) -> jax.Array:
    # At least float32: the sum of many bfloat16 magnitudes would lose the rate's precision.
    return jnp.sum(jnp.abs(x), dtype=jnp.promote_types(x.dtype, jnp.float32))


def _adaptive_rate(
    theta: jax.Array, ema: jax.Array, grad: jax.Array, prev_grad: jax.Array
) -> jax.Array:
    """CoIN's per-tensor rate ``α = 2(1 + ‖g_t‖₁) / (‖θ_t − θ*‖₁ · ‖g_t − g_{t−1}‖₁)``."""
    a = _l1(theta - ema)
    b = _l1(grad)
    c = _l1(grad - prev_grad)
    return 2.0 * (1.0 + b) / (a * c)


def ema_balancing(
    inner: optax.GradientTransformation,
    *,
    decay: float = 0.99,
    adaptive: bool = False,
    fallback_rate: float = 0.01,
) -> optax.GradientTransformationExtraArgs:
    """Wraps ``inner`` and keeps an EMA ``θ*`` of the parameters it produces.

    ``update(grads, state, params, **extra)`` runs ``inner.update(grads, state.inner,
    params, **extra)``, returns its updates **unchanged** (training is not affected) and
    moves ``θ*`` towards the new parameters ``θ_t = params + updates``.

    Fixed (``adaptive=False``)::

        θ* ← decay·θ* + (1 − decay)·θ_t      (computed as θ* + (1 − decay)·(θ_t − θ*))

    Adaptive (``adaptive=True``), per tensor, following the CoIN code (Qiao et al., "Large
    Continual Instruction Assistant", ICML 2025; ``CoIN/peft/tuners/lora.py::ema_update``),
    with L1 norms of whole tensors::

        a = ‖θ_t − θ*_{t−1}‖₁,   b = ‖g_t‖₁,   c = ‖g_t − g_{t−1}‖₁
        α = 2·(1 + b) / (a·c);   if not (0 < α < 1) (also NaN, inf from a·c = 0): α = fallback_rate
        θ* ← (1 − α)·θ* + α·θ_t              (computed as θ* + α·(θ_t − θ*))

    The code differs from the paper and this follows the code: the paper's
    ``β_t = (L'(θ_t) + 1) / ((θ_t − θ*_{t−1})·L''(θ_t))`` has no factor 2, and ``c`` is a
    plain gradient difference across minibatches, not divided by ``Δθ``; the coefficient is
    the weight on the *new* parameters, with fallback 0.01 (i.e. an EMA with decay 0.99).

    First step: ``θ*`` is set to the parameters after the first update, ``θ* = θ_1``
    exactly, in both modes. In CoIN there is no ``g_0`` at the first step, the lookup raises
    a caught ``KeyError`` and ``0.99·θ* + 0.01·θ_1`` (with ``θ* = θ_1``) is applied, a no-op;
    here the first step therefore records ``α = fallback_rate`` in ``state.rates``. ``g_t`` is
    stored every step.

    Which gradient: ``g_t`` is the ``grads`` argument the wrapper receives, i.e. whatever
    comes *before* it. CoIN uses gradients after clipping (HF ``max_grad_norm = 1.0``); to
    reproduce that, clip outside the wrapper::

        tx = optax.chain(optax.clip_by_global_norm(1.0), ema_balancing(optax.adamw(2e-4)))

    Clipping is stateless, so this trains exactly like ``ema_balancing(chain(clip, adamw))``
    while the rate sees the clipped gradient. Transforms *after* the wrapper in a chain
    change the applied update but not ``θ_t`` as computed here, so keep the wrapper last
    (outermost), as ``clax.training.Method.wrapper`` does, if ``θ*`` must track the real
    parameters.

    Both are evaluated as ``θ* + rate·(θ_t − θ*)``, so a parameter that stays constant (a
    frozen one, where the wrapper sees the full tree) keeps ``θ* = θ`` bit for bit. Inside
    ``clax.params.train_only(tx, mask)`` (``optax.partition``) the wrapper sees only the
    trainable leaves and ``θ*`` holds ``optax.MaskedNode`` at the frozen ones.

    Read ``θ*`` with :func:`ema_params`; at the end of a task CoIN replaces the model's
    parameters by it (and evaluates the EMA weights).

    Args:
        inner: The optimizer to wrap (any ``GradientTransformation``; extra args are passed).
        decay: Fixed EMA decay, ``0 <= decay < 1`` (``0`` tracks ``θ_t``). Unused when
            ``adaptive``.
        adaptive: Use CoIN's per-tensor adaptive rate instead of ``1 − decay``.
        fallback_rate: Adaptive rate used when ``α`` is not in ``(0, 1)``, ``0 < r < 1``.

    Returns:
        An ``optax.GradientTransformationExtraArgs`` with :class:`EMABalancingState`.
        ``update`` requires ``params``.

    Raises:
        TypeError: On a non-number ``decay`` or ``fallback_rate`` or a non-bool ``adaptive``.
        ValueError: On ``decay`` outside ``[0, 1)`` or ``fallback_rate`` outside ``(0, 1)``;
            at update time, if ``params`` is None.
    """
    decay = check_real("decay", decay, 0.0, 1.0, low_open=False, high_open=True)
    fallback_rate = check_real("fallback_rate", fallback_rate, 0.0, 1.0, low_open=True,
                               high_open=True)
    adaptive = check_bool("adaptive", adaptive)
    inner = optax.with_extra_args_support(inner)

    def init_fn(params: PyTree) -> EMABalancingState:
        # A copy, not an alias: training steps donate params and opt_state together.
        ema = jax.tree.map(lambda p: jnp.array(p, copy=True), params)
        return EMABalancingState(
            count=jnp.zeros((), jnp.int32),
            inner=inner.init(params),
            ema=ema,
            prev_grads=jax.tree.map(jnp.zeros_like, params) if adaptive else (),
            rates=jax.tree.map(lambda _: jnp.zeros((), jnp.float32), params),
        )

    def update_fn(
        updates: PyTree, state: EMABalancingState, params: PyTree | None = None, **extra_args
    ) -> tuple[PyTree, EMABalancingState]:
        check_params_given(params, "ema_balancing")
        grads = updates
        updates, inner_state = inner.update(grads, state.inner, params, **extra_args)
        new_params = optax.apply_updates(params, updates)
        first = state.count == 0

        if adaptive:

            def rate(theta, ema, grad, prev_grad):
                alpha = _adaptive_rate(theta, ema, grad, prev_grad)
                # NaN fails both comparisons, so 0/0 and inf fall back too.
                valid = (alpha > 0) & (alpha < 1) & ~first
                return jnp.where(valid, alpha, fallback_rate)

            rates = jax.tree.map(rate, new_params, state.ema, grads, state.prev_grads)
            prev_grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.prev_grads)
        else:
            rates = jax.tree.map(lambda _: jnp.asarray(1.0 - decay, jnp.float32), new_params)
            prev_grads = ()

        def move(theta, ema, alpha):
            # θ* + α(θ − θ*) = (1 − α)θ* + αθ, written so that a parameter that does not
            # move (a frozen one) keeps its EMA exactly: θ − θ* = 0 adds an exact 0.
            rate = alpha if adaptive else 1.0 - decay
            moved = ema + rate * (theta - ema)
            # Exactly θ_1 at the first step (CoIN's first-step update is a no-op on θ* = θ_1).
            return jnp.where(first, theta, moved).astype(ema.dtype)

        ema = jax.tree.map(move, new_params, state.ema, rates)
        new_state = EMABalancingState(
            count=optax.safe_increment(state.count),
            inner=inner_state,
            ema=ema,
            prev_grads=prev_grads,
            rates=jax.tree.map(lambda r: r.astype(jnp.float32), rates),
        )
        return updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def find_state(opt_state: optax.OptState, state_type: type) -> Any:
    """The single ``state_type`` instance anywhere inside ``opt_state``.

    Searches the whole pytree (chains, ``optax.partition``/``masked`` states, and the
    ``inner`` states of wrappers, so nested wrappers of the same type count as ambiguous).

    Args:
        opt_state: An optimizer state.
        state_type: The state class to look for, e.g. :class:`EMABalancingState`.

    Returns:
        The instance.

    Raises:
        ValueError: If there is none, or more than one.
    """

    def search(tree: Any) -> list[Any]:
        found = [
            x
            for x in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, state_type))
            if isinstance(x, state_type)
        ]
        # Look inside each hit too: a wrapper of the same type nested in another one.
        return found + [y for x in found for y in search(tuple(x))]

    found = search(opt_state)
    if not found:
        raise ValueError(
            f"no {state_type.__name__} found in the optimizer state; was the optimizer built "
            f"with the matching wrapper? (state type: {type(opt_state).__name__})"
        )
    if len(found) > 1:
        raise ValueError(
            f"the optimizer state holds {len(found)} {state_type.__name__} instances; "
            f"ambiguous, pass the one you mean (e.g. opt_state[i]) instead"
        )
    return found[0]


def ema_params(opt_state: optax.OptState) -> PyTree:
    """The EMA parameters ``θ*`` of the :class:`EMABalancingState` inside ``opt_state``.

    Before the first update this is a copy of the initial parameters.

    Args:
        opt_state: The state of an optimizer containing exactly one :func:`ema_balancing`.

    Returns:
        ``θ*``, shaped like the parameters.

    Raises:
        ValueError: If ``opt_state`` holds no, or several, ``EMABalancingState``.
    """
    return find_state(opt_state, EMABalancingState).ema
