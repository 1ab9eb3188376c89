"""Parameter selection: static masks for methods that train only part of the model.

A *mask* is a tree shaped like the parameters with Python ``bool`` leaves, ``True`` for a
trainable leaf. Masks are computed once on the host (numpy), so they are static: they go
into ``optax.masked`` / ``optax.partition`` like any hand-written mask and never trigger a
recompilation. Three selection rules:

- `half_fine_tuning_mask` (HFT, Hui et al. 2024): a random half of the tensors of each
  category inside each block, redrawn at every stage from ``(seed, stage)``.
- `kappatune_mask` (KappaTune, Ludwig 2025): the tensors with the smallest condition
  number ``σ_max / σ_min`` (`condition_numbers`).
- `fisher_importance_mask`: freezes the tensors with the largest mean diagonal Fisher
  information (`tensor_importance`), training the rest.

Freezing with a mask: `train_only` (``optax.partition`` with ``set_to_zero`` for frozen
leaves, which then hold no optimizer state). Note that ``optax.masked(tx, trainable)``
alone does **not** freeze anything: masked-out leaves pass their incoming updates (the raw
gradients) through unchanged. Chain ``optax.transforms.freeze(invert_mask(trainable))``
after it, or use `train_only`.

Example::

    trainable = kappatune_mask(params, num_tensors=4)
    tx = train_only(optax.adam(1e-3), trainable)            # frozen leaves: zero update
    method = Method(name="kappatune", optimizer=around(lambda tx: train_only(tx, trainable)))
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx

from clax._validation import check_choice, check_int, check_unit_interval
from clax.params.paths import (
    _as_index,
    _leaves_with_paths,
    block_depths,
    check_same_paths,
    label_params,
    leaves_by_path,
    path_str,
    plain_path,
    strip_variables,
)
from clax.typing import Path, PyTree

__all__ = [
    "HFT_CATEGORIES",
    "condition_numbers",
    "fisher_importance_mask",
    "half_fine_tuning_mask",
    "invert_mask",
    "kappatune_mask",
    "mask_labels",
    "tensor_importance",
    "train_only",
]

# Default HFT categories, tried in order on each leaf path (`label_params` rules): the
# norms and the attention projections of a block are each a category; everything else in
# the block (MLP / FFN layers, convolutions, dense layers) is "other".
HFT_CATEGORIES: tuple[tuple[str, str], ...] = (
    (r"(^|/|_)(ln|bn|gn|norm|layer_?norm|batch_?norm|group_?norm|rms_?norm)\d*/[^/]+$",
     "norm"),
    (r"(^|/)(attn|attention|self_attn|mha)/", "attention"),
)


# --------------------------------------------------------------------------------------
# Checks


def _count(fraction: float, n: int) -> int:
    """``fraction * n`` to the nearest int, halves up (tolerant of 0.3 * 10 = 3.0000...04)."""
    return min(n, math.floor(fraction * n + 0.5 + 1e-9))


def _leaves(params: PyTree, arg: str = "params") -> tuple[list[tuple[Path, Any]], Any]:
    # nnx.Variable wrappers dropped: a mask of an nnx.State is an nnx.State of bools, which
    # fits both the state nnx.Optimizer initialises with and the one it updates with.
    leaves, treedef = _leaves_with_paths(strip_variables(params))
    if not leaves:
        raise ValueError(f"{arg} has no leaves")
    return leaves, treedef


def _mask_from(treedef: Any, flags: Sequence[bool]) -> PyTree:
    return jax.tree_util.tree_unflatten(treedef, [bool(f) for f in flags])


def _check_mask(params: PyTree, trainable: PyTree) -> None:
    """``trainable`` holds a Python / numpy bool at each leaf (and, given ``params``, at
    exactly the paths of ``params``)."""
    leaves, _ = _leaves_with_paths(trainable)
    for path, flag in leaves:
        if not isinstance(flag, (bool, np.bool_)):
            raise TypeError(
                f"trainable must hold a bool at every parameter path; got {flag!r} "
                f"({type(flag).__name__}) at {path_str(path)!r}"
            )
    if params is None:
        return
    _check_mask_paths([path for path, _ in _leaves_with_paths(params)[0]],
                      [path for path, _ in leaves])


def _check_mask_paths(want: Sequence[Path], have: Sequence[Path]) -> None:
    for a, b, names in ((want, set(have), ("params", "trainable")),
                        (have, set(want), ("trainable", "params"))):
        for path in a:
            if path not in b:
                raise ValueError(
                    f"path {path_str(path)!r} is in {names[0]} but not in {names[1]}"
                )


# --------------------------------------------------------------------------------------
# Using masks


def invert_mask(mask: PyTree) -> PyTree:
    """The complementary mask (trainable <-> frozen), for ``optax.transforms.freeze``."""
    _check_mask(None, mask)
    return jax.tree.map(lambda f: not bool(f), mask)


def mask_labels(trainable: PyTree) -> PyTree:
    """``"trainable"`` / ``"frozen"`` labels of a mask, for ``optax.partition``."""
    _check_mask(None, trainable)
    return jax.tree.map(lambda f: "trainable" if f else "frozen", trainable)


def train_only(
    tx: optax.GradientTransformation, trainable: PyTree
) -> optax.GradientTransformationExtraArgs:
    """Applies ``tx`` to the trainable leaves and a zero update to the others.

    ``optax.partition({"trainable": tx, "frozen": optax.set_to_zero()}, labels)``: frozen
    leaves get an exact zero update (so their values stay bit-identical, whatever ``tx``
    does, weight decay included) and hold no ``tx`` state. Extra args are passed on to
    ``tx``. As a `clax.core.Method` optimizer hook
    (``optimizer=around(lambda tx: train_only(tx, mask))``) it freezes the whole chain: the
    method's transforms and the base optimizer.

    The mask is matched to the params and updates by path (:func:`clax.params.plain_path`),
    not by container, so a pure-dict mask, an ``nnx.State`` of bools or a mask of
    ``nnx.Param``-wrapped bools all work with pure-dict params and with ``nnx.Optimizer``
    (which initialises with an ``nnx.State`` of ``nnx.Param`` and updates with an
    ``nnx.State`` of arrays)::

        trainable = kappatune_mask(nnx.state(model, nnx.Param), num_tensors=4)
        optimizer = nnx.Optimizer(model, train_only(optax.adam(1e-3), trainable),
                                  wrt=nnx.Param)

    Args:
        tx: the transformation for the trainable leaves.
        trainable: a mask with the params' paths (bool leaves, ``True`` = trainable).

    Returns:
        An ``optax.GradientTransformationExtraArgs``.

    Raises:
        TypeError: a non-bool leaf of the mask (naming its path).
        ValueError: at ``init`` (and ``update``), a path of the params missing from the
            mask or the other way round (naming it).
    """
    _check_mask(None, trainable)
    flags = {path: bool(flag) for path, flag in leaves_by_path(trainable).items()}

    def labels(tree: PyTree) -> PyTree:
        # Labels in the structure of the tree optax hands over (params at init, updates
        # at update), one at each leaf or nnx.Variable, looked up by path.
        pairs = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_variable)[0]
        _check_mask_paths([plain_path(p) for p, _ in pairs], list(flags))
        return jax.tree_util.tree_map_with_path(
            lambda p, _: "trainable" if flags[plain_path(p)] else "frozen", tree,
            is_leaf=_is_variable)

    return optax.transforms.partition(
        {"trainable": tx, "frozen": optax.set_to_zero()}, labels)


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


# --------------------------------------------------------------------------------------
# HFT


def _unit(path: Path, unit: str) -> Path:
    """The selection unit of a leaf: its module (parent path) or the leaf itself.

    A leaf that is a list item (``layers/0`` holding an array) is its own module, so a
    module never spans blocks.
    """
    if unit == "module" and len(path) > 1 and _as_index(path[-1]) is None:
        return path[:-1]
    return path


def half_fine_tuning_mask(
    params: PyTree,
    *,
    stage: int,
    seed: int = 0,
    fraction: float = 0.5,
    categories: Sequence[tuple[str, str]] = HFT_CATEGORIES,
    unit: str = "module",
    depth_fn: Callable[[Path], int] | None = None,
) -> PyTree:
    """Half fine-tuning (HFT): train a random half of each block's tensors per category.

    HFT (Hui et al.) freezes half of the parameters at every training stage and updates
    the other half, choosing at the category level inside each transformer block (e.g. 2
    of the 4 attention projections, half of the FFN matrices alternating across layers,
    1 of 2 norms); the selection is drawn again at each new stage.

    Here the *units* chosen are modules (a kernel with its bias, a norm's scale with its
    bias; ``unit="tensor"`` chooses leaves one by one). Each unit gets a block depth from
    `block_depths` (`OUTSIDE` for head, embeddings, stem and final norm, which form one
    more "block") and a category from ``categories`` (`label_params` rules on the leaf
    paths, default "other"; `HFT_CATEGORIES` separates norms and attention). Within each
    category, the groups ``(block, category)`` are visited by depth (outside first) and
    group g of ``n_g`` units trains

    .. math::
        k_g = \\lfloor S_g + u \\rfloor - \\lfloor S_{g-1} + u \\rfloor, \\qquad
        S_g = f \\sum_{i \\le g} n_i, \\quad u \\sim U[0, 1)

    of its units, chosen uniformly (systematic sampling): ``k_g`` is ``f n_g`` rounded
    down or up, exactly ``f n_g`` when that is an integer, and odd groups alternate
    between rounding down and up so the category as a whole trains ``f N`` rounded (the
    paper's "alternating across layers to reach ½"). All draws come from
    ``np.random.default_rng([seed, stage])``: the same (seed, stage) gives the same mask,
    and a new stage redraws it.

    Args:
        params: the parameter tree (arrays or ``jax.ShapeDtypeStruct``: only paths are read).
        stage: the training stage (task) index, >= 0.
        seed: the selection seed, >= 0.
        fraction: the fraction of units trained (HFT: 0.5).
        categories: ``(pattern, label)`` rules searched in each leaf's path; the leaves of
            one module must agree.
        unit: ``"module"`` or ``"tensor"``.
        depth_fn: optional block-depth override, as in `block_depths`.

    Returns:
        A mask shaped like ``params`` (Python bools, ``True`` = trainable).

    Raises:
        TypeError: ``stage``, ``seed``, ``fraction`` or ``unit`` of the wrong type.
        ValueError: bad ``stage``, ``seed``, ``fraction``, ``unit`` or rules; a module
            whose leaves fall in different categories (naming it); no block in the paths.

    References:
        Hui et al. HFT: Half Fine-Tuning for Large Language Models. ACL 2025.
        arXiv:2404.18466.
    """
    stage = check_int("stage", stage, low=0)
    seed = check_int("seed", seed, low=0)
    f = check_unit_interval("fraction", fraction)
    check_choice("unit", unit, ("module", "tensor"))
    leaves, treedef = _leaves(params)
    depths = jax.tree.leaves(block_depths(params, depth_fn=depth_fn)[0])
    labels = jax.tree.leaves(label_params(params, list(categories), default="other"))

    units: dict[Path, tuple[int, str]] = {}  # unit -> (depth, category), in flatten order
    for (path, _), depth, label in zip(leaves, depths, labels, strict=True):
        key = _unit(path, unit)
        if key in units and units[key][1] != label:
            raise ValueError(
                f"the leaves of module {path_str(key)!r} fall in different categories "
                f"({units[key][1]!r} and {label!r}); fix the category rules or pass "
                "unit='tensor'"
            )
        units.setdefault(key, (int(depth), label))

    groups: dict[tuple[str, int], list[Path]] = {}
    for key, (depth, label) in units.items():
        groups.setdefault((label, depth), []).append(key)
    rng = np.random.default_rng([seed, stage])
    chosen: set[Path] = set()
    for label in sorted({label for label, _ in groups}):
        u = rng.random()
        total = 0
        for depth in sorted(d for lab, d in groups if lab == label):  # OUTSIDE (-1) first
            members = groups[(label, depth)]
            before = math.floor(f * total + u + 1e-9)
            total += len(members)
            k = math.floor(f * total + u + 1e-9) - before
            chosen.update(members[i] for i in rng.permutation(len(members))[:k])
    return _mask_from(treedef, [_unit(path, unit) in chosen for path, _ in leaves])


# --------------------------------------------------------------------------------------
# KappaTune


def _as_matrix(x: np.ndarray) -> np.ndarray:
    """A weight as a 2-D matrix: Dense (in, out) as is, conv (kh, kw, in, out) ->
    (kh*kw*in, out); in general all leading dims are flattened against the last."""
    return x.reshape(-1, x.shape[-1])


def condition_numbers(params: PyTree, *, max_dim: int | None = None) -> dict[str, float]:
    """Condition number ``κ = σ_max / σ_min`` of every tensor KappaTune analyses.

    Tensors with ``ndim >= 2`` are analysed as matrices (`_as_matrix`: conv kernels
    ``(kh, kw, in, out) -> (kh·kw·in, out)``, the transpose of PyTorch's
    ``(out, in·kh·kw)`` reshape, with the same singular values). ``σ`` are the singular
    values in float64 (``numpy.linalg.svd``); ``κ = inf`` when ``σ_min = 0``. A matrix
    with one row or column has a single singular value, so ``κ = 1`` (e.g. a ViT
    ``cls_token`` of shape (1, 1, D)); the reference code does the same. Tensors with
    ``ndim < 2`` (biases, norms) are not analysed, nor, with ``max_dim``, tensors with any
    dimension larger than it (the reference's ``max_dim_size_to_analyze``, for huge
    embedding matrices).

    Args:
        params: the parameter tree.
        max_dim: skip tensors with a dimension above this (None: analyse all).

    Returns:
        ``{path_str: κ}`` for the analysed tensors, in flatten order.

    Raises:
        TypeError: ``max_dim`` is neither None nor an int.
        ValueError: a non-finite weight (naming the path), or ``max_dim < 1``.
    """
    max_dim = check_int("max_dim", max_dim, low=1, optional=True)
    leaves, _ = _leaves(params)
    kappas = {}
    for path, leaf in leaves:
        shape = np.shape(leaf)
        if len(shape) < 2 or (max_dim is not None and max(shape) > max_dim):
            continue
        w = np.asarray(jax.device_get(leaf), dtype=np.float64)
        if not np.all(np.isfinite(w)):
            raise ValueError(f"parameter {path_str(path)!r} has non-finite entries")
        s = np.linalg.svd(_as_matrix(w), compute_uv=False)
        kappas[path_str(path)] = float(s[0] / s[-1]) if s[-1] > 0 else math.inf
    return kappas


def kappatune_mask(
    params: PyTree,
    *,
    num_tensors: int | None = None,
    fraction: float | None = None,
    max_dim: int | None = None,
) -> PyTree:
    """KappaTune: train only the best-conditioned tensors (Ludwig 2025).

    The tensors analysed by `condition_numbers` are sorted by ``κ`` (ascending; ties keep
    flatten order) and the first ``num_tensors`` (or ``round(fraction · #analysed)``,
    halves up) are trainable; every other leaf, including all biases and norms, is frozen.
    A low ``κ`` means the matrix spreads its information evenly over its directions, so
    the paper takes it as the least specialised, safest to adapt. (The reference's LoRA
    integration picks an unsorted subset of its 2N candidates; here the choice is always
    by ``κ``.)

    Args:
        params: the parameter tree.
        num_tensors: how many tensors to train (the reference's ``num_tensors_to_finetune``,
            default 100 there); more than the analysed count trains them all.
        fraction: instead, the fraction of the analysed tensors to train.
        max_dim: skip tensors with a dimension above this (they stay frozen).

    Returns:
        A mask shaped like ``params`` (Python bools, ``True`` = trainable).

    Raises:
        TypeError: ``num_tensors``, ``fraction`` or ``max_dim`` of the wrong type.
        ValueError: both or neither of ``num_tensors`` / ``fraction``, a negative count, a
            fraction outside [0, 1], or a non-finite weight.

    References:
        Ludwig. The Condition Number as a Scale-Invariant Proxy for Information Encoding
        in Neural Units. arXiv:2506.16289 (code: oswaldoludwig/kappaTune).
    """
    if (num_tensors is None) == (fraction is None):
        raise ValueError("pass exactly one of num_tensors and fraction")
    kappas = condition_numbers(params, max_dim=max_dim)
    if num_tensors is not None:
        k = check_int("num_tensors", num_tensors, low=0)
    else:
        k = _count(check_unit_interval("fraction", fraction), len(kappas))
    names = list(kappas)
    order = sorted(range(len(names)), key=lambda i: kappas[names[i]])  # stable on ties
    chosen = {names[i] for i in order[:k]}
    leaves, treedef = _leaves(params)
    return _mask_from(treedef, [path_str(path) in chosen for path, _ in leaves])


# --------------------------------------------------------------------------------------
# Fisher importance


def tensor_importance(params: PyTree, fisher: PyTree) -> dict[str, float]:
    """Importance of each tensor: the mean of its diagonal Fisher entries.

    The mean, not the sum, so that a tensor does not rank high merely for being large:
    it is the average Fisher information per parameter of the tensor. (Per-entry
    selection, as in SSD, cannot be a static ``optax.masked`` mask, which works per leaf.)

    Args:
        params: the parameter tree (its structure is the reference).
        fisher: the diagonal Fisher, same paths and shapes (e.g. from `clax.fisher`).

    Returns:
        ``{path_str: mean Fisher}`` in flatten order (0 for an empty tensor).

    Raises:
        ValueError: a structure or shape mismatch (naming the first differing path), or
            negative / NaN Fisher entries (naming the path).
    """
    check_same_paths(params, fisher, names=("params", "fisher"))  # dict or nnx.State alike
    out = {}
    for path, leaf in _leaves(fisher, "fisher")[0]:
        f = np.asarray(jax.device_get(leaf), dtype=np.float64)
        if np.isnan(f).any():
            raise ValueError(f"fisher has NaN entries at {path_str(path)!r}")
        if (f < 0).any():
            raise ValueError(
                f"fisher has negative entries at {path_str(path)!r} (min {f.min():.3g}); a "
                "diagonal Fisher is a mean of squares"
            )
        out[path_str(path)] = float(f.mean()) if f.size else 0.0
    return out


def fisher_importance_mask(params: PyTree, fisher: PyTree, *, freeze_fraction: float) -> PyTree:
    """Freezes the most important tensors by Fisher information; trains the rest.

    Tensors are ranked by `tensor_importance` (mean diagonal Fisher per tensor); the
    ``round(freeze_fraction · #tensors)`` (halves up) most important ones are frozen (ties
    keep flatten order), so training leaves alone what earlier tasks rely on most.
    ``freeze_fraction`` counts tensors, not entries, as the masks are per tensor.

    Args:
        params: the parameter tree.
        fisher: the diagonal Fisher of earlier data, same structure and shapes as params.
        freeze_fraction: the fraction of tensors to freeze, in [0, 1].

    Returns:
        A mask shaped like ``params`` (Python bools, ``True`` = trainable).

    Raises:
        TypeError: ``freeze_fraction`` is not a number.
        ValueError: ``freeze_fraction`` outside [0, 1], or bad ``fisher`` (see
            `tensor_importance`).
    """
    f = check_unit_interval("freeze_fraction", freeze_fraction)
    importance = tensor_importance(params, fisher)
    names = list(importance)
    order = sorted(range(len(names)), key=lambda i: -importance[names[i]])  # stable on ties
    frozen = {names[i] for i in order[: _count(f, len(names))]}
    leaves, treedef = _leaves(params)
    return _mask_from(treedef, [path_str(path) not in frozen for path, _ in leaves])
