"""Gradient Projection Memory (GPM) as a registered method.

Saha, Garg, Roy, "Gradient Projection Memory for Continual Learning", ICLR 2021
(https://arxiv.org/abs/2103.09762; code ``sahagobinda/GPM`` @1a238ec). The pieces:

* memory: one fixed-capacity :class:`~clax.subspace.SubspaceBasis` per projected kernel
  (:func:`gpm_memory`), capacity = the kernel's fan-in;
* every step: :func:`clax.transforms.subspace_projection` removes the gradient's component
  in each basis span and (after the first task) zeroes the 1-D parameters;
* every task end: :func:`gpm_consolidate` collects representation matrices on a sample of
  the task's training data (:func:`clax.subspace.collect_representations`) and grows the
  bases with GPM's energy rule (:func:`clax.subspace.grow_basis`).

Coverage: ``mlp`` and ``cnn`` (every Dense and Conv kernel, the single head included as in
GPM's Permuted-MNIST MLP; multi-head heads are never projected). ``resnet18``: convs
(shortcuts included) and the head are projected and BatchNorm scales/offsets frozen after
the first task, but BatchNorm *running statistics* keep moving (GPM uses batch statistics
at test time, ``track_running_stats=False``), so old tasks can still drift. ``vit``: the
patch conv and every Linear are projected and LayerNorms frozen, but ``cls_token`` and
``pos_embed`` are neither projected nor frozen. ``causal_lm`` (token sequences, the
``language_modeling`` objective): every Linear is projected, its representation columns
being the token inputs of the sampled sequences (:mod:`clax.subspace.representations`),
and LayerNorms are frozen, but the token embedding table ``embed/embedding`` and
``pos_embed`` are neither projected nor frozen (they are not Linear / Conv kernels:
:func:`gpm_memory` only builds bases for 2-D / 4-D leaves named ``kernel``), so old
domains can drift through them. Both run; only mlp/cnn reproduce GPM.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from clax._validation import (
    check_bool,
    check_choice,
    check_int,
    check_positive_int,
    check_real,
    check_sequence,
)
from clax.core import (
    BoundaryContext,
    Method,
    ModelFns,
    TrainArrays,
    TrainState,
    after,
    before,
    num_examples,
    register_method,
)
from clax.models.capture import capture_layer_inputs
from clax.params.paths import path_str, plain_path, pure_tree
from clax.subspace.basis import SubspaceBasis, empty_basis, grow_basis
from clax.subspace.representations import DEFAULT_MAX_COLUMNS, collect_representations
from clax.transforms.projection import bases_by_path, one_dimensional, subspace_projection
from clax.typing import Path, PyTree


def _projected_fan_in(path: Path, leaf: Any) -> int | None:
    """Fan-in of a Dense ``(in, out)`` or conv ``(kh, kw, in, out)`` kernel, else None.

    Multi-head kernels ``(T, D, C)`` (3-D) are task heads: GPM never projects them.
    """
    if not path or path[-1] != "kernel":
        return None
    shape = np.shape(leaf)
    if len(shape) == 2:
        return int(shape[0])
    if len(shape) == 4:
        return int(math.prod(shape[:3]))
    return None


def _is_task_head(path: Path, leaf: Any) -> bool:
    # MultiHeadLinear: kernel (T, D, C) and bias (T, C).
    return bool(path) and ((path[-1] == "kernel" and np.ndim(leaf) == 3)
                           or (path[-1] == "bias" and np.ndim(leaf) == 2))


def unprotected_mask(params: PyTree) -> PyTree:
    """True at tensors GPM neither projects nor freezes by default.

    Those are the leaves with no basis (not a Dense / conv ``kernel``) that are not 1-D
    (frozen by ``freeze_1d_after_first_task``) and not multi-head task heads (which train
    freely by design): token and position embeddings, cls tokens, prompt tokens. Old tasks
    can drift through them.
    """
    params = pure_tree(params)
    return jax.tree_util.tree_map_with_path(
        lambda p, x: (np.ndim(x) > 1 and _projected_fan_in(plain_path(p), x) is None
                      and not _is_task_head(plain_path(p), x)), params)


def unprotected_paths(params: PyTree) -> list[str]:
    """'/'-joined paths of :func:`unprotected_mask`'s True leaves (for reports)."""
    flags = jax.tree_util.tree_leaves_with_path(unprotected_mask(params))
    return [path_str(p) for p, flag in flags if flag]


