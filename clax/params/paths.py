"""Parameter paths: readable names, block depths and regex labels for parameter trees.

Parameters are plain nested dicts from ``nnx.to_pure_dict`` with int keys for list indices,
e.g. ``{"layers": {0: {"kernel": ..., "bias": ...}}, "head": {...}}``. A *path* is the tuple
of keys from the root to a leaf, e.g. ``("layers", 0, "kernel")``; :func:`path_str` renders
it as ``"layers/0/kernel"``. Every function here also accepts the key-path entries of
``jax.tree_util`` (``DictKey``, ``SequenceKey``, ``GetAttrKey``, ``FlattenedIndexKey``) and
any other pytree container (lists, tuples, NamedTuples), so optimizer states work too.

``nnx.State`` trees (``nnx.state(model, nnx.Param)``, or the state ``nnx.Optimizer`` hands
to optax) are read like the pure dicts: a leaf wrapped in an ``nnx.Variable`` flattens to
the path of the variable followed by ``.value``, and :func:`plain_path` drops that trailing
``value`` entry, so ``"layers/0/kernel"`` names the same parameter in both forms.
:func:`align_to` reorders any such tree into another's structure by these paths (and
selects, from a tree over every parameter, the part an ``optax.partition`` hands a
transform: :func:`masked_paths`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx

from clax.typing import Path, PyTree

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


# Attribute under which an nnx.Variable flattens its array (`raw_value` in older flax).
_VARIABLE_VALUE_KEYS = ("value", "raw_value")


def _is_variable_value(entry: Any) -> bool:
    return (isinstance(entry, jax.tree_util.GetAttrKey)
            and entry.name in _VARIABLE_VALUE_KEYS)


def plain_path(path: Sequence[Any]) -> Path:
    """The path as plain keys: ``(DictKey("layers"), DictKey(0))`` -> ``("layers", 0)``.

    A trailing ``GetAttrKey("value")`` (how an ``nnx.Variable`` such as ``nnx.Param``
    flattens its array) is dropped, so a leaf of ``nnx.state(model, nnx.Param)`` and the
    same leaf of ``nnx.to_pure_dict(...)`` have the same path.
    """
    if path and _is_variable_value(path[-1]):
        path = path[:-1]
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


def _is_nnx(x: Any) -> bool:
    return isinstance(x, (nnx.Variable, nnx.State))


def _variable_value(v: nnx.Variable) -> Any:
    return v.get_value() if hasattr(v, "get_value") else v.value


def pure_tree(tree: PyTree) -> PyTree:
    """`tree` with every ``nnx.State`` made a nested dict and every ``nnx.Variable`` its value.

    ``nnx.to_pure_dict`` for any tree that may hold NNX containers anywhere (a NamedTuple
    of states, a dict of variables); other containers and leaves are kept as they are
    (the same array objects: this copies nothing).
    """

    def convert(x: Any) -> Any:
        if isinstance(x, nnx.Variable):
            return pure_tree(_variable_value(x))
        if isinstance(x, nnx.State):
            return {k: pure_tree(v) for k, v in x.items()}
        return x

    return jax.tree.map(convert, tree, is_leaf=_is_nnx)


def strip_variables(tree: PyTree) -> PyTree:
    """`tree` with every ``nnx.Variable`` replaced by its value; containers (an
    ``nnx.State`` included) are kept, as ``nnx.Optimizer`` passes them to optax."""
    return jax.tree.map(lambda x: _variable_value(x) if isinstance(x, nnx.Variable) else x,
                        tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def leaves_by_path(tree: PyTree, is_leaf: Callable[[Any], bool] | None = None
                   ) -> dict[Path, Any]:
    """``{plain path: leaf}`` of `tree`, in flatten order (``nnx`` wrappers see through).

    ``is_leaf`` is passed to the flattening (e.g. ``lambda x: x is None`` keeps ``None``
    entries)."""
    pairs = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]
    return {plain_path(p): leaf for p, leaf in pairs}


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(getattr(x, "shape", np.shape(x)))


def _kind(x: Any) -> str:
    """How a node of a tree is called in an error message."""
    if isinstance(x, nnx.Variable):
        return f"an nnx.{type(x).__name__} wrapper"
    if isinstance(x, nnx.State):
        return "an nnx.State"
    if x is None:
        return "None"
    if isinstance(x, tuple) and hasattr(x, "_fields"):
        return f"a {type(x).__name__}"
    if isinstance(x, (dict, list, tuple)):
        return f"a {type(x).__name__}"
    if jax.tree_util.treedef_is_leaf(jax.tree.structure(x)):
        return "an array" if hasattr(x, "shape") else f"a {type(x).__name__} leaf"
    return f"a {type(x).__name__}"


def _children(x: Any) -> list[tuple[Hashable, Any]]:
    """``(key, child)`` one level down (empty for a leaf)."""
    if jax.tree_util.treedef_is_leaf(jax.tree.structure(x)):
        return []
    pairs = jax.tree_util.tree_flatten_with_path(x, is_leaf=lambda y: y is not x)[0]
    return [(_key(p[0]) if p else None, c) for p, c in pairs]


def _first_kind_difference(a: Any, b: Any, path: tuple = ()) -> tuple[Path, Any, Any] | None:
    """The first path (flatten order of `a`) where the two trees' nodes differ in type."""
    if type(a) is not type(b):
        return path, a, b
    kids_b = dict(_children(b))
    kids_a = _children(a)
    if len(kids_a) != len(kids_b) or any(k not in kids_b for k, _ in kids_a):
        return path, a, b  # same type, different keys (e.g. an empty subtree in one)
    for k, child in kids_a:
        found = _first_kind_difference(child, kids_b[k], path + (k,))
        if found is not None:
            return found
    return None


