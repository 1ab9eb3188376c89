"""A-GEM: project the gradient when it conflicts with a reference gradient on memory.

Chaudhry, Ranzato, Rohrbach, Elhoseiny, "Efficient Lifelong Learning with A-GEM", ICLR
2019 (https://arxiv.org/abs/1812.00420). Follows Avalanche's
``avalanche/training/plugins/agem.py`` @eb075be3: one global coefficient over all
parameters (flattened, zeros where a parameter has no gradient), applied to the raw
gradient before the optimizer (momentum, weight decay) sees it.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from clax._validation import check_same_shapes
from clax.params.paths import align_to
from clax.typing import PyTree


class AGEMState(NamedTuple):
    """State of :func:`agem` (diagnostics only; the projection itself is stateless)."""

    num_projected: jax.Array  # int32 (): updates that were projected so far
    last_dot: jax.Array  # float32 (): ⟨g, g_ref⟩ at the last update


def _vdot(a: PyTree, b: PyTree) -> jax.Array:
    # float32 at least: bfloat16 sums over millions of entries lose the sign of small dots.
    return sum(
        (jnp.vdot(x.astype(jnp.promote_types(x.dtype, jnp.float32)),
                  y.astype(jnp.promote_types(y.dtype, jnp.float32)))
         for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=False)),
        jnp.zeros((), jnp.float32),
    )


def _select(reference_grads: PyTree, updates: PyTree) -> PyTree:
    """The reference gradient's leaves at the paths of the updates, in their structure.

    By path (:func:`clax.params.paths.align_to`): a pure dict fits the ``nnx.State`` that
    ``nnx.Optimizer`` passes, and a reference gradient over every parameter fits the
    updates of only the trainable ones (inside ``clax.params.train_only`` /
    ``optax.partition``, ``optax.MaskedNode`` at the frozen leaves), so the dot products
    run over the trainable leaves. An update leaf without a reference leaf is an error.
    """
    try:
        return align_to(reference_grads, updates, ("reference_grads", "the gradients"),
                        check_shapes=False, extra="drop")
    except ValueError as e:
        raise ValueError("reference_grads must have the structure and leaf shapes of the "
                         f"gradients (matched by parameter path): {e}") from None


def agem_project(grads: PyTree, reference_grads: PyTree) -> tuple[PyTree, jax.Array]:
    """The A-GEM projection; returns ``(projected grads, ⟨g, g_ref⟩)``.

    .. math::

        \\tilde g = \\begin{cases}
            g - \\frac{\\langle g, g_{ref}\\rangle}{\\langle g_{ref}, g_{ref}\\rangle} g_{ref}
                & \\langle g, g_{ref}\\rangle < 0 \\\\
            g & \\text{otherwise}
        \\end{cases}

    so that ``⟨g̃, g_ref⟩ = 0`` after a projection (the loss on the reference batch does
    not increase to first order) and ``g̃ = g`` when there is no conflict. A zero reference
    (e.g. an empty memory) never projects.
    """
    dot = _vdot(grads, reference_grads)
    ref_sq = _vdot(reference_grads, reference_grads)
    conflict = (dot < 0) & (ref_sq > 0)
    coef = jnp.where(conflict, dot / jnp.where(ref_sq > 0, ref_sq, 1.0), 0.0)
    projected = jax.tree.map(
        lambda g, r: (g - coef.astype(g.dtype) * r.astype(g.dtype)).astype(g.dtype),
        grads, reference_grads,
    )
    return projected, dot


def agem() -> optax.GradientTransformationExtraArgs:
    """A-GEM gradient projection as an optax transform.

    ``update(grads, state, params, *, reference_grads)`` returns
    :func:`agem_project` ``(grads, reference_grads)``. Chain it *before* the base
    optimizer (``clax.training.Method.transform``), so it projects the raw gradient as
    A-GEM does (Avalanche projects in ``after_backward``, before ``optimizer.step()``).
    The reference gradient is the loss gradient on a sample of the episodic memory (past
    tasks only), computed by the caller: the ``agem`` method does it in its
    ``extra_args`` hook.

    Returns:
        An ``optax.GradientTransformationExtraArgs`` with :class:`AGEMState`.

    Raises:
        ValueError: At update time, if ``reference_grads`` is missing, lacks a leaf of the
            gradients (matched by parameter path) or has a different shape there. A
            reference gradient over more parameters than the gradients is accepted and
            read at their paths only: inside ``clax.params.train_only(tx, mask)`` the
            transform sees only the trainable leaves, and ``⟨g, g_ref⟩``,
            ``⟨g_ref, g_ref⟩`` and the projection are over those.

    Examples:
        >>> import jax.numpy as jnp
        >>> tx = agem()
        >>> g = {"w": jnp.array([1.0, -1.0])}
        >>> u, _ = tx.update(g, tx.init(g), reference_grads={"w": jnp.array([0.0, 1.0])})
        >>> u["w"].tolist()
        [1.0, 0.0]
    """

    def init_fn(params: PyTree) -> AGEMState:
        del params
        return AGEMState(num_projected=jnp.zeros((), jnp.int32),
                         last_dot=jnp.zeros((), jnp.float32))

    def update_fn(updates: PyTree, state: AGEMState, params: PyTree | None = None, *,
                  reference_grads: PyTree | None = None, **extra_args
                  ) -> tuple[PyTree, AGEMState]:
        del params, extra_args
        if reference_grads is None:
            raise ValueError(
                "agem needs the keyword extra arg reference_grads= (the loss gradient on a "
                "memory sample, shaped like the gradients): tx.update(g, s, p, "
                "reference_grads=g_ref)"
            )
        reference_grads = _select(reference_grads, updates)
        check_same_shapes("reference_grads", reference_grads, "the gradients", updates)
        projected, dot = agem_project(updates, reference_grads)
        return projected, AGEMState(
            num_projected=state.num_projected + (dot < 0).astype(jnp.int32),
            last_dot=dot,
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
