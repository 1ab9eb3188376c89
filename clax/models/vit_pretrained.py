"""Vision Transformer in the ViT-B/16 layout, loadable from timm / Hugging Face safetensors.

:class:`ViT` is the architecture of Dosovitskiy et al. (2021) as timm's
``VisionTransformer`` and Hugging Face's ``ViTModel`` implement it: a patch-embedding
convolution, a cls token, learned absolute position embeddings, pre-LN transformer blocks
with exact (erf) GELU and biased q/k/v projections, a final LayerNorm and a head on the cls
token. :func:`load_vit_safetensors` builds one from a local ``.safetensors`` file in either
naming (reading only shapes to infer the configuration), :func:`save_vit_safetensors` writes
the same layouts back, and :func:`resample_pos_embed` adapts the position embeddings of a
224x224 checkpoint to another resolution (small images resized with
:func:`clax.models.preprocess.prepare_images`).

Parameter paths are those of :class:`~clax.models.vit.TinyViT` (``patch_embed/kernel``,
``cls_token``, ``pos_embed``, ``blocks/0/attn/query/kernel``, ``blocks/0/fc1/kernel``,
``norm/scale``, ``head/kernel``), so layer capture, adapters and prompts work unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from clax._validation import check_bool, check_choice, check_int, check_real
from clax.models._checks import check_positive_int
from clax.models.heads import MultiHeadLinear, make_head
from clax.models.vit import ViT, ViTConfig, vit_b16, vit_tiny_test

__all__ = [
    "ViT",
    "ViTConfig",
    "load_vit_safetensors",
    "resample_pos_embed",
    "save_vit_safetensors",
    "vit_b16",
    "vit_tiny_test",
]

_INSTALL_HINT = "pip install 'clax-continual[pretrained]'"
NAMINGS = ("timm", "hf")
# LayerNorm epsilon of each library's ViT when the file does not say: timm's
# VisionTransformer uses 1e-6, Hugging Face's ViTConfig.layer_norm_eps defaults to 1e-12.
DEFAULT_NORM_EPS = {"timm": 1e-6, "hf": 1e-12}
# Head counts cannot be read from tensor shapes (q/k/v are (D, D) whatever the split).
# Only ViT-B's width is defaulted: a guessed head count for another width would load
# without any shape error and silently compute something else.
_DEFAULT_HEADS = {768: 12}
# Tensors of Hugging Face checkpoints that this model does not use: the pooler of
# ``ViTModel`` (a tanh layer on the cls token, not part of the classifier path) and the
# mask token of masked-image-modelling checkpoints.
_HF_UNUSED = ("pooler.dense.weight", "pooler.dense.bias", "embeddings.mask_token")
_FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})


def _grid_arg(name: str, value: int | Sequence[int]) -> tuple[int, int]:
    """An int side or an ``(h, w)`` pair of positive ints, as a pair."""
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        if len(value) != 2:
            raise ValueError(f"{name} must be a positive int or a pair (h, w), got {value!r}")
        return (check_positive_int(name, value[0]), check_positive_int(name, value[1]))
    side = check_positive_int(name, value)
    return (side, side)


def resample_pos_embed(
    pos_embed: jax.Array | np.ndarray,
    new_grid: int | Sequence[int],
    *,
    old_grid: int | Sequence[int] | None = None,
    num_prefix_tokens: int = 1,
    method: str = "bicubic",
    antialias: bool = True,
) -> jax.Array:
    """Resizes the patch-grid part of absolute position embeddings (timm-style).

    The ``num_prefix_tokens`` leading rows (the cls token's) are kept as they are; the rest,
    read as an ``old_grid`` image of ``D`` channels, is resized with ``jax.image.resize``
    (in float32, cast back). This follows timm's ``resample_abs_pos_embed`` (bicubic,
    antialiased when shrinking), but is not bit-identical to it: ``jax.image.resize``'s cubic
    kernel is Keys' with ``a = -0.5``, PyTorch's bicubic uses ``a = -0.75``.

    Args:
        pos_embed: ``(1, num_prefix_tokens + gh * gw, D)``.
        new_grid: Target patches per side, or ``(h, w)``.
        old_grid: Source grid; default: square, ``sqrt`` of the number of grid rows.
        num_prefix_tokens: Leading non-grid rows (1: the cls token).
        method: A ``jax.image.resize`` method.
        antialias: Passed to ``jax.image.resize`` (only matters when shrinking).

    Returns:
        ``(1, num_prefix_tokens + h * w, D)``; ``pos_embed`` itself (as a jax array) when the
        grid is unchanged.

    Raises:
        ValueError: On a malformed shape or a grid that does not match ``pos_embed``.
    """
    pos_embed = jnp.asarray(pos_embed)
    num_prefix_tokens = check_int("num_prefix_tokens", num_prefix_tokens, low=0)
    if pos_embed.ndim != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"pos_embed must have shape (1, tokens, dim), got "
                         f"{tuple(pos_embed.shape)}")
    n = pos_embed.shape[1] - num_prefix_tokens
    if old_grid is None:
        side = math.isqrt(max(n, 0))
        if n < 1 or side * side != n:
            raise ValueError(f"pos_embed has {n} grid rows after {num_prefix_tokens} prefix "
                             "token(s), not a square grid; pass old_grid=(h, w)")
        old = (side, side)
    else:
        old = _grid_arg("old_grid", old_grid)
        if old[0] * old[1] != n:
            raise ValueError(f"old_grid {old} has {old[0] * old[1]} cells but pos_embed has "
                             f"{n} grid rows")
    new = _grid_arg("new_grid", new_grid)
    if new == old:
        return pos_embed
    dim = pos_embed.shape[2]
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    grid = jax.image.resize(grid.reshape(1, *old, dim).astype(jnp.float32), (1, *new, dim),
                            method=method, antialias=antialias)
    grid = grid.reshape(1, new[0] * new[1], dim).astype(pos_embed.dtype)
    return jnp.concatenate([prefix, grid], axis=1)


# ---------------------------------------------------------------------------------------
# Checkpoint layouts


@dataclasses.dataclass(frozen=True)
class _Tensor:
    """One checkpoint tensor: its name, PyTorch-layout shape, and the model parameters it
    becomes (``kind`` says how: copy, transposed Linear weight, Conv weight, fused qkv)."""

    name: str
    shape: tuple[int, ...]
    kind: str
    paths: tuple[tuple[str | int, ...], ...]


def _to_flax(kind: str, array: np.ndarray) -> list[np.ndarray]:
    """A checkpoint tensor as the model parameter(s) of ``_Tensor.paths``."""
    if kind == "copy":
        return [array]
    if kind == "linear":  # PyTorch Linear weight (out, in) -> Flax kernel (in, out)
        return [array.T]
    if kind == "conv":  # PyTorch Conv2d weight (out, in, kh, kw) -> Flax (kh, kw, in, out)
        return [array.transpose(2, 3, 1, 0)]
    if kind == "qkv_weight":  # timm's fused (3D, D): rows are [query; key; value]
        return [part.T for part in np.split(array, 3, axis=0)]
    if kind == "qkv_bias":
        return list(np.split(array, 3, axis=0))
    raise AssertionError(kind)


def _from_flax(kind: str, arrays: list[np.ndarray]) -> np.ndarray:
    """Inverse of :func:`_to_flax`."""
    if kind == "copy":
        return arrays[0]
    if kind == "linear":
        return arrays[0].T
    if kind == "conv":
        return arrays[0].transpose(3, 2, 0, 1)
    if kind == "qkv_weight":
        return np.concatenate([a.T for a in arrays], axis=0)
    if kind == "qkv_bias":
        return np.concatenate(arrays, axis=0)
    raise AssertionError(kind)


def _linear(name: str, path: tuple[str | int, ...], out: int, inp: int) -> list[_Tensor]:
    return [_Tensor(f"{name}.weight", (out, inp), "linear", (path + ("kernel",),)),
            _Tensor(f"{name}.bias", (out,), "copy", (path + ("bias",),))]


def _layer_norm(name: str, path: tuple[str | int, ...], dim: int) -> list[_Tensor]:
    return [_Tensor(f"{name}.weight", (dim,), "copy", (path + ("scale",),)),
            _Tensor(f"{name}.bias", (dim,), "copy", (path + ("bias",),))]


@dataclasses.dataclass(frozen=True)
class _Names:
    """The tensor names that identify a naming and carry its configuration."""

    patch: str
    pos: str
    block: str  # regex prefix of block i's tensors, group 1 = i
    fc1: str  # block 0's first MLP weight (gives mlp_dim)
    head: str  # head weight
    head_bias: str


def _names(naming: str, prefix: str) -> _Names:
    if naming == "timm":
        return _Names("patch_embed.proj.weight", "pos_embed", r"blocks\.(\d+)\.",
                      "blocks.0.mlp.fc1.weight", "head.weight", "head.bias")
    return _Names(f"{prefix}embeddings.patch_embeddings.projection.weight",
                  f"{prefix}embeddings.position_embeddings",
                  re.escape(prefix) + r"encoder\.layer\.(\d+)\.",
                  f"{prefix}encoder.layer.0.intermediate.dense.weight",
                  "classifier.weight", "classifier.bias")


def _layout(naming: str, prefix: str, *, tokens: int, dim: int, channels: int, patch: int,
            depth: int, mlp_dim: int, num_classes: int | None) -> list[_Tensor]:
    """Every tensor of a checkpoint of this configuration (head only if ``num_classes``)."""
    d, m = dim, mlp_dim
    if naming == "timm":
        out = [
            _Tensor("patch_embed.proj.weight", (d, channels, patch, patch), "conv",
                    (("patch_embed", "kernel"),)),
            _Tensor("patch_embed.proj.bias", (d,), "copy", (("patch_embed", "bias"),)),
            _Tensor("cls_token", (1, 1, d), "copy", (("cls_token",),)),
            _Tensor("pos_embed", (1, tokens, d), "copy", (("pos_embed",),)),
        ]
        for i in range(depth):
            b, p = f"blocks.{i}.", ("blocks", i)
            qkv = tuple(p + ("attn", n) for n in ("query", "key", "value"))
            out += _layer_norm(b + "norm1", p + ("ln1",), d)
            out.append(_Tensor(b + "attn.qkv.weight", (3 * d, d), "qkv_weight",
                               tuple(q + ("kernel",) for q in qkv)))
            out.append(_Tensor(b + "attn.qkv.bias", (3 * d,), "qkv_bias",
                               tuple(q + ("bias",) for q in qkv)))
            out += _linear(b + "attn.proj", p + ("attn", "out"), d, d)
            out += _layer_norm(b + "norm2", p + ("ln2",), d)
            out += _linear(b + "mlp.fc1", p + ("fc1",), m, d)
            out += _linear(b + "mlp.fc2", p + ("fc2",), d, m)
        out += _layer_norm("norm", ("norm",), d)
        head = "head"
    else:
        e = f"{prefix}embeddings."
        out = [
            _Tensor(e + "patch_embeddings.projection.weight", (d, channels, patch, patch),
                    "conv", (("patch_embed", "kernel"),)),
            _Tensor(e + "patch_embeddings.projection.bias", (d,), "copy",
                    (("patch_embed", "bias"),)),
            _Tensor(e + "cls_token", (1, 1, d), "copy", (("cls_token",),)),
            _Tensor(e + "position_embeddings", (1, tokens, d), "copy", (("pos_embed",),)),
        ]
        for i in range(depth):
            b, p = f"{prefix}encoder.layer.{i}.", ("blocks", i)
            out += _layer_norm(b + "layernorm_before", p + ("ln1",), d)
            for n in ("query", "key", "value"):
                out += _linear(b + f"attention.attention.{n}", p + ("attn", n), d, d)
            out += _linear(b + "attention.output.dense", p + ("attn", "out"), d, d)
            out += _layer_norm(b + "layernorm_after", p + ("ln2",), d)
            out += _linear(b + "intermediate.dense", p + ("fc1",), m, d)
            out += _linear(b + "output.dense", p + ("fc2",), d, m)
        out += _layer_norm(f"{prefix}layernorm", ("norm",), d)
        head = "classifier"
    if num_classes is not None:
        out += _linear(head, ("head",), num_classes, d)
    return out


def _variable(model: nnx.Module, path: tuple[str | int, ...]) -> nnx.Variable:
    node: Any = model
    for key in path:
        node = node[key] if isinstance(key, int) else getattr(node, key)
    return node


def _safetensors() -> Any:
    """The ``safetensors`` package, or an ImportError saying how to install it."""
    try:
        import safetensors
        import safetensors.numpy  # noqa: F401  (save_file lives there)
    except ImportError as err:
        raise ImportError("reading or writing ViT safetensors checkpoints needs the "
                          f"`safetensors` package: {_INSTALL_HINT}") from err
    return safetensors


def _shape_str(shape: Sequence[int]) -> str:
    return "(" + ", ".join(map(str, shape)) + ("," if len(shape) == 1 else "") + ")"


def _few(names: Sequence[str], k: int = 5) -> str:
    shown = ", ".join(repr(n) for n in list(names)[:k])
    return shown + (f" and {len(names) - k} more" if len(names) > k else "")


def _detect_naming(naming: str, shapes: Mapping[str, tuple[int, ...]],
                   path: pathlib.Path) -> tuple[str, str]:
    """``(naming, prefix)``: the library layout and the HF ``vit.`` prefix (or ``""``)."""
    naming = check_choice("naming", naming, ("auto", *NAMINGS))
    hf_patch = _names("hf", "").patch
    hf_prefix = "vit." if f"vit.{hf_patch}" in shapes else ""
    if naming == "auto":
        if _names("timm", "").patch in shapes:
            return "timm", ""
        if f"{hf_prefix}{hf_patch}" in shapes:
            return "hf", hf_prefix
        raise ValueError(
            f"cannot tell the naming of {path}: it has neither 'patch_embed.proj.weight' "
            f"(timm) nor '[vit.]{hf_patch}' (Hugging Face); its first tensors: "
            f"{_few(sorted(shapes))}")
    return naming, hf_prefix if naming == "hf" else ""


def _read_config_json(path: pathlib.Path) -> dict[str, Any]:
    """The ``config.json`` next to the checkpoint (Hugging Face / timm hub layout), or {}."""
    config_path = path.parent / "config.json"
    if not config_path.is_file():
        return {}
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read {config_path}: {err}") from err
    if not isinstance(config, dict):
        raise ValueError(f"{config_path} must hold a JSON object, got {type(config).__name__}")
    # timm's hub config.json keeps constructor arguments under "model_args".
    model_args = config.get("model_args")
    return {**(model_args if isinstance(model_args, dict) else {}), **config}


def _missing(path: pathlib.Path, names: Sequence[str]) -> ValueError:
    return ValueError(f"checkpoint {path} is missing tensor {names[0]!r}"
                      + (f" (and {_few(names[1:])})" if len(names) > 1 else ""))


def _wrong_shape(path: pathlib.Path, name: str, expected: Sequence[int],
                 got: Sequence[int]) -> ValueError:
    return ValueError(f"checkpoint {path}: tensor {name!r} has shape {_shape_str(got)}, "
                      f"expected {_shape_str(expected)}")


@dataclasses.dataclass(frozen=True)
class _Inspected:
    naming: str
    prefix: str
    dim: int
    channels: int
    patch: int
    grid: tuple[int, int]
    depth: int
    mlp_dim: int
    num_heads: int
    norm_eps: float
    approximate_gelu: bool
    head_classes: int | None


def _inspect(path: pathlib.Path, shapes: Mapping[str, tuple[int, ...]],
             metadata: Mapping[str, str], *, naming: str, num_heads: int | None,
             norm_eps: float | None) -> _Inspected:
    """Infers the configuration from tensor shapes, file metadata and ``config.json``."""
    naming, prefix = _detect_naming(naming, shapes, path)
    names = _names(naming, prefix)
    if names.patch not in shapes:
        raise _missing(path, [names.patch])
    patch_shape = shapes[names.patch]
    if len(patch_shape) != 4 or patch_shape[2] != patch_shape[3]:
        raise _wrong_shape(path, names.patch, ("dim", "channels", "patch", "patch"),
                           patch_shape)
    dim, channels, patch, _ = patch_shape
    if names.pos not in shapes:
        raise _missing(path, [names.pos])
    pos_shape = shapes[names.pos]
    if len(pos_shape) != 3 or pos_shape[0] != 1 or pos_shape[2] != dim:
        raise _wrong_shape(path, names.pos, (1, "tokens", dim), pos_shape)
    cells = pos_shape[1] - 1  # one row per patch after the cls token's
    if "clax.grid" in metadata:  # written by save_vit_safetensors (also non-square grids)
        grid = tuple(int(v) for v in metadata["clax.grid"].split("x"))
    else:
        side = math.isqrt(max(cells, 0))
        grid = (side, side)
    if len(grid) != 2 or cells < 1 or grid[0] * grid[1] != cells:
        raise ValueError(f"checkpoint {path}: {names.pos!r} has shape {_shape_str(pos_shape)}, "
                         f"i.e. {cells} patch positions after the cls token, not a square grid "
                         "(extra prefix tokens, e.g. distillation or register tokens, are "
                         "not supported)")
    indices = {int(m.group(1)) for k in shapes if (m := re.match(names.block, k))}
    if not indices:
        raise ValueError(f"checkpoint {path} has no transformer blocks (no tensor matches "
                         f"{names.block!r})")
    depth = max(indices) + 1  # a block missing in between is reported as missing tensors
    fc1 = shapes.get(names.fc1)
    mlp_dim = fc1[0] if fc1 else 4 * dim  # if absent, the layout check reports it
    head = shapes.get(names.head) or shapes.get(names.head_bias)
    head_classes = head[0] if head else None

    config = _read_config_json(path)
    if "hidden_size" in config and config["hidden_size"] != dim:
        raise ValueError(f"{path.parent / 'config.json'} has hidden_size="
                         f"{config['hidden_size']} but the checkpoint's width is {dim}; it "
                         "describes another model")
    if config.get("global_pool") not in (None, "token"):
        raise ValueError(f"{path.parent / 'config.json'} has global_pool="
                         f"{config['global_pool']!r}; only the cls-token ViT is supported")
    if num_heads is None:
        for value in (metadata.get("clax.num_heads"), config.get("num_attention_heads"),
                      config.get("num_heads"), _DEFAULT_HEADS.get(dim)):
            if value is not None:
                num_heads = int(value)
                break
        else:
            raise ValueError(
                f"the number of attention heads of {path} (width {dim}) cannot be read from "
                "tensor shapes; pass num_heads=..., or put a config.json with "
                "num_attention_heads next to the file")
    num_heads = check_positive_int("num_heads", num_heads)
    if dim % num_heads:
        raise ValueError(f"num_heads={num_heads} does not divide the width {dim} of "
                         f"checkpoint {path}")
    if norm_eps is None:
        for value in (metadata.get("clax.norm_eps"), config.get("layer_norm_eps"),
                      DEFAULT_NORM_EPS[naming]):
            if value is not None:
                norm_eps = float(value)
                break
    norm_eps = check_real("norm_eps", norm_eps, 0.0, math.inf, low_open=True, high_open=True)
    if "clax.approximate_gelu" in metadata:
        approximate_gelu = metadata["clax.approximate_gelu"] == "true"
    else:
        act = config.get("hidden_act", "gelu")
        if act not in ("gelu", "gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"{path.parent / 'config.json'} has hidden_act={act!r}; "
                             "supported: 'gelu' (exact), 'gelu_new' / 'gelu_pytorch_tanh' "
                             "(tanh approximation)")
        approximate_gelu = act != "gelu"
    return _Inspected(naming, prefix, dim, channels, patch, grid, depth, mlp_dim, num_heads,
                      norm_eps, approximate_gelu, head_classes)


def load_vit_safetensors(
    path: str | os.PathLike[str],
    *,
    naming: str = "auto",
    image_size: int | Sequence[int] | None = None,
    num_classes: int | None = None,
    num_tasks: int = 1,
    num_heads: int | None = None,
    norm_eps: float | None = None,
    strict: bool = True,
    dtype: Any = jnp.float32,
    rngs: nnx.Rngs | None = None,
) -> ViT:
    """Builds a :class:`ViT` from a timm or Hugging Face ViT ``.safetensors`` checkpoint.

    The width, channels, patch size, depth, MLP width, grid and head size are read from
    tensor shapes (without reading tensor data first). The head count and LayerNorm epsilon
    are not visible in shapes: they come from the arguments, else from the file's metadata
    (files written by :func:`save_vit_safetensors`), else from a ``config.json`` next to the
    file (HF ``num_attention_heads`` / ``layer_norm_eps``, timm ``num_heads``), else the
    defaults (12 heads for width 768 only; epsilon 1e-6 for timm, 1e-12 for HF).

    timm names: ``patch_embed.proj``, ``cls_token``, ``pos_embed``,
    ``blocks.<i>.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``, ``norm``, ``head``.
    HF names (``ViTModel``, or ``ViTForImageClassification`` with the ``vit.`` prefix):
    ``embeddings.{patch_embeddings.projection,cls_token,position_embeddings}``,
    ``encoder.layer.<i>.{layernorm_before,attention.attention.{query,key,value},
    attention.output.dense,layernorm_after,intermediate.dense,output.dense}``,
    ``layernorm``, ``classifier``; the unused ``pooler`` is skipped.

    Args:
        path: The ``.safetensors`` file.
        naming: ``"timm"``, ``"hf"`` or ``"auto"`` (told apart by the patch-embedding name).
        image_size: Input side (or ``(h, w)``); default: the checkpoint's. Another size
            keeps the cls position and resamples the grid (:func:`resample_pos_embed`).
        num_classes: Head size; default: the checkpoint's. A size other than the
            checkpoint's, a checkpoint without a head, or ``num_tasks > 1`` gives a newly
            initialised head (from ``rngs``).
        num_tasks: Heads; ``> 1`` gives a multi-head model (always newly initialised).
        num_heads: Attention heads (see above).
        norm_eps: LayerNorm epsilon (see above).
        strict: Unexpected tensors raise (``True``) or warn (``False``).
        dtype: Floating parameter dtype (computation follows the usual promotion with the
            input, so float32 images with bfloat16 parameters compute in float32).
        rngs: Random streams for a new head; default ``nnx.Rngs(0)``.

    Returns:
        The model, with every parameter but a new head taken from the file.

    Raises:
        ImportError: ``safetensors`` is not installed.
        FileNotFoundError: ``path`` does not exist.
        ValueError: On an unknown naming, a missing, mis-shaped, non-float or unexpected
            tensor (``strict``), a head count that does not divide the width, a checkpoint
            without a head and no ``num_classes``, a contradicting ``config.json``, or a
            non-float ``dtype``.
    """
    st = _safetensors()
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no safetensors checkpoint at {path}")
    num_tasks = check_positive_int("num_tasks", num_tasks)
    num_classes = check_int("num_classes", num_classes, low=1, optional=True)
    strict = check_bool("strict", strict)
    if not jnp.issubdtype(jnp.dtype(dtype), jnp.floating):
        raise ValueError(f"dtype must be a floating dtype, got {jnp.dtype(dtype)}")
    with st.safe_open(str(path), framework="numpy") as f:
        metadata = f.metadata() or {}
        slices = {k: f.get_slice(k) for k in f.keys()}
        shapes = {k: tuple(s.get_shape()) for k, s in slices.items()}
        info = _inspect(path, shapes, metadata, naming=naming, num_heads=num_heads,
                        norm_eps=norm_eps)
        layout = _layout(info.naming, info.prefix, tokens=info.grid[0] * info.grid[1] + 1,
                         dim=info.dim, channels=info.channels, patch=info.patch,
                         depth=info.depth, mlp_dim=info.mlp_dim,
                         num_classes=info.head_classes)
        missing = [t.name for t in layout if t.name not in shapes]
        if missing:
            raise _missing(path, missing)
        for t in layout:
            if shapes[t.name] != t.shape:
                raise _wrong_shape(path, t.name, t.shape, shapes[t.name])
            if slices[t.name].get_dtype() not in _FLOAT_DTYPES:
                raise ValueError(f"checkpoint {path}: tensor {t.name!r} has dtype "
                                 f"{slices[t.name].get_dtype()}, expected a float dtype")
        known = {t.name for t in layout}
        if info.naming == "hf":
            known |= {info.prefix + n for n in _HF_UNUSED}
        unexpected = sorted(set(shapes) - known)
        if unexpected:
            message = (f"checkpoint {path} has {len(unexpected)} tensor(s) that a "
                       f"{info.naming} ViT does not have: {_few(unexpected)}")
            if strict:
                raise ValueError(message + "; pass strict=False to ignore them")
            warnings.warn(message + "; ignored", stacklevel=2)

        if image_size is None:
            grid = info.grid
        else:
            hw = _grid_arg("image_size", image_size)
            if hw[0] % info.patch or hw[1] % info.patch:
                raise ValueError(f"image_size {hw} must be divisible by the checkpoint's "
                                 f"patch size {info.patch}")
            grid = (hw[0] // info.patch, hw[1] // info.patch)
        hw = (grid[0] * info.patch, grid[1] * info.patch)
        if num_classes is None:
            if info.head_classes is None:
                raise ValueError(f"checkpoint {path} has no classification head; pass "
                                 "num_classes=...")
            num_classes = info.head_classes
        keep_head = num_tasks == 1 and num_classes == info.head_classes

        def build() -> ViT:
            return ViT((*hw, info.channels), num_classes=num_classes, num_tasks=num_tasks,
                       patch_size=info.patch, dim=info.dim, depth=info.depth,
                       num_heads=info.num_heads, mlp_dim=info.mlp_dim,
                       norm_eps=info.norm_eps, approximate_gelu=info.approximate_gelu,
                       rngs=nnx.Rngs(0))

        # Shapes only: eager initialisation of ~86M parameters (and one compiled random
        # program per shape) would be thrown away; the checkpoint fills every variable.
        model = nnx.eval_shape(build)
        for t in layout:
            if t.paths[0][0] == "head" and not keep_head:
                continue
            arrays = _to_flax(t.kind, f.get_tensor(t.name))
            for p, array in zip(t.paths, arrays, strict=True):
                value = jnp.asarray(array, dtype)
                if p == ("pos_embed",):
                    value = resample_pos_embed(value, grid, old_grid=info.grid)
                _variable(model, p).set_value(value)
    if not keep_head:
        model.head = make_head(info.dim, num_classes, num_tasks,
                               rngs=nnx.Rngs(0) if rngs is None else rngs)
        for _, var in nnx.iter_graph(model.head):
            if isinstance(var, nnx.Variable):
                var.set_value(jnp.asarray(var.get_value(), dtype))
    unset = [p for p, v in nnx.iter_graph(model)
             if isinstance(v, nnx.Variable) and isinstance(v.get_value(), jax.ShapeDtypeStruct)]
    if unset:  # every variable must have come from the file or the new head
        raise AssertionError(f"parameters left unset by the loader: {unset}")
    return model


def save_vit_safetensors(
    model: ViT,
    path: str | os.PathLike[str],
    *,
    naming: str = "timm",
    include_head: bool = True,
) -> None:
    """Writes a :class:`ViT` as a timm or Hugging Face layout ``.safetensors`` file.

    Tensors are in PyTorch layout (Linear weights ``(out, in)``, the patch Conv
    ``(D, C, p, p)``, timm's fused ``qkv``) and keep the parameters' dtype. The metadata
    holds ``format: pt`` (which ``transformers`` checks) and the head count, LayerNorm
    epsilon, GELU kind and grid, which :func:`load_vit_safetensors` reads back. HF files
    use the ``ViTForImageClassification`` names (``vit.`` prefix, ``classifier``) with a
    head, the ``ViTModel`` names without. No ``config.json`` is written.

    Prompt and adapter modules (the ``prompt`` / ``mlp_adapter`` hooks) are not written
    (a warning says so).

    Args:
        model: The model.
        path: Output file (overwritten).
        naming: ``"timm"`` or ``"hf"``.
        include_head: Write the head; must be ``False`` for a multi-head model, whose
            stacked heads have no timm / HF counterpart.

    Raises:
        ImportError: ``safetensors`` is not installed.
        TypeError: ``model`` is not a :class:`ViT`.
        ValueError: On an unknown naming, or ``include_head`` with a multi-head model.
    """
    st = _safetensors()
    if not isinstance(model, ViT):
        raise TypeError(f"model must be a ViT, got {type(model).__name__}")
    naming = check_choice("naming", naming, NAMINGS)
    include_head = check_bool("include_head", include_head)
    if include_head and isinstance(model.head, MultiHeadLinear):
        raise ValueError(f"a multi-head model's head (num_tasks={model.num_tasks}) has no "
                         f"{naming} layout; pass include_head=False to save the backbone")
    if model.prompt is not None or any(b.mlp_adapter is not None for b in model.blocks):
        warnings.warn("the model's prompt / mlp_adapter modules are not written to "
                      f"{path}", stacklevel=2)
    prefix = "vit." if naming == "hf" and include_head else ""
    layout = _layout(naming, prefix, tokens=model.num_patches + 1, dim=model.dim,
                     channels=model.input_shape[2], patch=model.patch_size, depth=model.depth,
                     mlp_dim=model.mlp_dim,
                     num_classes=model.num_classes if include_head else None)
    tensors = {
        t.name: np.ascontiguousarray(_from_flax(
            t.kind, [np.asarray(_variable(model, p).get_value()) for p in t.paths]))
        for t in layout
    }
    metadata = {
        "format": "pt",
        "clax.num_heads": str(model.num_heads),
        "clax.norm_eps": repr(model.norm_eps),
        "clax.approximate_gelu": "true" if model.approximate_gelu else "false",
        "clax.grid": f"{model.grid_size[0]}x{model.grid_size[1]}",
    }
    st.numpy.save_file(tensors, str(path), metadata=metadata)