def _where(path: Path) -> str:
    return f"at path {path_str(path)!r}" if path else "at the root"


def describe_container_difference(a: PyTree, b: PyTree, names: tuple[str, str] = ("a", "b")
                                  ) -> str:
    """Words for how two trees with the same leaf paths differ in their containers.

    E.g. ``"anchor holds an nnx.Param wrapper at path 'layers/0/kernel' where params holds
    an array; pass plain arrays: nnx.to_pure_dict(state) or nnx.pure(state)"``.
    """
    name_a, name_b = names
    found = _first_kind_difference(a, b)
    if found is None:
        return f"{name_a} and {name_b} differ in their tree structure"
    path, node_a, node_b = found
    if type(node_a) is type(node_b):
        keys_a = sorted(map(str, dict(_children(node_a))))
        keys_b = sorted(map(str, dict(_children(node_b))))
        return (f"{name_a} and {name_b} differ {_where(path)}: {name_a} has "
                f"{_kind(node_a)} with keys {keys_a}, {name_b} with keys {keys_b}")
    text = (f"{name_a} holds {_kind(node_a)} {_where(path)} where {name_b} holds "
            f"{_kind(node_b)}")
    for name, tree in zip(names, (a, b), strict=True):
        wrappers = _variable_types(tree)
        if wrappers:
            return (f"{text}; {name} holds {' and '.join(wrappers)} wrappers: pass plain "
                    "arrays, nnx.to_pure_dict(state) (or nnx.pure(state))")
    if isinstance(node_a, nnx.State) or isinstance(node_b, nnx.State):
        text += "; pass both as nested dicts: nnx.to_pure_dict(state)"
    return text


def _variable_types(tree: PyTree) -> list[str]:
    """``["nnx.Param", ...]``: the Variable types `tree` holds, in flatten order."""
    found: list[str] = []
    for leaf in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, nnx.Variable)):
        if isinstance(leaf, nnx.Variable) and f"nnx.{type(leaf).__name__}" not in found:
            found.append(f"nnx.{type(leaf).__name__}")
    return found


def _check_paths(leaves_a: dict, leaves_b: dict, names: tuple[str, str], check_shapes: bool
                 ) -> None:
    name_a, name_b = names
    # Walk both in flatten order so "first" means the same as in the trees.
    for path, x in leaves_a.items():
        if path not in leaves_b:
            raise ValueError(
                f"{name_a} and {name_b} differ in structure: path {path_str(path)!r} is in "
                f"{name_a} but not in {name_b}"
            )
        if check_shapes and _shape(x) != _shape(leaves_b[path]):
            raise ValueError(
                f"{name_a} and {name_b} differ at path {path_str(path)!r}: shape "
                f"{_shape(x)} vs {_shape(leaves_b[path])}"
            )
    for path in leaves_b:
        if path not in leaves_a:
            raise ValueError(
                f"{name_a} and {name_b} differ in structure: path {path_str(path)!r} is in "
                f"{name_b} but not in {name_a}"
            )


