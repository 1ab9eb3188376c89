r"""Diagonal Fisher information of a model's loss, estimated over a dataset.

For a model with outputs ``f(x; θ)`` and the per-example loss ``ℓ(x, y; θ)`` of an
objective (:class:`clax.core.Objective`: ``objective.per_example_loss``; by default
:class:`clax.core.Classification`, ``ℓ = −log softmax(f(x; θ))_y``), every estimator here
returns a tree shaped like ``θ`` (float32) whose entries estimate ``E[(∂ℓ/∂θ_j)²]``. An
example is whatever the objective scores as one: an image and its class, or, for
:class:`clax.core.LanguageModeling`, a whole sequence with ``ℓ_i`` the mean next-token NLL
over its counted tokens (targets ``>= 0``), so ``g_i`` is the gradient of that sequence's
loss. Three independent choices:

**Labels** (``labels=``), which targets ``y`` enter the gradient:

* ``"empirical"``: the dataset's targets. This is the *empirical Fisher*, what EWC in
  Avalanche and SSD compute.
* ``"true"``: ``ŷ ~ p(·|x; θ)``, one sample per example drawn by
  ``objective.sample_targets(outputs, batch, fold_in(key, b))`` for batch ``b``
  (classification: ``jax.random.categorical`` of the masked logits; LM: one token per
  counted position): a one-sample Monte-Carlo estimate of the *true Fisher*
  ``E_x E_{ŷ~p(·|x)} (∂ℓ(x, ŷ)/∂θ)²`` (Kirkpatrick et al., 2017). Deterministic given
  ``key``.
* ``"argmax"``: ``ŷ = objective.predicted_targets``, the most likely class (token) (GT-RIPL
  Continual-Learning-Benchmark's default, ``empFI=False``).

**Granularity** (``granularity=``), with ``g_i = ∂ℓ_i/∂θ`` the gradient of example ``i``,
``N`` examples split in order (no shuffling) into ``N_b = ⌈N / B⌉`` batches ``𝓑_b`` of
``batch_size`` ``B`` (the last one possibly smaller):

* ``"example"``: the exact mean of squared per-example gradients,
  ``F = (1/N) Σ_i g_i²``. Independent of ``B``.
* ``"batch"``: the square of each batch-mean gradient, averaged over batches,
  ``F = (1/N_b) Σ_b ( (1/|𝓑_b|) Σ_{i∈𝓑_b} g_i )²`` (every example weighs the same: for
  sequences with different numbers of counted tokens this is not the gradient of
  ``LanguageModeling.loss``, which pools the batch's tokens). This is what SSD
  (``ParameterPerturber.calc_importance``) and Avalanche's ``EWCPlugin`` compute with a
  PyTorch DataLoader of batch size ``B`` (the last partial batch included). It is roughly
  ``1/B`` times the per-example value where gradients of different examples are
  uncorrelated, and depends on ``B`` and on the order of the data.

**Normalization** (``normalization=``): ``"mean"`` as in the formulas above; ``"sum"``
drops the leading ``1/N`` (example) or ``1/N_b`` (batch). GT-RIPL's EWC accumulates
``Σ_b g_b² · B / N_b``, i.e. ``B`` times the ``"batch"``/``"mean"`` value.

**How the per-example path avoids a batch x params array.** For a Dense layer
``out_i = a_i W + b``, the gradient of example ``i`` is ``a_i ⊗ δ_i`` (and ``δ_i`` for the
bias), with ``δ_i = ∂ℓ_i/∂out_i``, so ``Σ_i (a_i ⊗ δ_i)² = (a²)ᵀ(δ²)``: one matmul of the
squared layer inputs with the squared output gradients. A Dense layer applied to every
token of an example (inputs ``A_i`` ``(L, in)``, output gradients ``Δ_i`` ``(L, out)``, as
in a transformer) has ``g_i = Σ_t a_t δ_tᵀ = A_iᵀ Δ_i``, whose square is not
``Σ_t a_t² δ_t²``: its kernel term is ``Σ_i (A_iᵀ Δ_i)²``, formed per example in a
``lax.scan`` over chunks of ``chunk_size`` examples (``chunk_size`` x the layer's
parameters of scratch), and its bias term ``Σ_i (Σ_t δ_t)²``. ``δ`` comes from one backward
pass, as the gradient of ``Σ_i ℓ_i`` with respect to a zero perturbation added to every
parameter-owning module's output (examples do not interact in evaluation mode, so row
``i`` of that gradient is ``δ_i``; tokens of one example may interact, as in attention);
``a`` is the module's recorded input. The same holds for
clax's multi-head linear head (per task). Every other module that owns parameters (conv
kernels and biases, normalisation scales, a ViT's class token and position embedding,
which belong to the model itself) gets its per-example gradients as the VJP of *that
module alone* on example ``i`` with cotangent ``δ_i`` (so do an LM's token embedding
table, its position embedding and its LayerNorms), in a ``lax.scan`` over chunks of
``chunk_size`` examples (``vmap`` inside a chunk; unrolled when short). A parameter
belongs to the deepest module that contains it and is called in the forward pass. Beyond
what a batch gradient holds anyway (the batch's activations and output gradients), the
working memory is ``O(params)``: the ``(a²)ᵀ(δ²)`` products, and at most ``chunk_size``
times the parameters of one per-token Dense or non-Dense module (plus ``chunk_size``
examples' activations of that module's forward pass: for parameters of the model itself,
such as a position embedding, the whole model), whatever ``B`` and ``N``
(``benchmarks/results/fisher_cost.md`` has the compiled figures).

Assumptions of the per-example path (documented, not checked): the model is evaluated in
evaluation mode (``ModelFns.graphdef_eval``: BatchNorm uses running statistics), so the
loss of example ``i`` depends only on example ``i``; each parameter is used only inside
the ``__call__`` of the module that owns it (no weight tying across modules); and in a
module call, the array arguments whose leading axis has the batch size are per-example
(sliced for the per-module VJPs) while the others are shared.

With a plain ``apply(params, x, task_ids) -> outputs`` function instead of a
:class:`~clax.core.ModelFns`, the module structure is unknown: the
per-example path then takes ``jax.vmap(jax.grad)`` over chunks of ``chunk_size`` examples
(memory ``chunk_size`` x params, compute about ``B`` single-example backward passes).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from clax.core import Batch, Classification, ModelFns, Objective, check_objective
from clax.core.batch import num_examples, take
from clax.fisher import _taps
from clax.models.heads import MultiHeadLinear
from clax.params.paths import check_same_structure, path_str, plain_path

PyTree = Any

LABELS = ("empirical", "true", "argmax")
GRANULARITIES = ("example", "batch")
NORMALIZATIONS = ("mean", "sum")

# Chunk loops up to this length are unrolled (see `_scan_chunks`).
_MAX_UNROLL = 16


# --------------------------------------------------------------------------- validation


def check_fisher(fisher: PyTree, params: PyTree, *, name: str = "fisher") -> None:
    """Checks that `fisher` is a valid diagonal Fisher for `params`.

    Structure and shapes must match ``params``; values, when concrete (not traced), must be
    finite and non-negative.

    Args:
        fisher: The Fisher tree.
        params: The parameter tree it belongs to.
        name: How the Fisher is called in error messages.

    Raises:
        ValueError: Naming the first leaf path whose structure, shape or values are wrong.
    """
    check_same_structure(fisher, params, names=(name, "params"))
    for path, leaf in jax.tree_util.tree_flatten_with_path(fisher)[0]:
        if isinstance(leaf, jax.core.Tracer):
            continue
        value = np.asarray(leaf)
        if not np.issubdtype(value.dtype, np.floating):
            raise ValueError(
                f"{name} at path {path_str(path)!r} must be a float array, got dtype "
                f"{value.dtype}"
            )
        if not np.isfinite(value).all():
            raise ValueError(
                f"{name} at path {path_str(path)!r} has {int((~np.isfinite(value)).sum())} "
                "non-finite (NaN or inf) entries"
            )
        if (value < 0).any():
            raise ValueError(
                f"{name} at path {path_str(path)!r} has {int((value < 0).sum())} negative "
                f"entries (min {value.min():.3g}); a diagonal Fisher is non-negative"
            )


def _check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


# --------------------------------------------------------------------------- losses


def _targets(objective: Objective, outputs: jax.Array, batch: Batch, labels: str,
             key: jax.Array) -> Batch:
    """`batch` with the targets entering the gradient: its own, sampled or the argmax."""
    if labels == "empirical":
        return batch
    # Targets are integers (no gradient flows into them); stop_gradient keeps it so for an
    # objective whose targets are real-valued.
    outputs = jax.lax.stop_gradient(outputs)
    if labels == "argmax":
        return objective.predicted_targets(outputs, batch)
    return objective.sample_targets(outputs, batch, key)


def _output_cotangent(objective: Objective, outputs: jax.Array, batch: Batch,
                      scale: jax.Array) -> jax.Array:
    """``∂/∂outputs Σ_i scale_i · ℓ_i`` with ``ℓ = objective.per_example_loss`` (row ``i``
    depends only on example ``i``'s outputs)."""

    def total(z):
        return jnp.sum(scale * objective.per_example_loss(z, batch))

    return jax.grad(total)(outputs).astype(outputs.dtype)


def _square_sum(tree: PyTree) -> PyTree:
    """Sum over the leading (chunk) axis of the squares, in float32."""
    return jax.tree.map(lambda g: jnp.sum(jnp.square(g.astype(jnp.float32)), axis=0), tree)


def _pad_rows(a: jax.Array, size: int, *, zeros: bool) -> jax.Array:
    """Pads axis 0 to `size` with zeros, or by repeating the last row (a valid input)."""
    n = a.shape[0]
    if n == size:
        return a
    fill = jnp.zeros_like(a[-1:]) if zeros else a[-1:]
    return jnp.concatenate([a, jnp.repeat(fill, size - n, axis=0)], axis=0)


def _chunked(a: jax.Array, chunk: int, *, zeros: bool = False) -> jax.Array:
    """``(n, ...) -> (⌈n/c⌉, c, ...)``. Inputs pad by repetition, weights and cotangents
    (``zeros=True``) by zeros, so padded rows contribute nothing."""
    n = a.shape[0]
    size = -(-n // chunk) * chunk
    return _pad_rows(a, size, zeros=zeros).reshape(size // chunk, chunk, *a.shape[1:])


def _scan_chunks(body: Callable[[Any], PyTree], xs: Any, init: PyTree, *,
                 unroll_short: bool = True) -> PyTree:
    """``Σ_chunks body(chunk)``; ``xs`` leaves are ``(n_chunks, c, ...)``.

    A ``lax.scan``, fully unrolled up to :data:`_MAX_UNROLL` chunks when ``unroll_short``:
    XLA:CPU runs convolutions inside a while loop an order of magnitude slower than
    unrolled ones. Bodies without convolutions pass False (unrolling only costs compile
    time there).
    """

    def step(acc, chunk):
        return jax.tree.map(jnp.add, acc, body(chunk)), None

    n = jax.tree.leaves(xs)[0].shape[0]
    out, _ = jax.lax.scan(step, init, xs, unroll=n if unroll_short and n <= _MAX_UNROLL else 1)
    return out


# --------------------------------------------------------------------------- per-example, taps


def _is_plain_linear(node: Any, own: list, call: _taps.Call, arrays: list) -> bool:
    return (
        type(node).__call__ is nnx.Linear.__call__
        and isinstance(node, nnx.Linear)
        and len(arrays) == 1
        and call.batched == [True]
        and arrays[0].ndim >= 2  # (B, in), or per-token inputs (B, L, ..., in)
        and set(own) <= {("kernel",), ("bias",)}
    )


def _is_plain_multihead(node: Any, own: list, call: _taps.Call, arrays: list) -> bool:
    return (
        type(node).__call__ is MultiHeadLinear.__call__
        and len(arrays) == 2
        and all(call.batched)
        and arrays[0].ndim == 2
        and set(own) <= {("kernel",), ("bias",)}
    )


def _linear_fisher(a: jax.Array, delta: jax.Array, own: list) -> dict:
    """``Σ_i (a_i ⊗ δ_i)² = (a²)ᵀ(δ²)`` and ``Σ_i δ_i²`` (Dense-layer identity)."""
    a2 = jnp.square(a.astype(jnp.float32))
    d2 = jnp.square(delta.astype(jnp.float32))
    out = {}
    for rel in own:
        out[rel] = a2.T @ d2 if rel == ("kernel",) else jnp.sum(d2, axis=0)
    return out


def _token_linear_fisher(a: jax.Array, delta: jax.Array, own: list, chunk: int) -> dict:
    """``Σ_i g_i²`` for a Dense layer applied to every token of an example.

    With ``A_i`` (T, in) the example's token inputs and ``Δ_i`` (T, out) its output
    gradients, ``g_i = A_iᵀ Δ_i = Σ_t a_t δ_tᵀ``: the square of that sum is not
    ``Σ_t a_t² δ_t²``, so the kernel term forms ``(A_iᵀ Δ_i)²`` per example, ``vmap`` over
    a chunk and ``scan`` over chunks (``chunk x in x out`` scratch, never ``B x in x out``).
    The bias gradient is ``Σ_t δ_t``, whose squares are ``(B, out)``.
    """
    b, d_in, d_out = a.shape[0], a.shape[-1], delta.shape[-1]
    a = a.astype(jnp.float32).reshape(b, -1, d_in)
    delta = delta.astype(jnp.float32).reshape(b, -1, d_out)
    out = {}
    for rel in own:
        if rel == ("bias",):
            out[rel] = jnp.sum(jnp.square(delta.sum(axis=1)), axis=0)
            continue
        c = min(chunk, b)
        # Padded chunk rows have zero Δ (zeros=True), so they add nothing.
        xs = (_chunked(a, c), _chunked(delta, c, zeros=True))

        def body(xs_chunk):
            g = jnp.einsum("cti,cto->cio", *xs_chunk)
            return jnp.sum(jnp.square(g), axis=0)

        out[rel] = _scan_chunks(body, xs, jnp.zeros((d_in, d_out), jnp.float32),
                                unroll_short=False)
    return out


def _multihead_fisher(node: MultiHeadLinear, a, task_ids, delta, own: list) -> dict:
    """Per-task Dense identity: ``F[t] = Σ_{i: t_i = t} (a_i²)ᵀ(δ_i²)`` (memory B·T·D)."""
    num_tasks, d, _ = node.kernel.shape
    onehot = jax.nn.one_hot(jnp.clip(task_ids, 0, num_tasks - 1), num_tasks,
                            dtype=jnp.float32)  # the head clips ids the same way
    a2 = jnp.square(a.astype(jnp.float32))
    d2 = jnp.square(delta.astype(jnp.float32))
    out = {}
    for rel in own:
        if rel == ("kernel",):
            rows = (onehot[:, :, None] * a2[:, None, :]).reshape(a.shape[0], num_tasks * d)
            out[rel] = (rows.T @ d2).reshape(node.kernel.shape)
        else:
            out[rel] = onehot.T @ d2
    return out


def _module_scan_fisher(node, own, calls, arrays, deltas, batch: int, chunk: int) -> dict:
    """``Σ_i g_i²`` for the parameters a module owns, by per-example VJPs of the module.

    ``g_i = Σ_calls VJP_θ(module(args_i); δ_i)``: the module is re-run on one example at a
    time (``vmap`` over a chunk, ``scan`` over chunks).
    """
    f, own_params = _taps.local_function(node, own)
    chunk = min(chunk, batch)
    # Per call: batched array leaves chunked, unbatched ones closed over.
    xs = []
    for call, arrs, delta in zip(calls, arrays, deltas, strict=True):
        batched = [_chunked(a, chunk) for a, b in zip(arrs, call.batched, strict=True) if b]
        xs.append((batched, jax.tree.map(lambda d: _chunked(d, chunk, zeros=True), delta)))

    def one_example(example):
        total = jax.tree.map(jnp.zeros_like, own_params)
        for k, (call, arrs) in enumerate(zip(calls, arrays, strict=True)):
            batched_i, delta_i = example[k]
            it = iter(batched_i)
            leaves = [next(it)[None] if b else a
                      for a, b in zip(arrs, call.batched, strict=True)]
            args, kwargs = _taps.join_call(call, leaves)
            _, vjp = jax.vjp(lambda p, args=args, kwargs=kwargs: f(p, *args, **kwargs),
                             own_params)
            (g,) = vjp(jax.tree.map(lambda d: d[None], delta_i))
            total = jax.tree.map(jnp.add, total, g)
        return total

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), own_params)
    # Unrolled only around convolutions (the XLA:CPU while-loop slowdown, see _scan_chunks).
    has_conv = any(isinstance(n, (nnx.Conv, nnx.ConvTranspose)) for _, n in nnx.iter_graph(node))
    summed = _scan_chunks(lambda c: _square_sum(jax.vmap(one_example)(c)), xs, zeros,
                          unroll_short=has_conv)
    flat = {tuple(plain_path(p)): v for p, v in jax.tree_util.tree_flatten_with_path(summed)[0]}
    return {rel: flat[rel] for rel in own}


def _taps_example_sum(fns: ModelFns, params, model_state, data: Batch, targets_fn, weights,
                      objective: Objective, chunk):
    """``(Σ_i w_i g_i², outputs)`` over one batch, by taps (see the module docstring)."""
    model = fns.module(params, model_state, train=False)
    x, task_ids = data.x, data.task_ids
    batch = num_examples(x)
    by_id = {}
    by_path = {}
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Module) and id(node) not in by_id:
            by_id[id(node)] = tuple(path)
            by_path[tuple(path)] = node

    # Discovery pass (traced, then dead code): which modules are called, output shapes.
    called: dict = {}

    def record(path, args, kwargs, out):
        called.setdefault(path, []).append(jax.tree.map(
            lambda o: jax.ShapeDtypeStruct(o.shape, o.dtype), out))
        return out

    _taps.tapped_call(model, lambda: model(x, task_ids), by_id, record)
    owners = _taps.param_owners(model, set(called))
    targets = {id(by_path[p]): p for p in owners}
    eps0 = {p: [jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), o) for o in called[p]]
            for p in owners}
    calls: dict = {p: [None] * len(called[p]) for p in owners}

    def forward(eps):
        count = {p: 0 for p in owners}
        arrays: dict = {p: [] for p in owners}

        def on_call(path, args, kwargs, out):
            k = count[path]
            count[path] += 1
            call, arrs = _taps.split_call(args, kwargs, batch)
            calls[path][k] = call
            arrays[path].append(arrs)
            return jax.tree.map(jnp.add, out, eps[path][k])

        logits = _taps.tapped_call(model, lambda: model(x, task_ids), targets, on_call)
        return logits, arrays

    logits, vjp, arrays = jax.vjp(forward, eps0, has_aux=True)
    (deltas,) = vjp(_output_cotangent(objective, logits, targets_fn(logits), weights))

    out: dict = {}
    for path, own in owners.items():
        node, cs, arrs, ds = by_path[path], calls[path], arrays[path], deltas[path]
        if len(cs) == 1 and _is_plain_linear(node, own, cs[0], arrs[0]):
            if arrs[0][0].ndim == 2:  # one input vector per example
                parts = _linear_fisher(arrs[0][0], ds[0], own)
            else:  # per-token inputs (B, L, ..., in): the token sum is squared per example
                parts = _token_linear_fisher(arrs[0][0], ds[0], own, chunk)
        elif len(cs) == 1 and _is_plain_multihead(node, own, cs[0], arrs[0]):
            parts = _multihead_fisher(node, arrs[0][0], arrs[0][1], ds[0], own)
        else:
            parts = _module_scan_fisher(node, own, cs, arrs, ds, batch, chunk)
        for rel, value in parts.items():
            _taps.set_path(out, path + rel, value)
    return _like(params, out), logits


