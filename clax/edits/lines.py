"""LiNeS: Layer-increasing Network Scaling of task vectors (Wang et al., ICLR 2025).

Code ``wang-kee/LiNeS`` @43a7bdd, ``src/eval/eval.py::LiNeS_scaling``. A task vector
``τ = θ_ft − θ_pre`` is scaled per residual block, shallow blocks least, so that editing or
merging keeps the pre-trained model's general (shallow) features while the deep blocks keep
the task-specific change.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from clax._validation import check_positive_int, check_real
from clax.params.paths import OUTSIDE, block_depths, check_same_structure
from clax.typing import Path, PyTree


def _check_coefficient(name: str, value: Any) -> float:
    return check_real(name, value, 0.0, math.inf, low_open=False, high_open=True)


def lines_coefficients(num_blocks: int, *, alpha: float, beta: float) -> list[float]:
    """Per-block scales ``λ(ℓ) = α + β·ℓ/(L−1)`` for ``ℓ = 0..L−1``.

    ``L = 1`` has no depth to ramp over: the fraction ``ℓ/(L−1)`` is taken as 0 (as in
    ``np.linspace(α, α + β, 1) == [α]``), so the single block is scaled by ``α`` like the
    parameters outside blocks and LiNeS reduces to uniform scaling of ``τ`` by ``α``.

    Args:
        num_blocks: ``L >= 1``.
        alpha: ``α >= 0``.
        beta: ``β >= 0``.

    Returns:
        ``L`` floats.

    Raises:
        TypeError: On a non-int ``num_blocks`` or a non-number ``alpha`` or ``beta``.
        ValueError: On a bad ``num_blocks``, ``alpha`` or ``beta``.
    """
    num_blocks = check_positive_int("num_blocks", num_blocks)
    alpha = _check_coefficient("alpha", alpha)
    beta = _check_coefficient("beta", beta)
    if num_blocks == 1:
        return [alpha]
    return [alpha + beta * depth / (num_blocks - 1) for depth in range(num_blocks)]


def scale_task_vector(
    task_vector: PyTree,
    *,
    alpha: float,
    beta: float,
    depth_fn: Callable[[Path], int] | None = None,
) -> PyTree:
    """LiNeS scaling of a task vector: ``τ'_ℓ = (α + β·ℓ/(L−1))·τ_ℓ``.

    Blocks ``ℓ = 0..L−1`` come from :func:`clax.params.paths.block_depths` (the paper's
    1-based form is ``λ(ℓ) = α + β(ℓ−1)/(L−1)``); parameters outside blocks (patch / class /
    positional embeddings, stem, final norm, head) are scaled by ``α``. The reference code
    finds blocks by the substring ``".{i}."`` in the parameter name; here they are read from
    the path's list indices (ResNet ``stages/s/b`` counts as one block), which gives the same
    split on a ViT. ``L = 1``: see :func:`lines_coefficients` (everything scaled by ``α``).

    Args:
        task_vector: ``τ``, e.g. ``θ_ft − θ_pre`` or a merged multi-task vector.
        alpha: ``α >= 0``.
        beta: ``β >= 0``.
        depth_fn: Optional ``depth_fn(path) -> int`` override of the block depth (see
            :func:`clax.params.paths.block_depths`).

    Returns:
        The scaled task vector.

    Raises:
        TypeError: On a non-number ``alpha``/``beta``.
        ValueError: On a negative or non-finite ``alpha``/``beta``, or if block depths
            cannot be derived (naming the paths).
    """
    alpha = _check_coefficient("alpha", alpha)
    beta = _check_coefficient("beta", beta)
    depths, num_blocks = block_depths(task_vector, depth_fn=depth_fn)
    scales = lines_coefficients(num_blocks, alpha=alpha, beta=beta)

    def scale(tau: Any, depth: int) -> jax.Array:
        factor = alpha if depth == OUTSIDE else scales[depth]
        return (factor * jnp.asarray(tau)).astype(jnp.asarray(tau).dtype)

    return jax.tree.map(scale, task_vector, depths)


def lines_scale(
    pretrained: PyTree,
    finetuned: PyTree,
    *,
    alpha: float,
    beta: float,
    depth_fn: Callable[[Path], int] | None = None,
) -> PyTree:
    """Single-task LiNeS editing: ``θ_pre + LiNeS(θ_ft − θ_pre)``.

    Wang et al., "LiNeS: Post-training Layer Scaling Prevents Forgetting and Enhances Model
    Merging", ICLR 2025. Block ``ℓ`` of ``L`` keeps ``(α + β·ℓ/(L−1))`` of its task vector,
    parameters outside blocks keep ``α`` (see :func:`scale_task_vector`). The paper's
    single-task setting is ``α = λ, β = 1 − λ`` (the last block keeps all of ``τ``), with
    ``λ`` searched over ``{1.0, 0.9, ..., 0.0}``. ``α = 1, β = 0`` returns ``θ_ft`` and
    ``α = β = 0`` returns ``θ_pre``.

    Args:
        pretrained: ``θ_pre``.
        finetuned: ``θ_ft``, same structure and shapes.
        alpha: ``α >= 0``.
        beta: ``β >= 0``.
        depth_fn: Optional block-depth override, see
            :func:`clax.params.paths.block_depths`.

    Returns:
        The edited parameters.

    Raises:
        TypeError: On a non-number ``alpha``/``beta``.
        ValueError: On a bad ``alpha``/``beta``, mismatched trees (naming the first differing
            path), or underivable block depths.
    """
    _check_coefficient("alpha", alpha)
    _check_coefficient("beta", beta)
    check_same_structure(pretrained, finetuned, ("pretrained", "finetuned"))
    tau = jax.tree.map(lambda f, p: jnp.asarray(f) - jnp.asarray(p), finetuned, pretrained)
    scaled = scale_task_vector(tau, alpha=alpha, beta=beta, depth_fn=depth_fn)
    return jax.tree.map(lambda p, t: jnp.asarray(p) + t, pretrained, scaled)


def lines_merge(
    pretrained: PyTree,
    finetuned_list: Sequence[PyTree],
    *,
    alpha: float | None = None,
    beta: float,
    depth_fn: Callable[[Path], int] | None = None,
) -> PyTree:
    """Task arithmetic with LiNeS: ``θ_pre + LiNeS(Σ_i (θ_i − θ_pre))``.

    For multi-task merging the reference code sets ``α = (‖Σ_i τ_i‖₁ / ‖τ_MTL‖₁)·(1/T)``,
    which for task arithmetic (``τ_MTL = Σ_i τ_i``) is ``α = 1/T``, the default here; ``β``
    is searched over ``0.1, ..., 1.0``. The scaled vector is added with coefficient 1. For
    other merges (TIES, Consensus) build ``τ_MTL`` yourself, take ``α`` from
    :func:`merge_alpha` and call :func:`scale_task_vector`.

    Args:
        pretrained: ``θ_pre``.
        finetuned_list: ``T >= 1`` fine-tuned parameter trees, each shaped like
            ``pretrained``.
        alpha: ``α >= 0``; ``None`` gives ``1/T``.
        beta: ``β >= 0``.
        depth_fn: Optional block-depth override.

    Returns:
        The merged parameters.

    Raises:
        TypeError: On a non-number ``alpha``/``beta``.
        ValueError: On an empty ``finetuned_list``, bad ``alpha``/``beta``, mismatched trees
            (naming the first differing path) or underivable block depths.
    """
    if (
        isinstance(finetuned_list, dict)
        or not isinstance(finetuned_list, Sequence)
        or len(finetuned_list) == 0
    ):
        raise ValueError(
            "finetuned_list must be a non-empty sequence of parameter trees, got "
            f"{type(finetuned_list).__name__}"
        )
    num_tasks = len(finetuned_list)
    alpha = 1.0 / num_tasks if alpha is None else _check_coefficient("alpha", alpha)
    _check_coefficient("beta", beta)
    for i, finetuned in enumerate(finetuned_list):
        check_same_structure(pretrained, finetuned, ("pretrained", f"finetuned_list[{i}]"))
    tau_sum = jax.tree.map(
        lambda p, *fs: sum(jnp.asarray(f) - jnp.asarray(p) for f in fs),
        pretrained,
        *finetuned_list,
    )
    scaled = scale_task_vector(tau_sum, alpha=alpha, beta=beta, depth_fn=depth_fn)
    return jax.tree.map(lambda p, t: jnp.asarray(p) + t, pretrained, scaled)


def merge_alpha(task_vectors: Sequence[PyTree], merged: PyTree) -> float:
    """LiNeS's multi-task ``α = (‖Σ_i τ_i‖₁ / ‖τ_MTL‖₁)·(1/T)``.

    L1 norms over all parameters. For task arithmetic (``merged = Σ_i τ_i``) this is ``1/T``.

    Args:
        task_vectors: The ``T >= 1`` task vectors ``τ_i``.
        merged: The merged multi-task vector ``τ_MTL`` (e.g. from TIES), same structure.

    Returns:
        ``α`` as a Python float.

    Raises:
        ValueError: On an empty list, mismatched trees, or ``‖τ_MTL‖₁ = 0``.
    """
    if (
        isinstance(task_vectors, dict)
        or not isinstance(task_vectors, Sequence)
        or len(task_vectors) == 0
    ):
        raise ValueError("task_vectors must be a non-empty sequence of parameter trees")
    for i, tau in enumerate(task_vectors):
        check_same_structure(merged, tau, ("merged", f"task_vectors[{i}]"))
    tau_sum = jax.tree.map(lambda *ts: sum(jnp.asarray(t) for t in ts), *task_vectors)

    def l1(tree: PyTree) -> float:
        return float(sum(jnp.sum(jnp.abs(jnp.asarray(x))) for x in jax.tree.leaves(tree)))

    denom = l1(merged)
    if denom == 0:
        raise ValueError("merged has L1 norm 0: alpha = ‖Σ τ_i‖₁ / ‖τ_MTL‖₁ is undefined")
    return l1(tau_sum) / denom / len(task_vectors)
