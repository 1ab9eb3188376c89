"""Parameter paths: readable names, block depths and regex labels for parameter trees.

Parameters are plain nested dicts from ``nnx.to_pure_dict`` with int keys for list indices,
e.g. ``{"layers": {0: {"kernel": ..., "bias": ...}}, "head": {...}}``. A *path* is the tuple
of keys from the root to a leaf, e.g. ``("layers", 0, "kernel")``; :func:`path_str` renders
it as ``"layers/0/kernel"``. Every function here also accepts the key-path entries of
``jax.tree_util`` (``DictKey``, ``SequenceKey``, ``GetAttrKey``, ``FlattenedIndexKey``) and
any other pytree container (lists, tuples, NamedTuples), so optimizer states work too.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import jax

PyTree = Any
Path = tuple[Hashable, ...]

# Depth given to parameters outside every block (head, stem, embeddings, final norm). Not
# `None`: `None` is an empty pytree in JAX, so a depth tree could not hold it as a leaf.
OUTSIDE = -1


def _key(entry: Any) -> Hashable:
    """Plain key (str or int) of one path entry; jax key entries are unwrapped."""
    if isinstance(entry, jax.tree_util.DictKey):
        return entry.key
    if isinstance(entry, jax.tree_util.SequenceKey):
        return entry.idx
    if isinstance(entry, jax.tree_util.GetAttrKey):
        return entry.name
    if isinstance(entry, jax.tree_util.FlattenedIndexKey):
        return entry.key
    return entry


def plain_path(path: Sequence[Any]) -> Path:
    """The path as plain keys: ``(DictKey("layers"), DictKey(0))`` -> ``("layers", 0)``."""
    return tuple(_key(entry) for entry in path)


def path_str(path: Sequence[Any]) -> str:
    """Joins a path with ``/``: ``("layers", 0, "kernel")`` -> ``"layers/0/kernel"``.

    Args:
        path: Plain keys or ``jax.tree_util`` key entries.

    Returns:
        The slash-joined path (``""`` for the root).
    """
    return "/".join(str(k) for k in plain_path(path))


def _leaves_with_paths(tree: PyTree) -> tuple[list[tuple[Path, Any]], Any]:
    pairs, treedef = jax.tree_util.tree_flatten_with_path(tree)
    return [(plain_path(p), leaf) for p, leaf in pairs], treedef


def _format_paths(paths: Sequence[Path], limit: int = 20) -> str:
    shown = ", ".join(path_str(p) for p in paths[:limit])
    more = len(paths) - limit
    return shown + (f", ... ({more} more)" if more > 0 else "")


def check_same_structure(a: PyTree, b: PyTree, names: tuple[str, str] = ("a", "b")) -> None:
    """Checks that two trees have the same paths and the same leaf shapes.

    Dtypes may differ (e.g. a float32 average of bfloat16 parameters).

    Args:
        a: First tree.
        b: Second tree.
        names: How the two trees are called in the error message.

    Raises:
        ValueError: Naming the first path present in one tree and not the other, or the
            first path whose leaf shapes differ.
    """
    name_a, name_b = names
    leaves_a, _ = _leaves_with_paths(a)
    leaves_b, _ = _leaves_with_paths(b)
    shapes_a = {p: getattr(x, "shape", ()) for p, x in leaves_a}
    shapes_b = {p: getattr(x, "shape", ()) for p, x in leaves_b}
    # Walk both in flatten order so "first" means the same as in the trees.
    for path, _ in leaves_a:
        if path not in shapes_b:
            raise ValueError(
                f"{name_a} and {name_b} differ in structure: path {path_str(path)!r} is in "
                f"{name_a} but not in {name_b}"
            )
        if tuple(shapes_a[path]) != tuple(shapes_b[path]):
            raise ValueError(
                f"{name_a} and {name_b} differ at path {path_str(path)!r}: shape "
                f"{tuple(shapes_a[path])} vs {tuple(shapes_b[path])}"
            )
    for path, _ in leaves_b:
        if path not in shapes_a:
            raise ValueError(
                f"{name_a} and {name_b} differ in structure: path {path_str(path)!r} is in "
                f"{name_b} but not in {name_a}"
            )
    if jax.tree.structure(a) != jax.tree.structure(b):
        # Same paths but different container types (e.g. dict vs list): tree.map would fail.
        raise ValueError(
            f"{name_a} and {name_b} have the same paths but different container types: "
            f"{jax.tree.structure(a)} vs {jax.tree.structure(b)}"
        )


def _as_index(key: Hashable) -> int | None:
    """The list index a key stands for, or None. Digit strings count (restored checkpoints)."""
    if isinstance(key, bool):
        return None
    if isinstance(key, int):
        return key
    if isinstance(key, str) and key.isdigit():
        return int(key)
    return None


def _block_id(path: Path) -> tuple[Path, tuple[int, ...]] | None:
    """``(container, index run)`` of a path's block, or None when it holds no index."""
    for i, key in enumerate(path):
        if _as_index(key) is None:
            continue
        run = []
        for k in path[i:]:
            index = _as_index(k)
            if index is None:
                break
            run.append(index)
        return path[:i], tuple(run)
    return None