def _like(params: PyTree, flat_nested: dict) -> PyTree:
    """Rebuilds `flat_nested` (nested dicts by path) with the exact structure of params."""

    def leaf(path, p):
        try:
            return _taps.get_path(flat_nested, plain_path(path))
        except (KeyError, IndexError, TypeError):  # a parameter no call reached: zero
            return jnp.zeros(jnp.shape(p), jnp.float32)

    return jax.tree_util.tree_map_with_path(leaf, params)


# --------------------------------------------------------------------------- generic paths


def _is_model_fns(model: Any) -> bool:
    return isinstance(model, ModelFns)


def _apply_fn(model, model_state) -> Callable:
    if _is_model_fns(model):
        return lambda p, x, t: model.apply(p, model_state, x, t, train=False)[0]
    return model


def _vmap_example_sum(apply, params, targets: Batch, weights, objective: Objective, chunk):
    """``Σ_i w_i g_i²`` by ``vmap(grad)`` over chunks of examples (memory chunk x params)."""

    def grad_one(example: Batch, wi):
        one = jax.tree.map(lambda a: a[None], example)  # a batch of one example

        def loss(p):
            outputs = apply(p, one.x, one.task_ids)
            return jnp.sqrt(wi) * objective.per_example_loss(outputs, one)[0]  # w_i ∈ {0, 1}

        return jax.grad(loss)(params)

    chunk = min(chunk, num_examples(targets.x))
    xs = (jax.tree.map(lambda a: _chunked(a, chunk), targets),
          _chunked(weights, chunk, zeros=True))
    zeros = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)
    return _scan_chunks(lambda c: _square_sum(jax.vmap(grad_one)(*c)), xs, zeros)