def check_same_paths(a: PyTree, b: PyTree, names: tuple[str, str] = ("a", "b"), *,
                     check_shapes: bool = True) -> None:
    """Like :func:`check_same_structure` but containers may differ: only the leaf paths
    (and shapes) must agree, so an ``nnx.State`` (of ``nnx.Param`` or of arrays) matches
    the pure dict with the same parameters."""
    _check_paths(leaves_by_path(a), leaves_by_path(b), names, check_shapes)


def check_same_structure(a: PyTree, b: PyTree, names: tuple[str, str] = ("a", "b")) -> None:
    """Checks that two trees have the same paths and the same leaf shapes.

    Dtypes may differ (e.g. a float32 average of bfloat16 parameters).

    Args:
        a: First tree.
        b: Second tree.
        names: How the two trees are called in the error message.

    Raises:
        ValueError: Naming the first path present in one tree and not the other, the
            first path whose leaf shapes differ, or (same paths, different containers) the
            first path where the containers differ and how (e.g. ``nnx.Param`` wrappers in
            one, plain arrays in the other; an ``nnx.State`` and a dict).
    """
    check_same_paths(a, b, names)
    if jax.tree.structure(a) != jax.tree.structure(b):
        # Same paths but different container types (e.g. dict vs list): tree.map would fail.
        raise ValueError(describe_container_difference(a, b, names))


def masked_paths(tree: PyTree) -> list[Path]:
    """Plain paths of the ``optax.MaskedNode`` nodes of `tree`, in flatten order.

    ``optax.masked`` and ``optax.partition`` (so :func:`clax.params.train_only`) hand their
    inner transform the params and updates with a ``MaskedNode`` (a container with no
    leaves) in place of every leaf (or subtree) it does not see: these are those places.
    """
    pairs = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: isinstance(x, optax.MaskedNode))[0]
    return [plain_path(p) for p, x in pairs if isinstance(x, optax.MaskedNode)]


def is_masked(path: Sequence[Any] | str, masked: Sequence[Path] | frozenset[str]) -> bool:
    """Whether `path` (a path, or its :func:`path_str`) is at or below one of `masked`.

    `masked`: paths (as :func:`masked_paths` gives them), or the frozenset of their
    :func:`path_str` names (faster when asking about many paths)."""
    prefixes = masked if isinstance(masked, frozenset) else frozenset(
        path_str(m) for m in masked)
    if not prefixes:
        return False
    if "" in prefixes:  # the whole tree is masked
        return True
    name = path if isinstance(path, str) else path_str(path)
    parts = name.split("/")
    return any("/".join(parts[:i]) in prefixes for i in range(1, len(parts) + 1))


_EXTRA = ("error", "drop")
_MISSING = ("error", "masked")


