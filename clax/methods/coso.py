"""CoSO registered with the `Method` contract (Cheng et al., NeurIPS 2025).

The transform is :func:`clax.transforms.coso.coso`; this module wires it into the training
loop: the historical bases live in the method's memory (so they survive
``config.train.reset_optimizer_per_task``), reach the transform as the ``bases=`` extra
arg, and grow at each task end from the task's Frequent Directions sketch.
"""

from __future__ import annotations

import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import optax

from clax._validation import check_bool, check_real
from clax.core import (
    BoundaryContext,
    Method,
    StepContext,
    TrainState,
    chain_around,
    register_method,
)
from clax.params.paths import path_str, pure_tree
from clax.transforms.coso import CoSOState, coso_bases, coso_task_end
from clax.transforms.coso import coso as coso_transform
from clax.transforms.ema import find_state
from clax.typing import PyTree

__all__ = ["coso", "coso_update_memory", "freeze_after_first_task"]


def freeze_after_first_task(frozen: PyTree) -> optax.GradientTransformationExtraArgs:
    """Zeroes the updates of the ``frozen`` leaves once ``task_index > 0`` (extra arg).

    Chained *after* the base optimizer (``chain_around(after=...)``), so the frozen leaves do
    not move whatever the optimizer's momentum holds.

    Args:
        frozen: A bool tree shaped like the params (static).

    Returns:
        A stateless ``GradientTransformationExtraArgs`` needing ``task_index=`` (int32 ()).
    """

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None, *, task_index=None, **extra):
        del params, extra
        if task_index is None:
            raise ValueError("freeze_after_first_task: missing keyword extra arg `task_index`")
        later = jnp.asarray(task_index) > 0
        updates = jax.tree.map(
            lambda u, f: jnp.where(later, jnp.zeros_like(u), u) if f else u, updates, frozen
        )
        return updates, state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


_task_end = jax.jit(coso_task_end)


def coso_update_memory(bases: PyTree, opt_state: optax.OptState, *, threshold: float = 0.98
                       ) -> tuple[PyTree, optax.OptState]:
    """CoSO's task-end update as a plain function: merge the sketches, reset the state.

    Each Frequent Directions sketch of the optimizer state is merged into its historical
    basis with CoSO's energy rule (:func:`clax.transforms.coso.merge_sketch`), and the
    sketch, ``P``, the step count and the Adam moments are reset. The ``coso`` method's
    ``consolidate`` hook is this function.

    Args:
        bases: The historical bases (the method's memory, ``coso_bases(params, mask=...)``).
        opt_state: The optimizer state holding the ``CoSOState`` (``nnx.Variable``
            wrappers, as in ``nnx.Optimizer.opt_state``, are read through).
        threshold: Energy threshold of the merge, in ``(0, 1)``.

    Returns:
        ``(new bases, opt_state with the CoSO state reset)``, same structures (pure
        arrays; with ``nnx.Optimizer``: ``nnx.update(optimizer.opt_state,
        nnx.state(new_opt_state))``).

    Raises:
        TypeError: On a non-number ``threshold``.
        ValueError: On ``threshold`` outside ``(0, 1)``, or no ``CoSOState`` in
            ``opt_state``.
    """
    threshold = check_real("threshold", threshold, 0.0, 1.0, low_open=True, high_open=True)
    opt_state = pure_tree(opt_state)
    found = find_state(opt_state, CoSOState)
    new_bases, reset = _task_end(pure_tree(bases), found, threshold=jnp.float32(threshold))
    opt_state = jax.tree.map(lambda x: reset if isinstance(x, CoSOState) else x,
                             opt_state, is_leaf=lambda x: isinstance(x, CoSOState))
    return new_bases, opt_state


def _labels(params: PyTree, head_pattern: str) -> tuple[PyTree, PyTree]:
    """(coso_mask, frozen_mask): CoSO on every >= 2-D non-head leaf; the rest of the
    backbone (biases, norms) is frozen after the first task."""
    regex = re.compile(head_pattern) if head_pattern else None

    def is_head(path):
        return regex is not None and regex.search(path_str(path)) is not None

    use = jax.tree_util.tree_map_with_path(
        lambda path, p: jnp.ndim(p) >= 2 and not is_head(path), params)
    frozen = jax.tree_util.tree_map_with_path(
        lambda path, p: jnp.ndim(p) < 2 and not is_head(path), params)
    return use, frozen