def _batch_sum(apply, params, data: Batch, targets_fn, weights, objective: Objective):
    """``(ḡ_b)²`` with ``ḡ_b = (1/|𝓑_b|) Σ_i g_i`` over the batch's valid rows."""
    outputs, vjp = jax.vjp(lambda p: apply(p, data.x, data.task_ids), params)
    scale = weights / jnp.maximum(jnp.sum(weights), 1.0)
    (g,) = vjp(_output_cotangent(objective, outputs, targets_fn(outputs), scale))
    return jax.tree.map(lambda v: jnp.square(v.astype(jnp.float32)), g)


# --------------------------------------------------------------------------- the jitted core


@functools.partial(
    jax.jit, static_argnames=("model", "labels", "granularity", "chunk_size", "objective"),
    donate_argnames=("acc",))
def fisher_batch_update(
    model: ModelFns | Callable[..., jax.Array],
    acc: PyTree,
    params: PyTree,
    model_state: PyTree,
    x: jax.Array,
    y: jax.Array,
    task_ids: jax.Array,
    weights: jax.Array,
    batch_key: jax.Array,
    logit_masks: jax.Array | None,
    *,
    labels: str,
    granularity: str,
    chunk_size: int,
    objective: Objective | None = None,
) -> PyTree:
    """``acc`` plus the unnormalised Fisher sum of one batch (jitted).

    Args:
        model: ``ModelFns`` (taps) or ``apply(params, x, task_ids) -> logits``; static.
        acc: Running float32 sums shaped like params (donated).
        params, model_state: The model's trees (``model_state`` unused for an apply fn).
        x, y, task_ids, weights: One batch: ``x`` and ``y`` arrays or pytrees with a
            leading ``B`` axis, ``task_ids`` and ``weights`` ``(B,)``; ``weights`` are 1
            for real examples and 0 for padding.
        batch_key: The key of this batch (used by ``labels="true"``).
        logit_masks: Used only when ``objective`` is None (then the loss is
            ``Classification(logit_masks)``): an optional ``(num_tasks, C)`` bool table,
            traced, so tables of one shape share a compilation.
        labels, granularity, chunk_size, objective: See :func:`diagonal_fisher`;
            ``objective`` is static (keep the same object across calls).

    Returns:
        ``acc + Σ_i w_i g_i²`` (example) or ``acc + ḡ_b²`` (batch), float32.
    """
    return jax.tree.map(jnp.add, acc, _batch_part(
        model, params, model_state, Batch(x, y, task_ids), weights, batch_key,
        _loss_objective(objective, logit_masks), labels=labels, granularity=granularity,
        chunk_size=chunk_size))