def _freeze_unprojected(params: PyTree) -> PyTree:
    return jax.tree.map(lambda a, b: a or b, one_dimensional(params), unprotected_mask(params))


def gpm_memory(params: PyTree, dtype: Any = jnp.float32) -> PyTree:
    """Empty bases for every projected kernel, as a partial mirror of ``params``.

    Args:
        params: The parameter dict (leaves may be arrays or ``ShapeDtypeStruct``).
        dtype: Dtype of the basis vectors.

    Returns:
        Nested dicts with the params' keys, holding a rank-0 :class:`SubspaceBasis` of
        capacity ``n_in`` at each Dense / conv kernel (and nothing else: 3-D multi-head
        kernels, embedding tables such as ``embed/embedding``, position embeddings and
        normalisation parameters get no basis and are never projected).
    """

    def build(tree: Any, prefix: Path) -> Any:
        if isinstance(tree, dict):
            out = {}
            for k, v in tree.items():
                sub = build(v, prefix + (k,))
                if sub is not None:
                    out[k] = sub
            return out or None
        n = _projected_fan_in(prefix, tree)
        return None if n is None else empty_basis(n, dtype=dtype)

    params = pure_tree(params)  # an nnx.State (of nnx.Param) reads as its pure dict
    if not isinstance(params, dict):
        raise TypeError(f"params must be a nested dict (nnx.to_pure_dict), got {type(params)}")
    return build(params, ()) or {}


# ------------------------------------------------------------------ user-loop helpers
# (shared with clax.methods.ewc: a model as a user has it, and task data as arrays)

_FNS_CACHE: dict[tuple, ModelFns] = {}


def model_arrays(model: Any, params: PyTree = None, model_state: PyTree = None, *,
                 caller: str) -> tuple[ModelFns, PyTree, PyTree]:
    """``(ModelFns, params, model_state)`` (pure dicts) from what a user's loop holds.

    Args:
        model: An ``nnx.Module`` (split with :meth:`clax.core.ModelFns.split`; its
            parameters and other variables are used unless given) or a `ModelFns`.
        params: The parameters (pure dict or ``nnx.State``); required with a `ModelFns`.
        model_state: The non-parameter variables (BatchNorm statistics); with a
            `ModelFns` and no such variables, leave it None (``{}``).
        caller: The public function's name, for error messages.

    Splitting the same architecture again returns the same `ModelFns` object (cached on
    its graph), so jitted helpers keyed on it (the Fisher) do not recompile every task.
    """
    if isinstance(model, nnx.Module):
        fns, own_params, own_state = ModelFns.split(model)
        key = (fns.graphdef_train, fns.graphdef_eval, fns.input_shape, fns.num_classes,
               fns.num_tasks)
        try:
            fns = _FNS_CACHE.setdefault(key, fns)
        except TypeError:  # an unhashable graph: no cache
            pass
        while len(_FNS_CACHE) > 16:
            _FNS_CACHE.pop(next(iter(_FNS_CACHE)))
        params = own_params if params is None else pure_tree(params)
        model_state = own_state if model_state is None else pure_tree(model_state)
        return fns, params, model_state
    if isinstance(model, ModelFns):
        if params is None:
            raise TypeError(f"{caller}: with a ModelFns as model, pass params= (and "
                            "model_state= if the model has non-parameter variables)")
        return model, pure_tree(params), {} if model_state is None else pure_tree(model_state)
    raise TypeError(f"{caller}: model must be an nnx.Module or a clax.core.ModelFns, got "
                    f"{type(model).__name__}")