def align_to(tree: PyTree, like: PyTree, names: tuple[str, str] = ("tree", "like"), *,
             check_shapes: bool = True, extra: str = "error", missing: str = "error",
             is_leaf: Callable[[Any], bool] | None = None) -> PyTree:
    """The leaves of `tree` in the structure of `like`, matched by path.

    Containers may differ (a pure dict against the ``nnx.State`` that ``nnx.Optimizer``
    passes to optax, ``nnx.Param`` wrappers against arrays); the leaf objects are reused.

    Masked trees. Inside ``optax.partition`` / :func:`clax.params.train_only` a transform
    sees only the trainable leaves, the others replaced by ``optax.MaskedNode``; a tree kept
    over *every* parameter (a method's memory: a Fisher, an anchor, bases) is then aligned
    to the trainable part. Paths of `tree` at or below a ``MaskedNode`` of `like` are
    always dropped (`like` says they are left out on purpose); the result keeps `like`'s
    ``MaskedNode`` there.

    Args:
        tree: The tree whose leaves are taken.
        like: The reference structure.
        names: How `tree` and `like` are called in error messages.
        check_shapes: Also require equal leaf shapes on matched paths.
        extra: What to do with the other paths of `tree` that `like` lacks: ``"error"``
            (raise, naming the first) or ``"drop"`` (leave them out: `tree` may cover more
            than `like`, e.g. memory over all parameters against the updates of an
            ``nnx.Optimizer`` with a ``wrt`` filter; every path of `like` still needs a
            leaf of `tree`).
        missing: What to do with paths of `like` that `tree` lacks: ``"error"`` (raise,
            naming the first) or ``"masked"`` (where `tree` holds a ``MaskedNode`` at or
            above the path, take `like`'s own leaf: e.g. the full params overlaid with a
            masked transform's state; raise elsewhere).
        is_leaf: Passed to the flattening of both trees (e.g. to keep ``None`` or
            ``SubspaceBasis`` entries as leaves; then pass ``check_shapes=False``).

    Returns:
        A tree with the structure of `like`.

    Raises:
        ValueError: A path in one tree and not the other (within `extra` and `missing`),
            or (``check_shapes``) a shape difference, naming the path.
    """
    if extra not in _EXTRA:
        raise ValueError(f"extra must be one of {_EXTRA}, got {extra!r}")
    if missing not in _MISSING:
        raise ValueError(f"missing must be one of {_MISSING}, got {missing!r}")
    pairs, treedef = jax.tree_util.tree_flatten_with_path(like, is_leaf=is_leaf)
    have = leaves_by_path(tree, is_leaf)
    want = {plain_path(p): leaf for p, leaf in pairs}
    like_masked = frozenset(path_str(m) for m in masked_paths(like))
    tree_masked = (frozenset(path_str(m) for m in masked_paths(tree)) if missing == "masked"
                   else frozenset())
    if extra == "drop" or like_masked:
        have_checked = {path: x for path, x in have.items() if path in want or (
            extra == "error" and not is_masked(path, like_masked))}
    else:
        have_checked = have
    if missing == "masked" and tree_masked:
        want_checked = {path: x for path, x in want.items()
                        if path in have or not is_masked(path, tree_masked)}
    else:
        want_checked = want
    # Report the reference tree first: "path 'x' is in params but not in anchor".
    _check_paths(want_checked, have_checked, (names[1], names[0]), check_shapes)
    return jax.tree_util.tree_unflatten(
        treedef, [have.get(path, leaf) for path, leaf in want.items()])


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
        TypeError: If ``depth_fn`` returns something other than an int (naming the path).
        ValueError: If no parameter lies in a block (naming the paths), or ``depth_fn``
            returns an int ``< -1``.
    """
    leaves, treedef = _leaves_with_paths(params)
    if not leaves:
        raise ValueError("cannot derive layer depth: params has no leaves")
    if depth_fn is not None:
        depths = []
        for path, _ in leaves:
            depth = depth_fn(path)
            if isinstance(depth, bool) or not isinstance(depth, int) or depth < OUTSIDE:
                error = ValueError if isinstance(depth, int) and not isinstance(depth, bool) \
                    else TypeError
                raise error(
                    f"depth_fn must return an int >= {OUTSIDE} (-1 = outside blocks); got "
                    f"{depth!r} ({type(depth).__name__}) for path {path_str(path)!r}"
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
        TypeError: If ``rules`` is not a sequence, a rule is not a tuple/list of strings, or
            ``default`` is neither a str nor None.
        ValueError: If a rule is not a pair or its pattern does not compile, or (with
            ``default=None``) listing the paths no rule matches.
    """
    if isinstance(rules, (str, bytes)) or not isinstance(rules, Sequence):
        raise TypeError(f"rules must be a sequence of (pattern, label) pairs, got {rules!r} "
                        f"({type(rules).__name__})")
    compiled = []
    for i, rule in enumerate(rules):
        what = f"rules[{i}] must be a (pattern: str, label: str) pair, got {rule!r}"
        if not isinstance(rule, (tuple, list)) or not all(isinstance(x, str) for x in rule):
            raise TypeError(what)
        if len(rule) != 2:
            raise ValueError(what)
        try:
            compiled.append((re.compile(rule[0]), rule[1]))
        except re.error as e:
            raise ValueError(f"rules[{i}] pattern {rule[0]!r} is not a valid regex: {e}") from e
    if default is not None and not isinstance(default, str):
        raise TypeError(f"default must be a str label or None, got {default!r} "
                        f"({type(default).__name__})")

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