@functools.partial(
    jax.jit, static_argnames=("model", "labels", "granularity", "chunk_size", "objective"),
    donate_argnames=("acc",))
def fisher_group_update(
    model: ModelFns | Callable[..., jax.Array],
    acc: PyTree,
    params: PyTree,
    model_state: PyTree,
    x: jax.Array,
    y: jax.Array,
    task_ids: jax.Array,
    weights: jax.Array,
    num_batches: jax.Array,
    first_batch: jax.Array,
    key: jax.Array,
    logit_masks: jax.Array | None,
    *,
    labels: str,
    granularity: str,
    chunk_size: int,
    objective: Objective | None = None,
) -> PyTree:
    """:func:`fisher_batch_update` over the first `num_batches` of stacked batches, looped
    on the device (``lax.fori_loop``); batch ``b`` uses ``fold_in(key, first_batch + b)``.

    The leaves of ``x, y`` and ``task_ids, weights`` are ``(G, B, ...)``; ``num_batches``
    and ``first_batch`` are int32 scalars (traced: groups of any fill share one
    compilation).
    """
    stacked = Batch(x, y, task_ids)
    loss_objective = _loss_objective(objective, logit_masks)

    def body(b, total):
        part = _batch_part(model, params, model_state, take(stacked, b), weights[b],
                           jax.random.fold_in(key, first_batch + b), loss_objective,
                           labels=labels, granularity=granularity, chunk_size=chunk_size)
        return jax.tree.map(jnp.add, total, part)

    return jax.lax.fori_loop(0, num_batches, body, acc)


