"""Parameter-efficient tuning (LoRA, bottleneck adapters, prompt tokens) as parameter groups.

Each technique is *model surgery* that adds small modules to an existing NNX model, plus a
static mask, :func:`peft_mask`, that marks their parameters as the trainable group. Nothing
else changes: the model stays an ordinary ``nnx.Module`` whose parameters are ordinary
``nnx.Param`` leaves, so clax's methods and training loop run on it unchanged. Freezing is
the optimizer's job, with ``clax.params.train_only(tx, mask)`` (``optax.partition`` with
``set_to_zero``: frozen leaves get an exact zero update and hold no ``tx`` state). This
module is below ``clax.params`` in the package layering, so it provides the mask and
leaves the wrapping to ``train_only``. Two places to put it::

    from clax.params import train_only

    add_lora(model, rank=8, targets=r"blocks/\\d+/attn/(query|value)", rngs=nnx.Rngs(0))
    mask = peft_mask(model, train=("head",))      # LoRA factors + the classifier

    # around the whole chain: the method's transforms see only the trainable leaves
    tx = train_only(method.optimizer(optax.adam(1e-3)), mask)
    # around the base optimizer only: the method's transforms see every leaf
    tx = method.optimizer(train_only(optax.adam(1e-3), mask))

The first is the one to use: every registered method's transforms then run over the
adapter parameters only (EWC's penalty, GPM/CoSO projection with bases on the adapters'
own inputs, A-GEM's dot products, the EMA swapped in at task end), their memory being
matched to the trainable leaves by path (``tests/training/contract_test.py`` trains every
registered method this way and checks the base stays bit-identical). The second also
works; there the transforms see every leaf and the frozen ones get a zero update from the
base optimizer. Memory can be built over the trainable group only
(:func:`trainable_params`: ``gpm_memory(trainable_params(params, mask))``, an EWC Fisher
and anchor restricted the same way) to save the work on the frozen base.

**LoRA** (Hu et al., ICLR 2022). :func:`add_lora` replaces chosen ``nnx.Linear`` layers by
:class:`LoRALinear`, which keeps the original layer as ``base`` (frozen by the mask and
never modified) and adds two plain ``nnx.Linear`` factors without bias:

.. math::
    y = x W + b + s\\,(x A) B, \\qquad A \\in \\mathbb{R}^{d_{in} \\times r},\\;
    B \\in \\mathbb{R}^{r \\times d_{out}},\\; s = \\alpha / r,

``A`` (``lora_a``) initialised like the reference ``peft`` library (PyTorch's
``kaiming_uniform_(a=√5)``: ``U(±1/√d_in)``) and ``B`` (``lora_b``) zero, so the adapted
model starts exactly equal to the base. :func:`merge_lora` folds the update back into a
plain ``nnx.Linear`` with kernel ``W + s·A B``.

Why plain ``nnx.Linear`` factors rather than ``flax.nnx.LoRA``'s raw ``LoRAParam``
arrays: clax's layer-input machinery (:func:`clax.models.capture.capture_layer_inputs`,
hence GPM's and CoSO's bases, per-token Fisher taps and representation collection) keys
every ``nnx.Linear`` by its module path and projects the ``kernel`` at ``path +
("kernel",)``. With the factors as Linear layers, ``lora_a`` gets its basis from the layer
input ``x`` and ``lora_b`` from ``x A`` (its own input), with no special case anywhere;
the frozen ``base`` is captured too (its basis is never used, as its update is zero).

**Bottleneck adapters** (AdaptFormer, Chen et al., NeurIPS 2022; the form APER and MOS
use). :func:`add_adapters` sets the ``mlp_adapter`` hook of every
:class:`~clax.models.vit.TransformerBlock` (any module with an ``mlp_adapter``
attribute) to a :class:`BottleneckAdapter` applied in parallel to the MLP on the residual
stream ``h``:

.. math::
    \\mathrm{out} = h + \\mathrm{MLP}(\\mathrm{LN}(h)) + s\\,\\mathrm{up}(\\mathrm{ReLU}(
    \\mathrm{down}(h))),

``down`` initialised ``U(±1/√dim)`` with zero bias, ``up`` zero (weights and bias) so the
block starts unchanged, and ``s = 0.1`` (AdaptFormer's and PILOT's default scale).

**Prompt tuning** (L2P-style prompt tokens, Wang et al., CVPR 2022). :func:`add_prompt`
sets a model's ``prompt`` hook (:class:`~clax.models.vit.TinyViT` has one) to
:class:`PromptTokens`: ``length`` learned tokens, initialised ``U(-1, 1)`` (L2P's
``prompt_init='uniform'``), inserted after the cls token.

**Parameter groups.** :func:`peft_mask` is ``True`` for every parameter under a module
these functions create, recognised by attribute name in the parameter path: ``lora_a`` /
``lora_b`` (the factors of a :class:`LoRALinear`), ``mlp_adapter`` and ``prompt``, plus any
parameter whose path matches a ``train`` regex. It reads paths only, so it works on an
``nnx.Module``, on ``nnx.state(model, nnx.Param)`` and on the pure-dict parameters of
:meth:`clax.core.ModelFns.split` (the training loop's); :func:`count_params` reports the
trainable and total sizes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from clax._validation import check_positive_int, check_real
from clax.typing import Path, PyTree

__all__ = [
    "ADAPTER_KEYS",
    "BottleneckAdapter",
    "LoRALinear",
    "PromptTokens",
    "add_adapters",
    "add_lora",
    "add_prompt",
    "count_params",
    "is_adapter_path",
    "merge_lora",
    "peft_mask",
    "trainable_params",
]

# Attribute names that mark a parameter as belonging to an adapter group (peft_mask).
ADAPTER_KEYS: tuple[str, ...] = ("lora_a", "lora_b", "mlp_adapter", "prompt")

# PyTorch's kaiming_uniform_(w, a=sqrt(5)) on a (out, in) weight, the init of peft's lora_A
# and of nn.Linear: gain² = 2/(1+a²) = 1/3, bound = √3·gain/√fan_in = 1/√fan_in. As a Flax
# variance_scaling: bound = √(3·scale/fan_in), so scale = 1/3 ("fan_in" = in features of
# the (in, out) kernel).
_kaiming_uniform_sqrt5 = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


# --------------------------------------------------------------------------------------
# Helpers


def _check_positive_real(name: str, value: Any) -> float:
    return check_real(name, value, 0.0, math.inf, low_open=True, high_open=True)


def _compile(name: str, pattern: Any) -> re.Pattern:
    if not isinstance(pattern, str):
        raise TypeError(f"{name} must be a regex str, got {pattern!r} ({type(pattern).__name__})")
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ValueError(f"{name} {pattern!r} is not a valid regex: {e}") from e


def _key(entry: Any) -> Any:
    """A plain key (str / int) from a jax key-path entry."""
    for attr in ("key", "idx", "name"):
        if hasattr(entry, attr):
            return getattr(entry, attr)
    return entry


def _path_str(path: Path) -> str:
    return "/".join(str(k) for k in path)


def _modules(model: nnx.Module) -> list[tuple[Path, nnx.Module]]:
    """``(path, module)`` of every submodule (root excluded), sorted by path; modules inside
    a :class:`LoRALinear` (its ``base`` and factors) are left out: they are not layers a
    user targets."""
    found = [(tuple(path), node) for path, node in nnx.iter_graph(model)
             if path and isinstance(node, nnx.Module)]
    # iter_graph yields children before their parent, so find the LoRALinears first.
    lora = [p for p, node in found if isinstance(node, LoRALinear)]
    out = [(p, node) for p, node in found
           if not any(len(p) > len(q) and p[: len(q)] == q for q in lora)]
    return sorted(out, key=lambda item: tuple((1, k) if isinstance(k, str) else (0, k)
                                              for k in item[0]))


def _has_own_params(module: nnx.Module) -> bool:
    return any(isinstance(v, nnx.Param) for v in vars(module).values())


def _set_child(model: nnx.Module, path: Path, new: Any) -> None:
    """Replaces the child at ``path`` (an attribute or an ``nnx.List`` item) in place."""
    parent: Any = model
    for k in path[:-1]:
        parent = parent[k] if isinstance(k, int) else getattr(parent, k)
    if isinstance(path[-1], int):
        parent[path[-1]] = new
    else:
        setattr(parent, path[-1], new)


def _available(paths: Sequence[str], limit: int = 12) -> str:
    shown = ", ".join(paths[:limit])
    more = f", ... ({len(paths) - limit} more)" if len(paths) > limit else ""
    return (shown + more) if paths else "(none)"


# --------------------------------------------------------------------------------------
# LoRA


class LoRALinear(nnx.Module):
    """An ``nnx.Linear`` plus a low-rank update: ``base(x) + scale · lora_b(lora_a(x))``.

    Attributes:
        base: The original layer, kept as is (the mask freezes it; surgery never changes
            its parameters, so it is bit-identical to the layer it replaced).
        lora_a: ``nnx.Linear(in_features, rank, use_bias=False)``, ``U(±1/√in_features)``.
        lora_b: ``nnx.Linear(rank, out_features, use_bias=False)``, zero-initialised.
        rank: ``r``.
        alpha: ``α``.
        scale: ``α / r``.

    The factors use the base's ``dtype``, ``param_dtype`` and ``precision``, so the output
    has the base's dtype. At initialisation ``lora_b`` is zero and the output equals
    ``base(x)`` exactly (``y + 0 = y``).
    """

    def __init__(self, base: nnx.Linear, *, rank: int, alpha: float | None = None,
                 rngs: nnx.Rngs):
        """Wraps ``base``.

        Args:
            base: The layer to adapt.
            rank: ``r``, a positive int.
            alpha: ``α > 0``; default ``r`` (``scale = 1``).
            rngs: Random streams (``rngs.params`` initialises ``lora_a``).

        Raises:
            TypeError: ``base`` is not an ``nnx.Linear``, or a hyperparameter of the wrong
                type.
            ValueError: ``rank < 1`` or ``alpha <= 0``.
        """
        if not isinstance(base, nnx.Linear):
            raise TypeError(f"LoRALinear wraps an nnx.Linear, got {type(base).__name__}")
        self.rank = check_positive_int("rank", rank)
        self.alpha = float(self.rank) if alpha is None else _check_positive_real("alpha", alpha)
        self.scale = self.alpha / self.rank
        self.base = base
        like = dict(dtype=base.dtype, param_dtype=base.param_dtype, precision=base.precision)
        self.lora_a = nnx.Linear(base.in_features, self.rank, use_bias=False,
                                 kernel_init=_kaiming_uniform_sqrt5, rngs=rngs, **like)
        self.lora_b = nnx.Linear(self.rank, base.out_features, use_bias=False,
                                 kernel_init=nnx.initializers.zeros_init(), rngs=rngs, **like)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def delta_kernel(self) -> jax.Array:
        """``scale · A B``, shape ``(in_features, out_features)``, in the kernel's dtype."""
        a, b = self.lora_a.kernel[...], self.lora_b.kernel[...]
        dtype = jnp.promote_types(a.dtype, jnp.float32)
        delta = self.scale * jnp.matmul(a.astype(dtype), b.astype(dtype),
                                        precision=jax.lax.Precision.HIGHEST)
        return delta.astype(self.base.kernel[...].dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``base(x) + scale · lora_b(lora_a(x))``, over the last axis of ``x``."""
        return self.base(x) + self.scale * self.lora_b(self.lora_a(x))


def add_lora(
    model: nnx.Module,
    *,
    rank: int,
    alpha: float | None = None,
    targets: str,
    rngs: nnx.Rngs,
) -> list[str]:
    """Replaces the matching ``nnx.Linear`` layers of ``model`` by :class:`LoRALinear`.

    In place. ``targets`` is matched with ``re.fullmatch`` against each submodule's path,
    its keys joined by ``/`` (``"blocks/0/attn/query"``, ``"layers/1"``, ``"head"``): the
    whole path must match, so ``"blocks/1/fc1"`` does not also select ``blocks/11/fc1``.
    Every matched module must be an ``nnx.Linear``, except modules with no parameters of
    their own (containers such as a ``TransformerBlock`` or an ``nnx.List``), which are
    ignored; layers inside an existing :class:`LoRALinear` are never candidates.

    Examples of ``targets``: ``r"blocks/\\d+/attn/(query|value)"`` (the LoRA paper's
    choice), ``r"blocks/\\d+/(attn/\\w+|fc1|fc2)"`` (every Linear of every block),
    ``r"layers/\\d+"`` (an MLP's hidden layers).

    After surgery a layer's parameters move from ``path/kernel`` to ``path/base/kernel``
    and the factors are ``path/lora_a/kernel`` and ``path/lora_b/kernel``. Re-split the
    model (and rebuild optimizer state) after calling this. A layer shared by several
    parents is replaced under its first path only.

    Args:
        model: The model to modify.
        rank: LoRA rank ``r``.
        alpha: ``α``; default ``r``.
        targets: Regex over module paths (``re.fullmatch``).
        rngs: Random streams for ``lora_a``.

    Returns:
        The paths of the replaced layers, sorted (list indices numerically).

    Raises:
        TypeError: A hyperparameter of the wrong type.
        ValueError: ``targets`` matches no module (the message lists the model's Linear
            paths), or matches a module with parameters that is not an ``nnx.Linear``
            (naming it and its type; a LoRALinear counts: it is already adapted).
    """
    if not isinstance(model, nnx.Module):
        raise TypeError(f"model must be an nnx.Module, got {type(model).__name__}")
    check_positive_int("rank", rank)
    if alpha is not None:
        _check_positive_real("alpha", alpha)
    pattern = _compile("targets", targets)
    # Layers inside adapter modules (mlp_adapter, prompt) are trained already: not targets.
    modules = [(p, m) for p, m in _modules(model) if not is_adapter_path(p)]
    linear_paths = [_path_str(p) for p, m in modules if isinstance(m, nnx.Linear)]
    chosen: list[tuple[Path, nnx.Linear]] = []
    for path, module in modules:
        name = _path_str(path)
        if not pattern.fullmatch(name):
            continue
        if isinstance(module, LoRALinear):
            raise ValueError(f"targets {targets!r} matches {name!r}, which already is a "
                             "LoRALinear; merge_lora first or narrow the pattern")
        if isinstance(module, nnx.Linear):
            chosen.append((path, module))
        elif _has_own_params(module):
            raise ValueError(
                f"targets {targets!r} matches {name!r}, a {type(module).__name__}; LoRA "
                "adapts nnx.Linear layers only. Narrow the pattern; Linear layers: "
                f"{_available(linear_paths)}")
    if not chosen:
        raise ValueError(f"targets {targets!r} matches no nnx.Linear layer of "
                         f"{type(model).__name__} (re.fullmatch on '/'-joined module paths); "
                         f"Linear layers: {_available(linear_paths)}")
    for path, module in chosen:
        _set_child(model, path, LoRALinear(module, rank=rank, alpha=alpha, rngs=rngs))
    return [_path_str(p) for p, _ in chosen]


def merge_lora(model: nnx.Module) -> list[str]:
    """Replaces every :class:`LoRALinear` of ``model`` by a plain ``nnx.Linear``, in place.

    The merged layer is the LoRALinear's ``base`` object (modified in place), its kernel
    set to ``W + scale · A B`` (the product in at least float32 with ``HIGHEST``
    precision, then cast to ``W``'s dtype), its bias kept: the same function up to
    rounding, ``x(W + sAB)`` against ``xW + s(xA)B`` (on a 2-block TinyViT with every
    Linear adapted, outputs agree to ~1e-6 of their largest magnitude in float32).
    Parameter paths return to ``path/kernel``, ``path/bias``.

    Args:
        model: The model to modify.

    Returns:
        The paths of the merged layers (empty if there was none).
    """
    merged = [(p, m) for p, m in _modules(model) if isinstance(m, LoRALinear)]
    for path, lora in merged:
        base = lora.base
        base.kernel[...] = base.kernel[...] + lora.delta_kernel()
        _set_child(model, path, base)
    return [_path_str(p) for p, _ in merged]


# --------------------------------------------------------------------------------------
# Bottleneck adapters


class BottleneckAdapter(nnx.Module):
    """AdaptFormer's parallel adapter: ``scale · up(relu(down(h)))``.

    Attributes:
        down: ``nnx.Linear(dim, bottleneck)``, kernel ``U(±1/√dim)``, zero bias.
        up: ``nnx.Linear(bottleneck, dim)``, zero kernel and bias (the adapter starts as
            the zero function).
        scale: The output scale ``s``.
    """

    def __init__(self, dim: int, *, bottleneck: int = 64, scale: float = 0.1,
                 param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
        """Builds the adapter.

        Args:
            dim: Token width (input and output size).
            bottleneck: Hidden width.
            scale: Output scale ``s > 0`` (AdaptFormer / PILOT: 0.1).
            param_dtype: Parameter dtype.
            rngs: Random streams (``rngs.params`` initialises ``down``).

        Raises:
            TypeError, ValueError: On a malformed argument.
        """
        dim = check_positive_int("dim", dim)
        bottleneck = check_positive_int("bottleneck", bottleneck)
        self.scale = _check_positive_real("scale", scale)
        zeros = nnx.initializers.zeros_init()
        self.down = nnx.Linear(dim, bottleneck, kernel_init=_kaiming_uniform_sqrt5,
                               bias_init=zeros, param_dtype=param_dtype, rngs=rngs)
        self.up = nnx.Linear(bottleneck, dim, kernel_init=zeros, bias_init=zeros,
                             param_dtype=param_dtype, rngs=rngs)

    def __call__(self, h: jax.Array) -> jax.Array:
        """Maps ``(..., dim)`` to ``(..., dim)``."""
        return self.scale * self.up(nnx.relu(self.down(h)))


def _block_dim(block: nnx.Module, path: str) -> int:
    """A block's token width: its ``fc2`` output size (TransformerBlock) or ``ln2`` width."""
    fc2, ln2 = getattr(block, "fc2", None), getattr(block, "ln2", None)
    if isinstance(fc2, (nnx.Linear, LoRALinear)):
        return int(fc2.out_features)
    if isinstance(ln2, nnx.LayerNorm):
        return int(ln2.num_features)
    raise ValueError(f"cannot infer the token width of block {path!r} "
                     f"({type(block).__name__}: no fc2 Linear or ln2 LayerNorm); pass dim=")


def add_adapters(
    model: nnx.Module,
    *,
    bottleneck: int = 64,
    scale: float = 0.1,
    targets: str | None = None,
    dim: int | None = None,
    rngs: nnx.Rngs,
) -> list[str]:
    """Sets the ``mlp_adapter`` of the model's blocks to a :class:`BottleneckAdapter`.

    In place. The blocks are the submodules that have an ``mlp_adapter`` attribute
    (:class:`~clax.models.vit.TransformerBlock`, in TinyViT and TinyCausalLM), optionally
    narrowed by ``targets`` (``re.fullmatch`` on their ``/``-joined paths, e.g.
    ``r"blocks/[01]"`` for the first two). The adapter's parameters live at
    ``blocks/i/mlp_adapter/{down,up}/{kernel,bias}``.

    Args:
        model: The model to modify.
        bottleneck: Adapter hidden width.
        scale: Output scale (AdaptFormer: 0.1).
        targets: Regex over block paths; None: every block.
        dim: Token width; default read from each block (``fc2.out_features``).
        rngs: Random streams.

    Returns:
        The paths of the adapted blocks.

    Raises:
        TypeError: A hyperparameter of the wrong type.
        ValueError: The model has no block with an ``mlp_adapter`` hook, ``targets``
            matches none of them (listing them), or a block already has an adapter.
    """
    if not isinstance(model, nnx.Module):
        raise TypeError(f"model must be an nnx.Module, got {type(model).__name__}")
    check_positive_int("bottleneck", bottleneck)
    _check_positive_real("scale", scale)
    if dim is not None:
        check_positive_int("dim", dim)
    blocks = [(p, m) for p, m in _modules(model) if "mlp_adapter" in vars(m)]
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no block with an mlp_adapter hook "
                         "(clax.models.vit.TransformerBlock has one); bottleneck adapters "
                         "cannot be added")
    names = [_path_str(p) for p, _ in blocks]
    if targets is not None:
        pattern = _compile("targets", targets)
        blocks = [(p, m) for p, m in blocks if pattern.fullmatch(_path_str(p))]
        if not blocks:
            raise ValueError(f"targets {targets!r} matches no block with an mlp_adapter hook "
                             f"(re.fullmatch); blocks: {_available(names)}")
    for path, block in blocks:
        if block.mlp_adapter is not None:
            raise ValueError(f"block {_path_str(path)!r} already has an mlp_adapter "
                             f"({type(block.mlp_adapter).__name__})")
    for path, block in blocks:
        width = dim if dim is not None else _block_dim(block, _path_str(path))
        # The hook is None (a static attribute) until now: nnx.data makes the adapter a
        # child module whose parameters are part of the model's state.
        block.mlp_adapter = nnx.data(BottleneckAdapter(width, bottleneck=bottleneck,
                                                       scale=scale, rngs=rngs))
    return [_path_str(p) for p, _ in blocks]


# --------------------------------------------------------------------------------------
# Prompt tokens


class PromptTokens(nnx.Module):
    """``length`` learned tokens: ``prompt(batch_size) -> (batch_size, length, dim)``.

    Attributes:
        tokens: ``nnx.Param`` of shape ``(length, dim)``, initialised ``U(-1, 1)`` (L2P's
            ``prompt_init='uniform'``).
    """

    def __init__(self, length: int, dim: int, *, param_dtype: Any = jnp.float32,
                 rngs: nnx.Rngs):
        """Builds the tokens.

        Args:
            length: Number of tokens ``P``.
            dim: Token width.
            param_dtype: Parameter dtype.
            rngs: Random streams (``rngs.params``).

        Raises:
            TypeError, ValueError: On a malformed size.
        """
        length = check_positive_int("length", length)
        dim = check_positive_int("dim", dim)
        self.tokens = nnx.Param(jax.random.uniform(rngs.params(), (length, dim), param_dtype,
                                                   minval=-1.0, maxval=1.0))

    def __call__(self, batch_size: int) -> jax.Array:
        """The tokens broadcast to ``(batch_size, length, dim)``."""
        tokens = self.tokens[...]
        return jnp.broadcast_to(tokens[None], (batch_size, *tokens.shape))


def add_prompt(model: nnx.Module, *, length: int, dim: int | None = None,
               rngs: nnx.Rngs) -> list[str]:
    """Sets ``model.prompt`` to :class:`PromptTokens` (parameters at ``prompt/tokens``).

    In place. TinyViT inserts the tokens after the cls token, so the sequence grows from
    ``N + 1`` to ``N + 1 + length`` and the features stay the cls output.

    Args:
        model: A model with a ``prompt`` hook (e.g. :class:`~clax.models.vit.TinyViT`).
        length: Number of prompt tokens.
        dim: Token width; default ``model.dim``.
        rngs: Random streams.

    Returns:
        ``["prompt"]``, the path of the new module.

    Raises:
        ValueError: The model has no ``prompt`` attribute (naming its class), already has a
            prompt, or its width is unknown and ``dim`` is not given.
        TypeError: A size of the wrong type.
    """
    if not isinstance(model, nnx.Module):
        raise TypeError(f"model must be an nnx.Module, got {type(model).__name__}")
    if "prompt" not in vars(model):
        raise ValueError(f"{type(model).__name__} has no prompt hook (a `prompt` attribute "
                         "called as prompt(batch_size) -> (B, P, dim)); clax.models.TinyViT "
                         "has one")
    if model.prompt is not None:
        raise ValueError(f"{type(model).__name__} already has a prompt "
                         f"({type(model.prompt).__name__})")
    if dim is None:
        dim = getattr(model, "dim", None) or getattr(model, "feature_dim", None)
        if dim is None:
            raise ValueError(f"cannot infer the token width of {type(model).__name__}; "
                             "pass dim=")
    model.prompt = nnx.data(PromptTokens(length, dim, rngs=rngs))  # see add_adapters
    return ["prompt"]


# --------------------------------------------------------------------------------------
# Parameter groups


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def _param_tree(params_or_model: Any) -> PyTree:
    if isinstance(params_or_model, nnx.Module):
        return nnx.state(params_or_model, nnx.Param)
    return params_or_model


def _leaf_paths(tree: PyTree) -> list[tuple[Path, Any]]:
    pairs = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_variable)[0]
    return [(tuple(_key(k) for k in path), leaf) for path, leaf in pairs]


def is_adapter_path(path: Path) -> bool:
    """Whether a parameter path lies under an adapter module (:data:`ADAPTER_KEYS`)."""
    return any(str(k) in ADAPTER_KEYS for k in path)


def peft_mask(params_or_model: Any, *, train: Sequence[str] = ()) -> PyTree:
    """The trainable group of a parameter-efficient model: a tree of Python bools.

    A leaf is ``True`` when its path has a key in :data:`ADAPTER_KEYS` (``lora_a``,
    ``lora_b``, ``mlp_adapter``, ``prompt``: the modules :func:`add_lora`,
    :func:`add_adapters` and :func:`add_prompt` create) or when ``re.search(pattern,
    path)`` holds for a pattern of ``train`` (``path`` ``/``-joined, e.g.
    ``"head/kernel"``; as in :func:`clax.params.label_params`), e.g. ``train=("head",)``
    to also train the classifier. Everything else, the LoRA ``base`` layers included, is
    frozen. Use it with ``clax.params.train_only(tx, mask)``.

    Args:
        params_or_model: An ``nnx.Module`` (its ``nnx.Param`` state is read), an
            ``nnx.State`` of parameters or a pure dict (``ModelFns.split``'s params).
        train: Extra regexes of parameter paths to train.

    Returns:
        A tree shaped like the parameters with ``bool`` leaves: an ``nnx.State`` of bools
        for a module or a state, a dict of bools for a dict. It matches the parameters by
        path, so either form works with ``train_only`` on either kind of parameters.

    Raises:
        TypeError: ``train`` is a single string (pass a tuple) or holds a non-string.
        ValueError: A ``train`` pattern is not a valid regex or matches no parameter, or
            nothing at all is trainable (no adapter was added and ``train`` is empty: the
            optimizer would silently do nothing).
    """
    if isinstance(train, str) or not isinstance(train, Sequence):
        raise TypeError(f"train must be a sequence of regex strs (e.g. ('head',)), got "
                        f"{train!r}")
    patterns = [_compile(f"train[{i}]", t) for i, t in enumerate(train)]
    tree = _param_tree(params_or_model)
    leaves = _leaf_paths(tree)
    names = [_path_str(p) for p, _ in leaves]
    for pattern in patterns:
        if not any(pattern.search(n) for n in names):
            raise ValueError(f"train pattern {pattern.pattern!r} matches no parameter path "
                             f"(re.search); paths: {_available(names)}")
    flags = [is_adapter_path(p) or any(pt.search(n) for pt in patterns)
             for (p, _), n in zip(leaves, names, strict=True)]
    if not any(flags):
        raise ValueError("no trainable parameter: the model has no adapter parameters "
                         f"({', '.join(ADAPTER_KEYS)}) and train selects none; call add_lora, "
                         "add_adapters or add_prompt first, or pass train=")
    treedef = jax.tree_util.tree_structure(tree, is_leaf=_is_variable)
    return jax.tree_util.tree_unflatten(treedef, flags)


def count_params(params_or_model: Any, mask: PyTree) -> tuple[int, int]:
    """``(trainable, total)`` numbers of parameter entries under ``mask``.

    Args:
        params_or_model: A module, an ``nnx.State`` of parameters or a pure dict.
        mask: A bool tree with the parameters' paths (e.g. from :func:`peft_mask`).

    Returns:
        The summed sizes of the ``True`` leaves and of all leaves.

    Raises:
        ValueError: A parameter path missing from ``mask``.
    """
    flags = {p: bool(f) for p, f in _leaf_paths(mask)}
    trainable = total = 0
    for path, leaf in _leaf_paths(_param_tree(params_or_model)):
        if path not in flags:
            raise ValueError(f"parameter {_path_str(path)!r} is not in mask")
        size = int(np.prod(np.shape(leaf.get_value() if _is_variable(leaf) else leaf)))
        total += size
        trainable += size if flags[path] else 0
    return trainable, total


def trainable_params(params_or_model: Any, mask: PyTree) -> dict:
    """The leaves of the parameters where ``mask`` is ``True``, as a nested pure dict.

    For method memory restricted to the trainable group, e.g. an EWC Fisher and anchor or
    GPM bases over the adapters only (``gpm_memory(trainable_params(params, mask))``),
    which then fit the parameter subtree that ``train_only(tx, mask)`` hands its inner
    transforms.

    Args:
        params_or_model: A module, an ``nnx.State`` of parameters or a pure dict.
        mask: A bool tree with the parameters' paths (e.g. from :func:`peft_mask`).

    Returns:
        Nested dicts (int keys for list items, as ``nnx.to_pure_dict``) holding the
        selected arrays (not copies).

    Raises:
        ValueError: A parameter path missing from ``mask``.
    """
    flags = {p: bool(f) for p, f in _leaf_paths(mask)}
    out: dict = {}
    for path, leaf in _leaf_paths(_param_tree(params_or_model)):
        if path not in flags:
            raise ValueError(f"parameter {_path_str(path)!r} is not in mask")
        if not flags[path]:
            continue
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = leaf.get_value() if _is_variable(leaf) else leaf
    return out