def task_arrays(data: Any, *, caller: str, need_y: bool) -> TrainArrays:
    """`data` as `TrainArrays`: anything with ``.x`` (``.y``, ``.task_ids``), a tuple
    ``(x, y)`` / ``(x, y, task_ids)``, or (``need_y=False``) the inputs ``x`` alone.
    Missing task ids are all 0; a missing ``y`` (not needed) is None."""
    if hasattr(data, "x"):
        x, y, task_ids = data.x, getattr(data, "y", None), getattr(data, "task_ids", None)
    elif isinstance(data, tuple) and len(data) in (2, 3):
        x, y, task_ids = data[0], data[1], data[2] if len(data) == 3 else None
    elif isinstance(data, tuple):
        raise TypeError(f"{caller}: data as a tuple must be (x, y) or (x, y, task_ids), got "
                        f"{len(data)} items")
    else:
        x, y, task_ids = data, None, None
    if need_y and y is None:
        raise TypeError(f"{caller}: data needs targets: pass (x, y), (x, y, task_ids) or a "
                        "clax.core.TrainArrays")
    n = num_examples(x)
    if task_ids is None:
        task_ids = np.zeros((n,), np.int32)
    elif np.shape(task_ids) != (n,):
        raise ValueError(f"{caller}: task_ids must have shape ({n},) like the inputs' "
                         f"leading axis, got {np.shape(task_ids)}")
    return TrainArrays(x=x, y=y, task_ids=np.asarray(task_ids, np.int32))


def forward_order(model_fns: Any, params: PyTree, model_state: PyTree, x: jax.Array,
                  task_ids: jax.Array | None) -> list[str]:
    """Kernel paths (``"layers/0/kernel"``) in the order the forward pass reaches them.

    Traced abstractly (``jax.eval_shape``): no computation.
    """
    order: list[str] = []

    def trace(p, s, xb, tb):
        model = nnx.merge(model_fns.graphdef_eval, p, s)
        _, inputs = capture_layer_inputs(model, xb, tb)  # insertion order = call order
        order.extend(path_str(tuple(k) + ("kernel",)) for k in inputs)
        return jnp.zeros(())

    jax.eval_shape(trace, params, model_state, x, task_ids)
    return order


def layer_thresholds_by_path(
    paths_in_order: Sequence[str], threshold: float, layer_thresholds: Sequence[float],
    increment: float, task_index: int,
) -> dict[str, float]:
    """``ε_l(t) = (layer_thresholds[l] or threshold) + increment · t`` per kernel path."""
    if layer_thresholds and len(layer_thresholds) != len(paths_in_order):
        raise ValueError(
            f"layer_thresholds has {len(layer_thresholds)} values but the model has "
            f"{len(paths_in_order)} projected kernels (in forward order: "
            f"{', '.join(paths_in_order)})"
        )
    base = list(layer_thresholds) if layer_thresholds else [threshold] * len(paths_in_order)
    out = {}
    for path, eps in zip(paths_in_order, base, strict=True):
        value = float(eps) + increment * task_index
        if not 0.0 < value < 1.0:
            raise ValueError(
                f"threshold for {path!r} at task {task_index} is {eps} + {increment}*"
                f"{task_index} = {value}, outside (0, 1); lower threshold_increment"
            )
        out[path] = value
    return out


def _host_rng(key: jax.Array) -> np.random.Generator:
    """A numpy generator seeded by a JAX key (host-side sampling needs no compilation)."""
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    return np.random.default_rng(np.asarray(key, np.uint32).ravel().tolist())


def _sample(train: Any, num_samples: int, key: jax.Array) -> tuple[Any, np.ndarray]:
    """``num_samples`` distinct random training examples (all if the task is smaller).

    Only the inputs are returned (any array or pytree: images, token ids): the
    representations are the layers' inputs, whatever the targets are."""
    n = len(train.task_ids)
    count = min(num_samples, n)
    idx = np.sort(_host_rng(key).choice(n, count, replace=False))
    return (jax.tree.map(lambda a: np.asarray(a)[idx], train.x),
            np.asarray(train.task_ids[idx], np.int32))


