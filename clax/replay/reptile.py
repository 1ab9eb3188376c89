"""Reptile-style gradient alignment for continual pre-training, as an optax wrapper.

Abbes et al., "Revisiting Replay and Gradient Alignment for Continual Pre-Training of Large
Language Models" (CoLLAs 2025; code ``chandar-lab/continual-pretraining``, config keys
``reptile_inner_steps``, ``replay_buffer_proportion``), an efficient form of MER (Riemer et
al., ICLR 2019). Defaults follow IBM AISteer360 ``structural_control/mer``
(``reptile_meta_lr = 0.1``, ``reptile_update_interval = 100``).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from clax._validation import check_params_given, check_positive_int, check_real
from clax.typing import PyTree


class ReptileState(NamedTuple):
    """State of :func:`reptile`."""

    count: jax.Array  # int32 (): inner updates applied so far
    inner: optax.OptState  # state of the wrapped optimizer (never reset by meta steps)
    anchor: PyTree  # θ_anchor, like params: the parameters after the last meta step


def reptile(
    inner: optax.GradientTransformation,
    *,
    every: int = 100,
    meta_lr: float = 0.1,
) -> optax.GradientTransformationExtraArgs:
    """Wraps ``inner``; every ``every`` updates, interpolates towards the anchor.

    Each call applies ``inner``'s update, ``θ ← θ + u``. After every ``every``-th update
    (counted from the first), a Reptile meta step follows in the same update::

        θ ← θ_anchor + ε·(θ − θ_anchor)
        θ_anchor ← θ

    with ``ε = meta_lr``, so only a fraction ``ε`` of the progress made over the last
    ``every`` steps is kept: a first-order step that favours directions on which
    consecutive (mixed replay + new data) gradients agree. The anchor starts as the
    initial parameters. The inner optimizer state (e.g. Adam moments) is not reset at meta
    steps, as in AISteer360's implementation. ``meta_lr = 1`` is the inner optimizer alone.

    Keep the wrapper outermost (``clax.training.Method.wrapper``) so ``θ`` is the real
    parameter vector.

    The optional keyword extra arg ``reptile_active`` (a bool scalar, default True)
    switches the meta steps off: while it is False, updates pass through unchanged and the
    anchor follows the parameters, so the first meta step after it turns True
    interpolates towards the parameters it had then (e.g. the end of a pretraining task).

    Args:
        inner: The optimizer to wrap (extra args are passed to it).
        every: Meta-step period ``k``, a positive int.
        meta_lr: ``ε`` in ``(0, 1]``.

    Returns:
        An ``optax.GradientTransformationExtraArgs`` with :class:`ReptileState`; ``update``
        requires ``params``.

    Raises:
        ValueError: On a bad ``every`` or ``meta_lr``; at update time if ``params`` is None.

    References:
        Abbes et al., 2025, https://arxiv.org/abs/2508.01908;
        Nichol et al., "On First-Order Meta-Learning Algorithms", 2018,
        https://arxiv.org/abs/1803.02999.
    """
    every = check_positive_int("every", every)
    check_real("meta_lr", meta_lr, 0.0, 1.0, low_open=True, high_open=False)
    inner = optax.with_extra_args_support(inner)
    eps = float(meta_lr)

    def init_fn(params: PyTree) -> ReptileState:
        # A copy, not an alias: training steps donate params and opt_state together.
        anchor = jax.tree.map(lambda p: jnp.array(p, copy=True), params)
        return ReptileState(count=jnp.zeros((), jnp.int32), inner=inner.init(params),
                            anchor=anchor)

    def update_fn(updates: PyTree, state: ReptileState, params: PyTree | None = None,
                  *, reptile_active: jax.typing.ArrayLike = True, **extra_args
                  ) -> tuple[PyTree, ReptileState]:
        check_params_given(params, "reptile")
        updates, inner_state = inner.update(updates, state.inner, params, **extra_args)
        count = optax.safe_increment(state.count)
        active = jnp.asarray(reptile_active, bool)
        meta = (count % every == 0) & active

        def step(p, u, a):
            theta = p + u
            target = a + eps * (theta - a)
            new_u = jnp.where(meta, target - p, u).astype(u.dtype)
            new_a = jnp.where(meta, target, jnp.where(active, a, theta)).astype(a.dtype)
            return new_u, new_a

        pairs = jax.tree.map(step, params, updates, state.anchor)
        new_updates = jax.tree.map(lambda _, pr: pr[0], params, pairs)
        anchor = jax.tree.map(lambda _, pr: pr[1], params, pairs)
        return new_updates, ReptileState(count=count, inner=inner_state, anchor=anchor)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
