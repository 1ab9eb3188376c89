"""Layer taps: record each parameter-owning module's inputs and perturb its outputs.

The exact per-example Fisher needs, for every module that owns parameters, its input ``a``
and the gradient ``δ`` of the summed loss with respect to its output. ``δ`` is obtained as
the gradient with respect to a zero perturbation added to the output (the "perturbation
trick"); because the summed loss is a sum of per-example losses and examples do not
interact (evaluation mode), row ``i`` of ``δ`` is ``∂ℓ_i / ∂out_i``.

Modules are tapped by wrapping the ``__call__`` of their classes for the duration of one
forward pass, as :func:`clax.models.capture.capture_layer_inputs` does (and under the same
lock, so the two never interleave their patches).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Hashable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from clax.models.capture import _PATCH_LOCK  # one lock for every class-level patch

Path = tuple[Hashable, ...]
PyTree = Any


@dataclasses.dataclass
class Call:
    """One recorded call of a tapped module (static part; arrays travel separately)."""

    treedef: Any  # of (args, kwargs)
    static: list[Any]  # leaf values that are not arrays (None for array leaves)
    is_array: list[bool]
    batched: list[bool]  # array leaf whose leading axis is the batch axis


def _classes_to_patch(modules: list[nnx.Module]) -> list[type]:
    out: list[type] = []
    for node in modules:
        for cls in type(node).__mro__:
            if "__call__" in cls.__dict__ and issubclass(cls, nnx.Module) and cls not in out:
                out.append(cls)
    return out


def tapped_call(
    model: nnx.Module,
    run: Callable[[], Any],
    targets: dict[int, Path],
    on_call: Callable[[Path, tuple, dict, Any], Any],
) -> Any:
    """Runs ``run()`` with the modules whose ids are in `targets` tapped.

    Every outermost call of a target module ``m`` (a subclass calling ``super().__call__``
    is recorded once) goes through ``on_call(path, args, kwargs, output) -> output``, whose
    return value replaces the module's output.
    """
    nodes = {id(n): n for _, n in nnx.iter_graph(model) if id(n) in targets}
    active: set[int] = set()

    def make_wrapper(original: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(original)
        def wrapper(self, *args, **kwargs):
            key = id(self)
            path = targets.get(key)
            if path is None or key in active:
                return original(self, *args, **kwargs)
            active.add(key)
            try:
                out = original(self, *args, **kwargs)
            finally:
                active.discard(key)
            return on_call(path, args, kwargs, out)

        return wrapper

    with _PATCH_LOCK:
        originals: dict[type, Any] = {}
        try:
            for cls in _classes_to_patch(list(nodes.values())):
                originals[cls] = cls.__dict__["__call__"]
                cls.__call__ = make_wrapper(originals[cls])
            return run()
        finally:
            for cls, original in originals.items():
                cls.__call__ = original


def split_call(args: tuple, kwargs: dict, batch: int) -> tuple[Call, list[jax.Array]]:
    """Separates a call's array leaves (returned) from its static structure."""
    leaves, treedef = jax.tree.flatten((args, kwargs))
    is_array = [isinstance(v, (jax.Array, np.ndarray)) for v in leaves]
    batched = [a and jnp.ndim(v) >= 1 and jnp.shape(v)[0] == batch
               for v, a in zip(leaves, is_array, strict=True)]
    static = [None if a else v for v, a in zip(leaves, is_array, strict=True)]
    arrays = [v for v, a in zip(leaves, is_array, strict=True) if a]
    return Call(treedef, static, is_array, batched), arrays


def join_call(call: Call, arrays: list[jax.Array]) -> tuple[tuple, dict]:
    """Inverse of :func:`split_call`."""
    it = iter(arrays)
    leaves = [next(it) if a else s for a, s in zip(call.is_array, call.static, strict=True)]
    return jax.tree.unflatten(call.treedef, leaves)


def param_owners(model: nnx.Module, called: set[Path]) -> dict[Path, list[Path]]:
    """Assigns every parameter to the deepest *called* module whose path prefixes it.

    Returns ``{module path: [parameter paths relative to it]}``. The root (path ``()``) is
    always called, so every parameter gets an owner.
    """
    owners: dict[Path, list[Path]] = {}
    for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        path = tuple(path)
        owner = max((p for p in called if path[: len(p)] == p), key=len)
        owners.setdefault(owner, []).append(path[len(owner):])
    return owners


def local_function(module: nnx.Module, own: list[Path]) -> tuple[Callable, PyTree]:
    """``(f, own_params)`` with ``f(own_params, *args, **kwargs) = module(*args, **kwargs)``.

    ``own_params`` is the pure dict of the parameters at the relative paths `own`; every
    other variable of the module keeps its current value.
    """
    wanted = set(own)

    def own_filter(path, value):
        return isinstance(value, nnx.Param) and tuple(path) in wanted

    graphdef, own_state, rest = nnx.split(module, own_filter, ...)
    rest = nnx.to_pure_dict(rest)

    def f(own_params, *args, **kwargs):
        return nnx.merge(graphdef, own_params, rest)(*args, **kwargs)

    return f, nnx.to_pure_dict(own_state)


def get_path(tree: PyTree, path: Path) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def set_path(tree: dict, path: Path, value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value