def gpm_update_memory(
    model: Any,
    memory: PyTree | None,
    data: Any,
    *,
    task_index: int,
    params: PyTree = None,
    model_state: PyTree = None,
    threshold: float = 0.97,
    layer_thresholds: Sequence[float] = (),
    threshold_increment: float = 0.0,
    num_samples: int = 300,
    max_columns: int | None = DEFAULT_MAX_COLUMNS,
    key: jax.Array | None = None,
) -> PyTree:
    """GPM's task-end update as a plain function: the new bases after task `task_index`.

    ``num_samples`` random examples of `data` are passed through the model in evaluation
    mode; each projected kernel gets its representation matrix (Dense: one column per
    example, or per token for sequences; conv: one per patch; at most ``max_columns``)
    and its basis grows by :func:`~clax.subspace.grow_basis` with the layer's threshold,
    using the first-task rule at task 0 and the incremental rule after (as GPM's
    ``update_GPM``). The ``gpm`` method's ``consolidate`` hook is this function.

    In a user's own loop (``nnx.Optimizer``)::

        tx = clax.before(subspace_projection(freeze_mask=one_dimensional))(optax.sgd(0.01))
        optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
        bases = gpm_memory(nnx.state(model, nnx.Param))
        for t, task in enumerate(tasks):
            ...  # steps: optimizer.update(model, grads, bases=bases)
            bases = gpm_update_memory(model, bases, task.x_train, task_index=t,
                                      key=jax.random.key(t))

    Args:
        model: An ``nnx.Module`` (its current parameters are used) or a
            :class:`clax.core.ModelFns` with ``params=`` (and ``model_state=``).
        memory: The bases from :func:`gpm_memory` or a previous update (None: start from
            empty bases).
        data: The task's inputs ``x`` (an array or pytree with a leading example axis),
            ``(x, y)``, ``(x, y, task_ids)`` or a ``clax.core.TrainArrays`` / ``Batch``
            (task ids: for multi-head models; default all 0).
        task_index: The task just trained (0 = first task).
        params: The parameters (pure dict or ``nnx.State``); default the model's own.
        model_state: The non-parameter variables; default the model's own (``{}`` with a
            ``ModelFns``).
        threshold: Default ``ε`` for every layer, in ``(0, 1)``.
        layer_thresholds: Per-kernel ``ε`` in forward order (overrides ``threshold``).
        threshold_increment: Added per task: ``ε + increment · t`` (GPM's AlexNet uses
            ``0.97 + 0.003 t``).
        num_samples: Examples of the task used for the representations.
        max_columns: Cap on the columns of each representation matrix.
        key: PRNG key of the sample (default: derived from ``task_index``).

    Returns:
        The new bases: same structure, shapes and dtypes as `memory` (so the jitted step
        taking ``bases=`` does not recompile).

    Raises:
        TypeError: On a model that is neither an ``nnx.Module`` nor a ``ModelFns``, a
            ``ModelFns`` without ``params``, or hyperparameters of the wrong type.
        ValueError: On hyperparameters out of range or thresholds per task outside
            ``(0, 1)``.
    """
    caller = "gpm_update_memory"
    task_index = check_int("task_index", task_index, low=0)
    threshold = _check_unit("threshold", threshold)
    layer_thresholds = check_sequence("layer_thresholds", layer_thresholds, _check_unit)
    threshold_increment = check_real("threshold_increment", threshold_increment, 0.0, 1.0,
                                     low_open=False, high_open=True)
    num_samples = check_positive_int("num_samples", num_samples)
    if max_columns is not None:
        max_columns = check_positive_int("max_columns", max_columns)
    fns, params, model_state = model_arrays(model, params, model_state, caller=caller)
    if memory is None:
        memory = gpm_memory(params)
    train = task_arrays(data, caller=caller, need_y=False)
    key = jax.random.fold_in(jax.random.key(0), task_index) if key is None else key

    by_path = bases_by_path(memory)
    if not by_path:
        return memory
    k_sample, k_cols = jax.random.split(key)
    x, task_ids = _sample(train, num_samples, k_sample)
    first_x = jax.tree.map(lambda a: a[:1], x)
    order = [p for p in forward_order(fns, params, model_state, first_x, task_ids[:1])
             if p in by_path]
    order += sorted(set(by_path) - set(order))  # kernels the forward pass did not reach
    eps = layer_thresholds_by_path(order, threshold, layer_thresholds, threshold_increment,
                                   task_index)
    reps = collect_representations(
        fns, params, model_state, x, task_ids,
        max_columns=max_columns, key=k_cols, include_multi_head=False,
    )
    reps = {path_str(k): v for k, v in reps.items()}
    first = task_index == 0

    def grow(path, basis):
        name = path_str(plain_path(path))
        if name not in reps:  # a layer the forward pass skipped: nothing to protect
            return basis
        return grow_basis(basis, reps[name], eps[name], first=first)

    return jax.tree_util.tree_map_with_path(
        grow, memory, is_leaf=lambda x: isinstance(x, SubspaceBasis))