def _loss_objective(objective: Objective | None, logit_masks: jax.Array | None) -> Objective:
    # Built inside the trace from the traced table: new tables of one shape don't recompile.
    return Classification(logit_masks=logit_masks) if objective is None else objective


def _batch_part(model, params, model_state, data: Batch, weights, batch_key,
                objective: Objective, *, labels, granularity, chunk_size):
    """The unnormalised Fisher sum of one batch (traced)."""
    apply = _apply_fn(model, model_state)

    def targets_fn(outputs):
        return _targets(objective, outputs, data, labels, batch_key)

    if granularity == "batch":
        return _batch_sum(apply, params, data, targets_fn, weights, objective)
    if _is_model_fns(model):
        part, _ = _taps_example_sum(model, params, model_state, data, targets_fn, weights,
                                    objective, chunk_size)
        return part
    targets = targets_fn(apply(params, data.x, data.task_ids))
    return _vmap_example_sum(apply, params, targets, weights, objective, chunk_size)


def _has_conv(model: Any, params: PyTree, model_state: PyTree) -> bool:
    if not _is_model_fns(model):
        return False
    module = model.module(params, model_state, train=False)
    return any(isinstance(n, (nnx.Conv, nnx.ConvTranspose)) for _, n in nnx.iter_graph(module))