@register_method("coso")
def coso(
    *,
    proj_rank: int = 16,
    sketch_rank: int = 32,
    threshold: float = 0.98,
    update_interval: int = 1,
    sketch_decay: float = 1.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    rank_rtol: float = 1e-2,
    scale: float = 0.1,
    head_pattern: str = r"^head/",
    freeze_other_after_first_task: bool = True,
) -> Method:
    """CoSO: low-rank Adam in a gradient subspace orthogonal to previous tasks' (NeurIPS 2025).

    Cheng et al., "Continuous Subspace Optimization for Continual Learning", NeurIPS 2025
    (code ``quinn-ch/CoSO``). Every >= 2-D weight outside the head (Dense kernels; conv
    kernels as ``(kh·kw·in, out)``) is trained by :func:`clax.transforms.coso.coso`: the
    gradient is projected orthogonal to the historical output-side basis ``Q``, then onto
    the top-``proj_rank`` right singular vectors ``P`` of that gradient (refreshed every
    ``update_interval`` steps), Adam runs on ``G P`` and the result is mapped back with
    ``Pᵀ``; a Frequent Directions sketch (``sketch_rank`` directions) of the projected
    gradients is kept during the task. The head trains with the same Adam on its full
    gradient (CoSO trains its classifier with plain AdamW).

    Task end (``consolidate``), CoSO's ``_reset_optimizer_state_for_new_task``: each sketch
    is merged into its ``Q`` with CoSO's energy rule (``r = #{k: cumsum(σ²)/Σσ² < threshold}``,
    :func:`clax.transforms.coso.merge_sketch`), and the sketch, ``P``, the step count and
    the Adam moments are reset (the moments when the next task's first step runs).

    With the training loop: ``method.transform`` is chained *before* ``config.optimizer``.
    CoSO's transform returns the Adam direction (``m̂/(sqrt(v̂)+eps)``, times ``scale``),
    so use ``config.optimizer.name = "sgd"`` (no momentum): the loop's SGD then applies the
    learning rate, exactly CoSO's AdamW step without weight decay, with Adam learning rate
    ``config.optimizer.learning_rate · scale``. ``scale`` defaults to 0.1 because compare
    mode shares one optimizer config across methods and SGD learning rates (0.01-0.1) are
    about ten times Adam's (CoSO uses 3e-4-5e-4 on a pre-trained ViT); set ``scale=1`` to
    give the Adam learning rate directly as ``config.optimizer.learning_rate``. Another base
    optimizer
    (e.g. adam) is applied on top of CoSO's update; it still trains, but the update is no
    longer CoSO's and leaves the protected subspace only through the base's own momentum
    of earlier tasks, which ``config.train.reset_optimizer_per_task`` clears.

    ``freeze_other_after_first_task``: CoSO trains only its target weights and the head
    (the rest of its pre-trained ViT is frozen). A network trained from scratch needs its
    biases on the first task, so the backbone leaves that are neither CoSO weights nor head
    (biases, norm scales) are frozen from the second task on (GPM does the same); their
    final updates are zeroed after the base optimizer.

    Args:
        proj_rank: Rank ``r`` of the low-rank gradient (CoSO: 15-50 for 768-wide weights).
        sketch_rank: Directions ``ℓ`` of the Frequent Directions sketch (CoSO: 100-120).
        threshold: Energy threshold of the task-end merge, in ``(0, 1)`` (CoSO: 0.98).
        update_interval: Steps between SVD refreshes of ``P`` (CoSO: 1).
        sketch_decay: Weight of the old sketch in each merge, in ``(0, 1]`` (CoSO: 1.0).
        b1: Adam's first-moment decay (CoSO: 0.9).
        b2: Adam's second-moment decay (CoSO: 0.999).
        eps: Adam's epsilon (CoSO: 1e-6).
        rank_rtol: Columns of ``P`` with singular value ``<= rank_rtol·σ₁`` are dropped
            (see :func:`clax.transforms.coso.coso`; not in CoSO's code).
        scale: Factor on CoSO's Adam direction; the loop's learning rate multiplies it, so
            CoSO's Adam learning rate is ``config.optimizer.learning_rate · scale``.
        head_pattern: Regex on parameter paths marking the head ("" = no head).
        freeze_other_after_first_task: Freeze non-CoSO, non-head leaves after task 0.

    Returns:
        The method.

    Raises:
        TypeError: On a hyperparameter of the wrong type (a non-number ``threshold``, a
            non-string ``head_pattern``, a non-bool ``freeze_other_after_first_task``, ...).
        ValueError: On hyperparameters outside their ranges.
    """
    threshold = check_real("threshold", threshold, 0.0, 1.0, low_open=True, high_open=True)
    b1 = check_real("b1", b1, 0.0, 1.0, low_open=False, high_open=True)
    b2 = check_real("b2", b2, 0.0, 1.0, low_open=False, high_open=True)
    eps = check_real("eps", eps, 0.0, math.inf, low_open=False, high_open=True)
    if not isinstance(head_pattern, str):
        raise TypeError(f"head_pattern must be a regex string, got {head_pattern!r} "
                        f"({type(head_pattern).__name__})")
    try:
        re.compile(head_pattern)
    except re.error as e:
        raise ValueError(f"head_pattern {head_pattern!r} is not a valid regex: {e}") from e
    check_bool("freeze_other_after_first_task", freeze_other_after_first_task)
    transform = coso_transform(
        proj_rank=proj_rank,
        sketch_rank=sketch_rank,
        update_interval=update_interval,
        sketch_decay=sketch_decay,
        rank_rtol=rank_rtol,
        inner=optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
        scale=scale,
        mask=lambda params: _labels(params, head_pattern)[0],
    )

    def init_memory(params: PyTree) -> PyTree:
        return coso_bases(params, mask=_labels(params, head_pattern)[0])

    def extra_args(ctx: StepContext) -> dict[str, Any]:
        return {"bases": ctx.memory, "task_index": ctx.task_index}

    def consolidate(state: TrainState, ctx: BoundaryContext) -> TrainState:
        del ctx
        bases, opt_state = coso_update_memory(state.memory, state.opt_state,
                                              threshold=threshold)
        return state._replace(memory=bases, opt_state=opt_state)

    post = None
    if freeze_other_after_first_task:
        # The frozen mask depends only on the tree (static): build it lazily from the updates.
        def _post_init(params):
            del params
            return optax.EmptyState()

        def _post_update(updates, state, params=None, **extra):
            frozen = _labels(updates, head_pattern)[1]
            return freeze_after_first_task(frozen).update(updates, state, params, **extra)

        post = optax.GradientTransformationExtraArgs(_post_init, _post_update)

    return Method(name="coso", optimizer=chain_around(before=transform, after=post),
                  init_memory=init_memory, extra_args=extra_args, consolidate=consolidate)
