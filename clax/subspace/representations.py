"""Layer-input representation matrices, one per Dense / Conv / multi-head kernel (GPM).

For a kernel ``W`` of shape ``(n_in, out)`` (a conv kernel ``(kh, kw, c_in, out)`` read as
``(kh·kw·c_in, out)``) the layer computes ``y = xᵀW`` for input rows ``x ∈ R^{n_in}``
(conv: one patch per output position). The gradient of any loss w.r.t. ``W`` is a sum of
outer products ``x δᵀ``, so it lies in the span of the inputs along axis 0: the
*representation matrix* ``R = [x_1, ..., x_m]`` (``n_in × m``) is what Gradient Projection
Memory (Saha et al., ICLR 2021) decomposes to find the input directions a task uses.

Column counts follow GPM's code: one column per sample for Dense layers (300 samples for
Permuted MNIST), one column per (sample, output position) for convs (im2col). A Dense
layer applied to every token of a sequence (inputs ``(B, L, in)``: a transformer's
projections and MLP, a language model's output layer) computes ``y_t = a_tᵀW`` per token,
so its gradient ``Σ_{b,t} a_{bt} δ_{bt}ᵀ`` lies in the span of the token inputs: it gets one
column per (sample, token), ``B·L`` columns in sample-major order, randomly subsampled to
``max_columns`` as conv patches are. Parameters that are not Linear / Conv kernels (an
embedding table, a position embedding, normalisation scales) have no representation
matrix: the token embedding is a lookup whose gradient rows are the tokens seen, not a
span of inputs, so GPM neither represents nor projects it. Conv patches
are ordered ``(kh, kw, c_in)`` like the Flax kernel (:func:`clax.models.conv_patches`), not
PyTorch's ``(c_in, kh, kw)``, so ``Rᵀ @ W.reshape(-1, out)`` reproduces the conv output.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from clax.models.capture import DEFAULT_LAYER_TYPES, capture_layer_inputs, conv_patches
from clax.models.heads import MultiHeadLinear

Path = tuple[Any, ...]

# Default cap on the number of columns of one matrix: GPM's largest conv matrix (AlexNet
# conv1: 24 samples x 29 x 29 positions) has ~20k; 4096 random columns keep the SVD cheap
# (n_in x 4096) while estimating the same input covariance.
DEFAULT_MAX_COLUMNS = 4096


def _conv_settings(path: Path, conv: nnx.Conv) -> dict[str, Any]:
    """kernel_size / strides / padding of ``conv``; rejects what conv_patches can't mirror."""
    for attr, default in (("input_dilation", 1), ("kernel_dilation", 1)):
        value = getattr(conv, attr, None)
        if value is not None and any(v != default for v in np.atleast_1d(value)):
            raise ValueError(
                f"conv at {'/'.join(map(str, path))}: {attr}={value!r} is not supported by "
                "the patch representation"
            )
    if getattr(conv, "feature_group_count", 1) != 1:
        raise ValueError(
            f"conv at {'/'.join(map(str, path))}: feature_group_count="
            f"{conv.feature_group_count} is not supported by the patch representation"
        )
    strides = conv.strides if conv.strides is not None else 1
    padding = conv.padding
    if isinstance(padding, str) and padding.upper() not in ("SAME", "VALID"):
        raise ValueError(
            f"conv at {'/'.join(map(str, path))}: padding={padding!r} is not supported by the "
            "patch representation (use 'SAME', 'VALID', an int or pairs)"
        )
    return {
        "kernel_size": tuple(conv.kernel_size),
        "strides": strides if isinstance(strides, int) else tuple(strides),
        "padding": padding if isinstance(padding, (str, int)) else tuple(map(tuple, padding)),
    }


def layer_kinds(model: nnx.Module) -> dict[Path, tuple[str, dict[str, Any]]]:
    """``layer path -> (kind, conv settings)`` for every Linear / Conv / multi-head layer.

    ``kind`` is ``"dense"``, ``"conv"`` or ``"multi_head"``; the settings dict is empty
    except for convs. Paths are those of :func:`clax.models.capture_layer_inputs`.
    """
    kinds: dict[Path, tuple[str, dict[str, Any]]] = {}
    for path, node in nnx.iter_graph(model):
        path = tuple(path)
        if path in kinds or not isinstance(node, DEFAULT_LAYER_TYPES):
            continue
        if isinstance(node, MultiHeadLinear):
            kinds[path] = ("multi_head", {})
        elif isinstance(node, nnx.Conv):
            kinds[path] = ("conv", _conv_settings(path, node))
        else:
            kinds[path] = ("dense", {})
    return kinds


def _rows(kind: str, settings: dict[str, Any], inputs: jax.Array) -> jax.Array:
    """The input rows ``(m, n_in)`` of one layer, in sample-major order."""
    if kind == "conv":
        patches = conv_patches(inputs, **settings)
        return patches.reshape(-1, patches.shape[-1])
    return inputs.reshape(-1, inputs.shape[-1])  # (B, D) or tokens (B, N, D)