# --------------------------------------------------------------------------- public entry


def _unpack_data(data: Any) -> Batch:
    """`data` as a host `Batch` of numpy leaves, its leading (example) axes checked."""
    if hasattr(data, "x") and hasattr(data, "y"):
        x, y, t = data.x, data.y, getattr(data, "task_ids", None)
    elif isinstance(data, (tuple, list)) and len(data) in (2, 3):
        x, y, t = (*data, None) if len(data) == 2 else data
    else:
        raise TypeError(
            "data must be (x, y), (x, y, task_ids) or have .x/.y/.task_ids (e.g. "
            f"clax.core.TrainArrays or clax.core.Batch), got {type(data).__name__}"
        )
    x, y = jax.tree.map(np.asarray, x), jax.tree.map(np.asarray, y)
    if not jax.tree.leaves(x) or not jax.tree.leaves(y):
        raise ValueError("data: x and y must each hold at least one array")
    if any(np.ndim(a) == 0 for a in jax.tree.leaves((x, y))):
        raise ValueError("data: every array of x and y needs a leading (example) axis")
    n = int(np.shape(jax.tree.leaves(x)[0])[0])
    for part, tree in (("x", x), ("y", y)):
        leading = [int(np.shape(a)[0]) for a in jax.tree.leaves(tree)]
        if any(m != n for m in leading):
            raise ValueError(
                f"data: {part} must have shape (N, ...) with N = {n} (the examples of x), "
                f"got {[np.shape(a) for a in jax.tree.leaves(tree)]}")
    t = np.zeros(n, np.int32) if t is None else np.asarray(t)
    if t.shape != (n,):
        raise ValueError(f"data: task_ids must have shape ({n},), got {t.shape}")
    if n == 0:
        raise ValueError("data is empty: the Fisher needs at least one example")
    return Batch(x, y, t.astype(np.int32))


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