def block_depths(
    params: PyTree, *, depth_fn: Callable[[Path], int] | None = None
) -> tuple[PyTree, int]:
    """Depth ``ℓ`` of the residual / sequential block each parameter belongs to.

    Blocks are read off the paths, for any of clax's model families:

    * The first path position holding an int (a list index, as ``nnx.to_pure_dict`` writes
      them; digit strings such as ``"0"`` from a restored checkpoint count too) marks a
      block. The run of consecutive ints starting there is the block id, so ResNet's
      ``stages/s/b`` gives ``(s, b)``; ints further down, after a name, are inside the block.
    * Block ids are numbered ``0..L-1`` in lexicographic order: MLP ``layers/0..n-1``,
      SmallCNN ``convs/0..``, ResNet-18's eight BasicBlocks ``(0,0)..(3,1)`` -> ``0..7``,
      TinyViT ``blocks/0..depth-1``.
    * If several containers hold indices (e.g. ``encoder/0`` and ``decoder/0``), the
      container is part of the block id and containers are ordered by first appearance in
      JAX's flatten order (dict keys sorted, as ``nnx.to_pure_dict`` also sorts them): all
      blocks of the first container, then all of the next.
    * Parameters with no index in their path (head, stem, embeddings, final norm) are
      outside every block and get depth :data:`OUTSIDE` (``-1``; ``None`` cannot be a
      pytree leaf).

    Args:
        params: Parameter tree.
        depth_fn: Optional override ``depth_fn(path) -> int`` returning ``ℓ >= 0`` or ``-1``
            for a path given as a tuple of plain keys (``path_str`` renders it). ``L`` is
            then ``max ℓ + 1``.

    Returns:
        ``(depth_tree, num_blocks)``: a tree shaped like ``params`` with int leaves, and
        ``L``.

    Raises:
        ValueError: If no parameter lies in a block (naming the paths), or ``depth_fn``
            returns something other than an int ``>= -1``.
    """
    leaves, treedef = _leaves_with_paths(params)
    if not leaves:
        raise ValueError("cannot derive layer depth: params has no leaves")
    if depth_fn is not None:
        depths = []
        for path, _ in leaves:
            depth = depth_fn(path)
            if isinstance(depth, bool) or not isinstance(depth, int) or depth < OUTSIDE:
                raise ValueError(
                    f"depth_fn must return an int >= {OUTSIDE} (-1 = outside blocks); got "
                    f"{depth!r} for path {path_str(path)!r}"
                )
            depths.append(depth)
        num_blocks = max(depths) + 1
        if num_blocks == 0:
            raise ValueError(
                "cannot derive layer depth: depth_fn put every parameter outside blocks (-1); "
                f"paths: {_format_paths([p for p, _ in leaves])}"
            )
        return jax.tree_util.tree_unflatten(treedef, depths), num_blocks

    ids = [_block_id(path) for path, _ in leaves]
    containers: list[Path] = []
    for block in ids:
        if block is not None and block[0] not in containers:
            containers.append(block[0])
    if not containers:
        raise ValueError(
            "cannot derive layer depth: no parameter path contains a block index; pass "
            f"depth_fn. paths: {_format_paths([p for p, _ in leaves])}"
        )
    order = {c: i for i, c in enumerate(containers)}
    keys = [None if b is None else (order[b[0]], *b[1]) for b in ids]
    numbered = {k: i for i, k in enumerate(sorted({k for k in keys if k is not None}))}
    depths = [OUTSIDE if k is None else numbered[k] for k in keys]
    return jax.tree_util.tree_unflatten(treedef, depths), len(numbered)