def gpm_consolidate(
    state: TrainState,
    ctx: BoundaryContext,
    *,
    threshold: float = 0.97,
    layer_thresholds: Sequence[float] = (),
    threshold_increment: float = 0.0,
    num_samples: int = 300,
    max_columns: int | None = DEFAULT_MAX_COLUMNS,
) -> TrainState:
    """The ``gpm`` method's task-end hook: :func:`gpm_update_memory` on the train state.

    Args:
        state: The train state (``memory`` as built by :func:`gpm_memory`).
        ctx: The boundary context (``train``, ``model``, ``rng``, ``task_index``).
        threshold, layer_thresholds, threshold_increment, num_samples, max_columns: As in
            :func:`gpm_update_memory`.

    Returns:
        The state with grown bases (same shapes and dtypes).
    """
    memory = gpm_update_memory(
        ctx.model, state.memory, ctx.train, task_index=ctx.task_index, params=state.params,
        model_state=state.model_state, threshold=threshold, layer_thresholds=layer_thresholds,
        threshold_increment=threshold_increment, num_samples=num_samples,
        max_columns=max_columns, key=ctx.rng)
    return state._replace(memory=memory)


def _check_unit(name: str, value: Any) -> float:
    """An energy threshold ``ε`` in ``(0, 1)``."""
    return check_real(name, value, 0.0, 1.0, low_open=True, high_open=True)