def _check_fits(model, params, model_state, data: Batch, objective: Objective) -> None:
    """One ValueError naming ``data.x`` / ``data.y`` if the model or the objective cannot
    read them (traced abstractly on two examples; no computation)."""
    probe = jax.tree.map(lambda a: jax.ShapeDtypeStruct((min(2, len(a)), *np.shape(a)[1:]),
                                                        a.dtype), data)
    apply = _apply_fn(model, model_state)
    try:
        outputs = jax.eval_shape(lambda p, b: apply(p, b.x, b.task_ids), params, probe)
    except (TypeError, ValueError, IndexError) as err:
        raise ValueError(
            f"data.x (shapes {[a.shape for a in jax.tree.leaves(data.x)]}) is not an input "
            f"the model accepts: {_first_line(err)}") from err
    y_shapes = [np.shape(a) for a in jax.tree.leaves(data.y)]
    try:
        losses = jax.eval_shape(objective.per_example_loss, outputs, probe)
    except (TypeError, ValueError, IndexError) as err:
        raise ValueError(
            f"data.y (shapes {y_shapes}) does not fit {type(objective).__name__}: its "
            f"per_example_loss of outputs {jax.tree.map(lambda o: o.shape, outputs)} failed with "
            f"{_first_line(err)}") from err
    b = jax.tree.leaves(probe.x)[0].shape[0]
    if not hasattr(losses, "shape") or tuple(losses.shape) != (b,):
        raise ValueError(
            f"data.y (shapes {y_shapes}) does not fit {type(objective).__name__}: "
            f"its per_example_loss must give one loss per example, (B,), but gives "
            f"{getattr(losses, 'shape', type(losses).__name__)} for a batch of {b}")