def label_params(
    params: PyTree, rules: Sequence[tuple[str, str]], *, default: str | None = None
) -> PyTree:
    """Labels every leaf by the first matching regex rule (for ``optax.partition``).

    Leaf ``path`` gets ``label`` of the first ``(pattern, label)`` in ``rules`` with
    ``re.search(pattern, path_str(path))``; a leaf matching no rule gets ``default``.

    Args:
        params: Parameter tree.
        rules: ``(pattern, label)`` pairs, tried in order.
        default: Label of unmatched leaves; ``None`` makes an unmatched leaf an error.

    Returns:
        A tree shaped like ``params`` with ``str`` leaves.

    Raises:
        ValueError: If a rule is not a ``(str pattern, str label)`` pair or its pattern does
            not compile, or (with ``default=None``) listing the paths no rule matches.
    """
    if isinstance(rules, (str, bytes)) or not isinstance(rules, Sequence):
        raise ValueError(f"rules must be a sequence of (pattern, label) pairs, got {rules!r}")
    compiled = []
    for i, rule in enumerate(rules):
        if (
            not isinstance(rule, (tuple, list))
            or len(rule) != 2
            or not all(isinstance(x, str) for x in rule)
        ):
            raise ValueError(f"rules[{i}] must be a (pattern: str, label: str) pair, got {rule!r}")
        try:
            compiled.append((re.compile(rule[0]), rule[1]))
        except re.error as e:
            raise ValueError(f"rules[{i}] pattern {rule[0]!r} is not a valid regex: {e}") from e
    if default is not None and not isinstance(default, str):
        raise ValueError(f"default must be a str label or None, got {default!r}")

    leaves, treedef = _leaves_with_paths(params)
    labels, unmatched = [], []
    for path, _ in leaves:
        name = path_str(path)
        label = next((lab for pattern, lab in compiled if pattern.search(name)), default)
        if label is None:
            unmatched.append(path)
        labels.append(label)
    if unmatched:
        raise ValueError(
            f"{len(unmatched)} parameter path(s) match no rule and default is None: "
            f"{_format_paths(unmatched)}"
        )
    return jax.tree_util.tree_unflatten(treedef, labels)


def head_backbone_labels(params: PyTree, *, head_pattern: str = r"^head/") -> PyTree:
    """Labels leaves ``"head"`` (path matches ``head_pattern``) or ``"backbone"``.

    For per-group optimizers such as SLCA's slow learner (backbone lr = lr / 100):
    ``optax.partition({"head": sgd(lr), "backbone": sgd(lr / 100)}, labels)``.

    Args:
        params: Parameter tree.
        head_pattern: Regex searched in ``path_str(path)``.

    Returns:
        A tree shaped like ``params`` with ``"head"`` / ``"backbone"`` leaves.

    Raises:
        ValueError: If ``head_pattern`` matches no path (listing the paths).
    """
    labels = label_params(params, [(head_pattern, "head")], default="backbone")
    if "head" not in jax.tree.leaves(labels):
        # All-backbone labels would silently give the head the backbone's learning rate.
        raise ValueError(
            f"head_pattern {head_pattern!r} matches no parameter path; paths: "
            f"{_format_paths([p for p, _ in _leaves_with_paths(params)[0]])}"
        )
    return labels