@register_method("gpm")
def gpm(
    *,
    threshold: float = 0.97,
    layer_thresholds: tuple = (),
    threshold_increment: float = 0.0,
    num_samples: int = 300,
    max_columns: int = DEFAULT_MAX_COLUMNS,
    freeze_1d_after_first_task: bool = True,
    unprojected: str = "train",
    project: str = "gradient",
    rank_buckets: int = 4,
    implementation: str = "xla",
) -> Method:
    """Gradient Projection Memory (Saha, Garg, Roy, ICLR 2021).

    After task ``t`` each layer ``l`` keeps an orthonormal basis ``M_l`` of the input
    directions that carry at least a fraction ``ε_l`` of the energy of its inputs on the
    tasks seen so far (:func:`clax.subspace.grow_basis`). Later gradients are projected
    onto the orthogonal complement, ``G_l ← (I − M_l M_lᵀ) G_l``, so the layer's outputs
    on old inputs do not move (to the extent the basis captures them). 1-D parameters
    (biases, normalisation) are frozen from the second task on, as GPM zeroes them; task
    heads of a multi-head model train freely.

    Defaults follow GPM's code: 300 samples (Permuted MNIST); thresholds there are
    ``layer_thresholds=(0.95, 0.99, 0.99)`` for the MLP 784-100-100-10, and
    ``threshold=0.97, threshold_increment=0.003`` for AlexNet on CIFAR-100. GPM trains with
    plain SGD, where projecting the gradient (``project="gradient"``) also makes the
    update orthogonal; with momentum/Adam use ``project="update"`` (the projection runs
    after the optimizer) for an orthogonal update.

    Args:
        threshold: ``ε`` for every projected kernel, in ``(0, 1)``.
        layer_thresholds: Per-kernel ``ε`` in forward order (e.g. ``(0.95, 0.99, 0.99)``);
            empty: ``threshold`` everywhere.
        threshold_increment: ``ε_l(t) = ε_l + increment · t`` (``>= 0``).
        num_samples: Training examples of each task for the representations.
        max_columns: Cap on the columns of a representation matrix (conv patches).
        freeze_1d_after_first_task: Zero the updates of 1-D parameters once a basis exists.
        unprojected: What happens to tensors with no basis that are not 1-D or task heads
            (token / position embeddings, cls and prompt tokens: :func:`unprotected_mask`):
            ``"train"`` (GPM's behaviour; they are listed in a warning at the first
            consolidation, as they are unprotected) or ``"freeze"`` (zeroed from the
            second task on, with the 1-D parameters). The freezing zeroes the *gradient*
            with ``project="gradient"``: with SGD the leaves stay fixed, but an optimizer
            with momentum (Adam) still moves them by its stored moments; use
            ``project="update"`` for an exact freeze with Adam.
        project: ``"gradient"`` (before the optimizer, as GPM) or ``"update"`` (after it).
        rank_buckets: Cost buckets of :func:`clax.transforms.subspace_projection`.
        implementation: ``"xla"`` or ``"pallas"`` (the fused projection kernel; see
            :func:`clax.transforms.subspace_projection`).

    Returns:
        The method.

    Raises:
        TypeError: On a hyperparameter of the wrong type (e.g. a float ``num_samples``).
        ValueError: On a hyperparameter outside its range.
    """
    threshold = _check_unit("threshold", threshold)
    layer_thresholds = check_sequence("layer_thresholds", layer_thresholds, _check_unit)
    threshold_increment = check_real("threshold_increment", threshold_increment, 0.0, 1.0,
                                     low_open=False, high_open=True)
    num_samples = check_positive_int("num_samples", num_samples)
    max_columns = check_positive_int("max_columns", max_columns)
    freeze_1d_after_first_task = check_bool("freeze_1d_after_first_task",
                                            freeze_1d_after_first_task)
    project = check_choice("project", project, ("gradient", "update"))
    unprojected = check_choice("unprojected", unprojected, ("train", "freeze"))
    rank_buckets = check_positive_int("rank_buckets", rank_buckets)
    if unprojected == "freeze":
        freeze = _freeze_unprojected if freeze_1d_after_first_task else unprotected_mask
    else:
        freeze = one_dimensional if freeze_1d_after_first_task else None
    reported = []

    tx = subspace_projection(
        freeze_mask=freeze,
        rank_buckets=rank_buckets,
        implementation=implementation,
    )

    def consolidate(state: TrainState, ctx: BoundaryContext) -> TrainState:
        if unprojected == "train" and not reported:
            reported.append(True)
            loose = unprotected_paths(state.params)
            if loose:
                logging.warning(
                    "gpm: %d tensor(s) are neither projected nor frozen by GPM, so old tasks "
                    "can drift through them (unless frozen otherwise, e.g. by a peft mask): "
                    "%s%s; set unprojected='freeze' to freeze them",
                    len(loose), ", ".join(loose[:4]), " ..." if len(loose) > 4 else "")
        return gpm_consolidate(
            state, ctx, threshold=threshold, layer_thresholds=layer_thresholds,
            threshold_increment=float(threshold_increment), num_samples=num_samples,
            max_columns=max_columns,
        )

    return Method(
        name="gpm",
        optimizer=before(tx) if project == "gradient" else after(tx),
        init_memory=gpm_memory,
        extra_args=lambda ctx: {"bases": ctx.memory},
        consolidate=consolidate,
    )