def diagonal_fisher(
    model: ModelFns | Callable[..., jax.Array],
    params: PyTree,
    data: Any,
    *,
    model_state: PyTree = None,
    labels: str = "empirical",
    granularity: str = "example",
    normalization: str = "mean",
    batch_size: int = 64,
    key: jax.Array | None = None,
    objective: Objective | None = None,
    logit_masks: Any = None,
    chunk_size: int = 16,
    loop: str = "auto",
    batches_per_call: int = 256,
) -> PyTree:
    r"""Diagonal Fisher information of `model` at `params` over `data`.

    See the module docstring for the formulas of each ``labels`` / ``granularity`` /
    ``normalization`` choice. The data is processed in order, in batches of `batch_size`
    (the last one padded and masked), looped on the device or from the host (``loop``).

    Args:
        model: A :class:`~clax.core.ModelFns` (the evaluation-mode graph is
            used; per-example gradients by the Dense identity and per-module VJPs), or a
            function ``apply(params, x, task_ids) -> logits`` (per-example gradients by
            chunked ``vmap(grad)``). Keep the same object across calls: it is a static
            argument of the jitted core, so a new object recompiles.
        params: Parameter tree (pure dict for ``ModelFns``).
        data: ``(x, y)``, ``(x, y, task_ids)`` or anything with ``.x``, ``.y`` and optional
            ``.task_ids`` (``clax.core.TrainArrays``, ``clax.core.Batch``); ``x`` and ``y``
            are arrays or pytrees with a leading example axis, ``y`` what ``objective``
            reads (class ids ``(N,)``, next-token targets ``(N, L)``, ...).
        model_state: The model's non-parameter state (BatchNorm statistics) for a
            ``ModelFns``; ignored for an apply function.
        labels: ``"empirical"``, ``"true"`` (sampled from the model) or ``"argmax"``.
        granularity: ``"example"`` or ``"batch"``.
        normalization: ``"mean"`` or ``"sum"``.
        batch_size: ``B``, a positive int. Defines the batches of ``"batch"`` granularity;
            for ``"example"`` it only sets how many examples one backward pass handles.
        key: PRNG key, required for ``labels="true"``.
        objective: The loss, a :class:`clax.core.Objective`: ``ℓ_i`` is its
            ``per_example_loss``, ``"true"`` / ``"argmax"`` targets its ``sample_targets``
            / ``predicted_targets``. Default ``Classification(logit_masks=logit_masks)``.
            For :class:`clax.core.LanguageModeling` an example is a sequence: ``ℓ_i`` is
            the mean NLL over its counted tokens (targets ``>= 0``). Static in the jitted
            core: keep the same object across calls.
        logit_masks: Optional ``(num_tasks, num_classes)`` bool table (task-incremental
            learning) of the default objective: example ``i`` sees only the classes of its
            task, as in training. Only with ``objective=None``.
        chunk_size: Examples per ``vmap`` in the per-example scans (memory knob).
        loop: ``"device"``: groups of batches looped on the device
            (:func:`fisher_group_update`); ``"host"``: one jitted call per batch
            (:func:`fisher_batch_update`); ``"auto"``: ``"host"`` for models with
            convolutions on CPU (XLA:CPU runs convolutions inside a loop an order of
            magnitude slower), ``"device"`` otherwise. Results are the same.
        batches_per_call: The most batches per device-loop call (bounds each transfer).

    Returns:
        A float32 tree shaped like `params`.

    Raises:
        ValueError / TypeError: On a bad choice, size, key or data shape.
    """
    _check_choice("labels", labels, LABELS)
    _check_choice("granularity", granularity, GRANULARITIES)
    _check_choice("normalization", normalization, NORMALIZATIONS)
    batch_size = _check_positive_int("batch_size", batch_size)
    chunk_size = _check_positive_int("chunk_size", chunk_size)
    batches_per_call = _check_positive_int("batches_per_call", batches_per_call)
    _check_choice("loop", loop, ("auto", "device", "host"))
    if not _is_model_fns(model) and not callable(model):
        raise TypeError(f"model must be a ModelFns or an apply function, got {type(model)}")
    if labels == "true" and key is None:
        raise ValueError('labels="true" samples labels from the model: pass key=')
    key = jax.random.key(0) if key is None else key
    if not (hasattr(key, "dtype") and jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)):
        key = jax.random.wrap_key_data(jnp.asarray(key, jnp.uint32))
    if objective is not None:
        check_objective(objective)
        if logit_masks is not None:
            raise ValueError("logit_masks is only for the default objective: with objective= "
                             "give the masks to the objective (Classification(logit_masks=))")
    data = _unpack_data(data)
    masks = None if logit_masks is None else jnp.asarray(logit_masks, bool)
    _check_fits(model, params, model_state, data, _loss_objective(objective, masks))
    params, model_state = jax.device_put((params, model_state))  # transferred once

    n = len(data.task_ids)
    num_batches = math.ceil(n / batch_size)
    if loop == "auto":
        # XLA:CPU runs convolutions inside a while loop an order of magnitude slower than
        # in a plain jitted call; elsewhere the on-device loop saves the dispatches.
        on_cpu = jax.default_backend() == "cpu"
        loop = "host" if on_cpu and _has_conv(model, params, model_state) else "device"
    total = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)
    static = {"labels": labels, "granularity": granularity, "chunk_size": chunk_size,
              "objective": objective}
    if loop == "host":
        # One jitted call per batch, dispatched asynchronously. Every batch has the same
        # shape (one compilation): the last one is padded by repeating its last row with
        # weight 0.
        for b in range(num_batches):
            rows = np.arange(b * batch_size, (b + 1) * batch_size)
            idx = np.minimum(rows, n - 1)
            x, y, t = take(data, idx)
            total = fisher_batch_update(
                model, total, params, model_state, x, y, t,
                (rows < n).astype(np.float32), jax.random.fold_in(key, b), masks, **static)
    else:
        # Groups of G batches (G a power of two, at most batches_per_call) go to the device
        # at once and are looped there; the last group is padded with empty batches that
        # the loop never reads.
        group = min(batches_per_call, 1 << (num_batches - 1).bit_length())
        for start in range(0, num_batches, group):
            count = min(group, num_batches - start)
            lo, hi = start * batch_size, (start + group) * batch_size
            rows = np.arange(lo, hi)

            def stack(a, lo=lo, hi=hi):
                part = a[lo:hi]  # a view; only the last group is copied to pad it
                if len(part) < hi - lo:
                    part = np.concatenate([part, np.repeat(a[-1:], hi - lo - len(part), 0)])
                return part.reshape(group, batch_size, *a.shape[1:])

            weights = (rows < n).astype(np.float32).reshape(group, batch_size)
            x, y, t = jax.tree.map(stack, data)
            total = fisher_group_update(
                model, total, params, model_state, x, y, t, weights,
                np.int32(count), np.int32(start), key, masks, **static)
    if normalization == "mean":
        denom = float(n if granularity == "example" else num_batches)
        total = jax.tree.map(lambda v: v / denom, total)
    return total