def _subsample(rows: jax.Array, max_columns: int | None, key: jax.Array) -> jax.Array:
    m = rows.shape[0]
    if max_columns is None or m <= max_columns:
        return rows
    idx = jax.random.choice(key, m, (max_columns,), replace=False)
    return rows[jnp.sort(idx)]


def representation_matrices(
    model: nnx.Module,
    x: jax.Array,
    task_ids: jax.Array | None = None,
    *,
    max_columns: int | None = DEFAULT_MAX_COLUMNS,
    key: jax.Array | None = None,
    include_multi_head: bool = True,
) -> dict[Path, jax.Array]:
    """Representation matrices ``R`` (``n_in × m``) of every kernel, from one forward pass.

    Runs ``model(x, task_ids)`` as it is (call ``model.eval()`` first for GPM: dropout off,
    BatchNorm running statistics) and records each layer's input: a Dense / multi-head
    layer gives one column per example, a Dense layer applied to tokens ``(B, L, in)`` one
    per (example, token), a conv one column per (example, output position), its patch
    flattened as ``(kh, kw, c_in)``. Matrices
    with more than ``max_columns`` columns keep a random subset of columns (without
    replacement, in order). Traceable: call it under ``jax.jit`` / ``nnx.jit``, or use
    :func:`collect_representations` on a split model.

    Args:
        model: An NNX model whose layers are ``nnx.Linear``, ``nnx.Conv`` or
            :class:`~clax.models.MultiHeadLinear`.
        x: A batch of inputs.
        task_ids: Task ids for a multi-head model.
        max_columns: Cap on the columns of each matrix (None: no cap).
        key: PRNG key for the column subsample (default ``PRNGKey(0)``).
        include_multi_head: Also return multi-head kernels' matrices (GPM never projects
            them, but they are representations too).

    Returns:
        ``{kernel path: R}`` where the kernel path is the layer path plus ``"kernel"``,
        e.g. ``("layers", 0, "kernel")``, as in the model's parameter dict.

    Raises:
        ValueError: On a conv with dilation, feature groups or circular padding, or a
            non-positive ``max_columns``.
    """
    if max_columns is not None and (
        isinstance(max_columns, bool) or not isinstance(max_columns, int) or max_columns < 1
    ):
        raise ValueError(f"max_columns must be a positive int or None, got {max_columns!r}")
    key = jax.random.PRNGKey(0) if key is None else key
    kinds = layer_kinds(model)
    _, inputs = capture_layer_inputs(model, x, task_ids)
    out: dict[Path, jax.Array] = {}
    for i, (path, layer_input) in enumerate(sorted(inputs.items(), key=lambda kv: str(kv[0]))):
        kind, settings = kinds[path]
        if kind == "multi_head" and not include_multi_head:
            continue
        rows = _subsample(_rows(kind, settings, layer_input), max_columns,
                          jax.random.fold_in(key, i))
        out[path + ("kernel",)] = rows.T.astype(jnp.float32)
    return out


@functools.lru_cache(maxsize=32)
def _jitted_collector(graphdef: Any, max_columns: int | None, include_multi_head: bool):
    def collect(params, model_state, x, task_ids, key):
        model = nnx.merge(graphdef, params, model_state)
        return representation_matrices(
            model, x, task_ids, max_columns=max_columns, key=key,
            include_multi_head=include_multi_head,
        )

    return jax.jit(collect)


def collect_representations(
    model_fns: Any,
    params: Any,
    model_state: Any,
    x: jax.Array,
    task_ids: jax.Array | None = None,
    *,
    max_columns: int | None = DEFAULT_MAX_COLUMNS,
    key: jax.Array | None = None,
    include_multi_head: bool = True,
) -> dict[Path, jax.Array]:
    """Jitted :func:`representation_matrices` on a split model, in evaluation mode.

    Args:
        model_fns: A :class:`clax.core.ModelFns` (its eval-mode graph is used,
            as GPM collects representations with the model in ``eval()`` mode).
        params: The parameter dict.
        model_state: The other model variables (BatchNorm statistics).
        x: Sample inputs, e.g. 300 training examples: any array or pytree the model
            takes (images, token ids ``(B, L)``).
        task_ids: Their task ids (needed by multi-head models).
        max_columns: Cap on the columns of each matrix.
        key: PRNG key for the column subsample.
        include_multi_head: Include multi-head kernels.

    Returns:
        ``{kernel path: R}``, ``R`` of shape ``(n_in, m)`` float32.
    """
    fn = _jitted_collector(model_fns.graphdef_eval, max_columns, bool(include_multi_head))
    key = jax.random.PRNGKey(0) if key is None else key
    return fn(params, model_state, jax.tree.map(jnp.asarray, x), task_ids, key)
