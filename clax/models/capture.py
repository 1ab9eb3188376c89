"""Capture the inputs of Linear/Conv layers during a forward pass, and conv patch extraction.

Methods such as Gradient Projection Memory need each layer's *input* activations, which
``nnx.capture`` does not expose (it records sown values and method outputs only). Here the
``__call__`` of the chosen layer classes is wrapped for the duration of one forward pass.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from clax.models.heads import MultiHeadLinear

Path = tuple[Any, ...]

DEFAULT_LAYER_TYPES: tuple[type[nnx.Module], ...] = (nnx.Linear, nnx.Conv, MultiHeadLinear)

# Serialises captures: patching is process-global, and overlapping captures in two threads
# could restore class methods out of order and leave a wrapper installed.
_PATCH_LOCK = threading.RLock()


def _first_input(args: tuple, kwargs: dict) -> Any:
    if args:
        return args[0]
    for name in ("inputs", "x"):
        if name in kwargs:
            return kwargs[name]
    raise TypeError("captured layer was called without an input argument")


def capture_layer_inputs(
    model: nnx.Module,
    x: jax.Array,
    task_ids: jax.Array | None = None,
    *,
    layer_types: Sequence[type[nnx.Module]] = DEFAULT_LAYER_TYPES,
) -> tuple[jax.Array, dict[Path, jax.Array]]:
    """Runs ``model(x, task_ids)`` and records the input of every matching layer it calls.

    Each layer is keyed by its path in the module graph, the same tuple that prefixes its
    parameters in ``nnx.state(model, nnx.Param)``: ``("layers", 0)`` for ``layers/0/kernel``,
    so ``kernel`` sits at ``path + ("kernel",)``. Inputs are recorded as given (``(B, D)``
    for an MLP Linear, ``(B, N, D)`` for a ViT token Linear, ``(B, H, W, C)`` for a Conv; use
    :func:`conv_patches` to turn conv inputs into per-position patch rows). A layer called
    several times gets its inputs concatenated along axis 0 in call order. Layers of the
    given types that the call never reaches are absent. Eagerly the dict is ordered by first
    call; returned from ``jax.jit`` its keys come back sorted (JAX sorts dict keys, so paths
    must be comparable: a ``str`` and an ``int`` at the same tuple position are not).

    Works on eager and traced arrays: call it inside ``jax.jit`` (e.g. on a model rebuilt with
    ``nnx.merge``) or ``nnx.jit`` and return the dict. The forward pass is a normal one, so
    BatchNorm layers in training mode update their running statistics.

    Implementation: instances are matched by ``id()`` against a map built from
    ``nnx.iter_graph(model)``, and the ``__call__`` of every class in their MRO that defines
    one (and is a subclass of a requested type) is wrapped until the call returns or raises.
    A re-entrancy guard keeps a subclass that calls ``super().__call__`` from recording twice.

    Thread safety: the patch is process-global, not thread-local. Captures are serialised by
    a module lock; other threads that call these layer classes while a capture runs go
    through the wrapper (a dict lookup; it records only the captured model's layers). Code
    that itself swaps ``__call__`` on these classes concurrently is not supported.

    Args:
        model: The model; called as ``model(x, task_ids)`` (or ``model(x)`` if ``task_ids``
            is None).
        x: Model input.
        task_ids: Optional task ids forwarded to the model.
        layer_types: Module classes whose inputs are recorded (subclasses included).

    Returns:
        ``(logits, inputs)`` where ``inputs`` maps layer path to its input array.

    Raises:
        ValueError: If ``layer_types`` is empty or holds something that is not an
            ``nnx.Module`` subclass, or if a layer called several times received inputs whose
            trailing shapes differ (they cannot be concatenated).
    """
    layer_types = tuple(layer_types) if isinstance(layer_types, (list, tuple)) else (layer_types,)
    if not layer_types or not all(
        isinstance(t, type) and issubclass(t, nnx.Module) for t in layer_types
    ):
        raise ValueError(
            f"layer_types must be a non-empty tuple of nnx.Module subclasses, got {layer_types!r}"
        )

    # id -> path for every matching layer; iter_graph visits shared modules once, under the
    # same first path that nnx.state uses for their params.
    paths: dict[int, Path] = {}
    layer_classes: set[type] = set()
    for path, node in nnx.iter_graph(model):
        if isinstance(node, layer_types) and id(node) not in paths:
            paths[id(node)] = tuple(path)
            layer_classes.add(type(node))

    records: dict[Path, list[Any]] = {}
    active: set[int] = set()  # ids of layers whose call is in progress (re-entrancy guard)

    def make_wrapper(original: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(original)
        def wrapper(self, *args, **kwargs):
            key = id(self)
            path = paths.get(key)
            if path is None or key in active:
                return original(self, *args, **kwargs)
            records.setdefault(path, []).append(_first_input(args, kwargs))
            active.add(key)
            try:
                return original(self, *args, **kwargs)
            finally:
                active.discard(key)

        return wrapper

    # Patch the class that supplies __call__ for each matched instance, and every parent
    # implementation a subclass may reach through super() (the guard prevents double counts).
    to_patch: list[type] = []
    for cls in layer_classes:
        for base in cls.__mro__:
            if "__call__" in base.__dict__ and issubclass(base, layer_types):
                if base not in to_patch:
                    to_patch.append(base)

    with _PATCH_LOCK:
        originals: dict[type, Any] = {}
        try:
            for cls in to_patch:
                originals[cls] = cls.__dict__["__call__"]
                cls.__call__ = make_wrapper(originals[cls])
            logits = model(x) if task_ids is None else model(x, task_ids)
        finally:
            for cls, original in originals.items():
                cls.__call__ = original

    inputs: dict[Path, jax.Array] = {}
    for path, arrays in records.items():
        if len(arrays) == 1:
            inputs[path] = arrays[0]
            continue
        shapes = {tuple(jnp.shape(a)[1:]) for a in arrays}
        if len(shapes) != 1:
            raise ValueError(
                f"layer {path} was called {len(arrays)} times with inputs of differing trailing "
                f"shapes {sorted(shapes)}; they cannot be concatenated along axis 0"
            )
        inputs[path] = jnp.concatenate(arrays, axis=0)
    return logits, inputs


def _pair(name: str, value: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    if (
        not isinstance(value, Sequence)
        or len(value) != 2
        or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in value)
    ):
        raise ValueError(f"{name} must be a positive int or a pair of them, got {value!r}")
    return tuple(value)  # type: ignore[return-value]


def _padding(padding: str | int | Sequence[Any]) -> str | list[tuple[int, int]]:
    if isinstance(padding, str):
        if padding.upper() not in ("SAME", "VALID"):
            raise ValueError(f"padding must be 'SAME', 'VALID', an int or pairs, got {padding!r}")
        return padding.upper()
    if isinstance(padding, int) and not isinstance(padding, bool) and padding >= 0:
        return [(padding, padding)] * 2
    try:
        pads = [(int(lo), int(hi)) for lo, hi in padding]  # type: ignore[union-attr]
    except (TypeError, ValueError):
        pads = []
    if len(pads) != 2 or any(p < 0 for pair in pads for p in pair):
        raise ValueError(
            "padding must be 'SAME', 'VALID', a non-negative int or two (low, high) pairs, "
            f"got {padding!r}"
        )
    return pads


def conv_patches(
    x: jax.Array,
    kernel_size: int | Sequence[int],
    *,
    strides: int | Sequence[int] = 1,
    padding: str | int | Sequence[Any] = "SAME",
) -> jax.Array:
    """Extracts conv patches so that a conv is a matmul with the reshaped Flax kernel.

    ``conv_patches(x, k, strides=s, padding=p) @ kernel.reshape(-1, C_out)`` equals
    ``nnx.Conv(..., kernel_size=k, strides=s, padding=p, use_bias=False)(x)`` for a Flax
    kernel of shape ``(kh, kw, C_in, C_out)``: the last axis is ordered ``(kh, kw, C_in)``
    (row-major), unlike ``lax.conv_general_dilated_patches``, which is channel-major.
    Kernel/input dilation and feature groups are not supported.

    Args:
        x: Images ``(B, H, W, C)``.
        kernel_size: ``k`` or ``(kh, kw)``.
        strides: ``s`` or ``(sh, sw)``.
        padding: ``"SAME"``, ``"VALID"``, an int (symmetric) or ``((lo, hi), (lo, hi))``, as
            in Flax.

    Returns:
        Patches of shape ``(B, H', W', kh * kw * C)``.

    Raises:
        ValueError: On a malformed argument.
    """
    if jnp.ndim(x) != 4:
        raise ValueError(f"x must have shape (B, H, W, C), got {jnp.shape(x)}")
    kh, kw = _pair("kernel_size", kernel_size)
    strides = _pair("strides", strides)
    pad = _padding(padding)
    c = x.shape[-1]
    patches = jax.lax.conv_general_dilated_patches(
        x,
        filter_shape=(kh, kw),
        window_strides=strides,
        padding=pad,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=jax.lax.Precision.HIGHEST,  # identity-filter conv: keep values exact
    )
    b, h_out, w_out, _ = patches.shape
    # Patch features come out channel-major (C, kh, kw); reorder to Flax's (kh, kw, C).
    patches = patches.reshape(b, h_out, w_out, c, kh, kw).transpose(0, 1, 2, 4, 5, 3)
    return patches.reshape(b, h_out, w_out, kh * kw * c)
