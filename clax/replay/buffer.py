"""Device-resident replay buffers: fixed capacity, updated and sampled inside jit.

A buffer is a :class:`BufferState` (a ``NamedTuple`` of arrays: jit, scan, shard and orbax
friendly) plus pure functions:

* :func:`init_buffer` allocates ``capacity`` slots for examples shaped like a `Batch`
  example spec (``x`` and ``y`` any pytrees: images and class ids, token sequences and
  next-token targets, ...), their task ids and optionally the model's outputs (DER++'s
  logits, ``(C,)`` or ``(L, V)`` per example). Slots ``0 .. size-1`` are filled; the
  buffer never moves an entry, it only overwrites slots.
* :func:`reservoir_insert`: Vitter's algorithm R over the stream of inserted examples.
* :func:`balanced_insert`: class-balancing reservoir sampling (CBRS, Chrysakis & Moens,
  ICML 2020), with groups given by labels (class-balanced) or task ids (per-task).
* :func:`sample`: a uniform sample (with replacement) of filled slots, optionally
  restricted to slots that satisfy a mask (e.g. past tasks only).

Insertion of a batch has **sequential semantics**: the result is exactly the result of
inserting the examples one at a time, in batch order, with the random draws each one gets
(see :func:`reservoir_draws`). Inside a jitted step sharded over a mesh, the step sees the
global batch, so the buffer (replicated) is the same on every device and equal to a run on
one device.

Inserted values are cast to the buffer's dtypes, except casts that change integer values:
a float value for an integer field (labels, token ids, task ids) is refused from its dtype
(so inside jit too), and concrete integer values outside the field's range (300 into
``int8`` storage) are refused outside jit; traced values are not range checked.

Empty buffers: inside jit nothing can raise, so :func:`sample` on a buffer with no eligible
slot returns rows of slot 0 (zeros) with ``weight = 0``; callers multiply their replay
loss by ``weight``. Called eagerly (outside jit) on an empty buffer it raises ValueError
unless ``allow_empty=True``.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from clax._validation import check_choice, check_int_sequence, check_positive_int
from clax.core import Batch, take
from clax.typing import PyTree

GroupBy = Literal["label", "task"]


class BufferState(NamedTuple):
    """State of a replay buffer; every leaf has a fixed shape.

    Slots ``0 .. size-1`` hold stored examples; the others are zeros. ``x`` and ``y`` have
    the structure of the example spec the buffer was made for, each leaf with a leading
    ``capacity`` axis. The ``group_*`` fields exist only in buffers made for
    :func:`balanced_insert` (``num_groups``), and ``logits`` only in buffers that store
    model outputs (``outputs`` / ``num_logits``); otherwise they are None.
    """

    x: PyTree  # leaves (capacity, *leaf.shape), each leaf's dtype (e.g. images, tokens)
    y: PyTree  # leaves (capacity, *leaf.shape): int32 (capacity,) labels, (capacity, L)...
    task_ids: jax.Array  # int32 (capacity,)
    logits: jax.Array | None  # (capacity, *output.shape) model outputs, or None
    size: jax.Array  # int32 (): filled slots
    seen: jax.Array  # int32 (): examples offered to the buffer so far (stored or not)
    group_seen: jax.Array | None  # int32 (num_groups,): examples offered per group
    group_size: jax.Array | None  # int32 (num_groups,): stored examples per group
    group_full: jax.Array | None  # bool (num_groups,): CBRS "full" (has been the largest)


class ReplaySample(NamedTuple):
    """A sample drawn by :func:`sample`."""

    batch: Batch  # inputs, targets and task ids of the sampled slots (n leading)
    logits: jax.Array | None  # (n, *output.shape) stored model outputs, or None
    index: jax.Array  # int32 (n,) the sampled slots
    weight: jax.Array  # float32 (): 1 if any slot was eligible, else 0 (rows are dummies)


def _spec(name: str, leaf: Any) -> jax.ShapeDtypeStruct:
    """One example's leaf (no batch axis) as a ShapeDtypeStruct; arrays are accepted too."""
    if not (hasattr(leaf, "shape") and hasattr(leaf, "dtype")):
        raise TypeError(f"{name} must be a jax.ShapeDtypeStruct (one example, no batch "
                        f"axis), got {leaf!r} ({type(leaf).__name__})")
    return jax.ShapeDtypeStruct(tuple(int(d) for d in leaf.shape), leaf.dtype)


def _specs(name: str, tree: PyTree) -> PyTree:
    """`_spec` on every leaf of `tree`, errors naming the leaf's path (``example.x['a']``)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: _spec(f"{name}{jax.tree_util.keystr(path)}", leaf), tree)


def _example_spec(
    input_shape: Any, input_dtype: Any, num_logits: Any, example: Any, outputs: Any
) -> tuple[Batch, jax.ShapeDtypeStruct | None]:
    """The (example, outputs) specs of either call form of :func:`init_buffer`."""
    if example is None:
        if input_shape is None:
            raise ValueError("init_buffer needs input_shape (float inputs, int labels) or "
                             "example=Batch of jax.ShapeDtypeStruct (e.g. DataSpec.example)")
        input_shape = check_int_sequence("input_shape", input_shape, low=0, allow_empty=True)
        example = Batch(
            x=jax.ShapeDtypeStruct(input_shape, jnp.float32 if input_dtype is None
                                   else input_dtype),
            y=jax.ShapeDtypeStruct((), jnp.int32),
            task_ids=jax.ShapeDtypeStruct((), jnp.int32),
        )
        if num_logits is not None:
            if outputs is not None:
                raise ValueError("pass num_logits or outputs, not both")
            outputs = jax.ShapeDtypeStruct((check_positive_int("num_logits", num_logits),),
                                           jnp.float32)
    else:
        if input_shape is not None or input_dtype is not None or num_logits is not None:
            raise ValueError(
                "init_buffer takes input_shape/input_dtype/num_logits or example=, not both: "
                "with example=, the spec gives the dtypes and outputs= the stored outputs")
        if not isinstance(example, Batch):
            raise TypeError("example must be a clax.core.Batch of jax.ShapeDtypeStruct (e.g. "
                            f"DataSpec.example), got {type(example).__name__}")
        example = Batch(x=_specs("example.x", example.x), y=_specs("example.y", example.y),
                        task_ids=_spec("example.task_ids", example.task_ids))
    t = example.task_ids
    if t.shape != () or not jnp.issubdtype(t.dtype, jnp.integer):
        raise ValueError(f"example.task_ids must be a scalar int spec (task ids are int32 "
                         f"(B,)), got shape {t.shape} dtype {t.dtype}")
    if outputs is not None:
        outputs = _spec("outputs", outputs)
    return example, outputs


def init_buffer(
    capacity: int,
    input_shape: tuple[int, ...] | None = None,
    *,
    input_dtype: Any = None,
    num_logits: int | None = None,
    example: Batch | None = None,
    outputs: jax.ShapeDtypeStruct | None = None,
    num_groups: int | None = None,
) -> BufferState:
    """An empty buffer, for examples of any structure.

    Two call forms:

    * ``init_buffer(capacity, example=spec, outputs=out)``: ``spec`` is one example as a
      `Batch` of ``jax.ShapeDtypeStruct`` (no batch axis; ``DataSpec.example``). Each leaf
      of ``spec.x`` and ``spec.y`` becomes a ``(capacity, *leaf.shape)`` array of the leaf's
      dtype: images ``(H, W, C)`` and a scalar class id, or token ids ``(L,)`` and
      next-token targets ``(L,)`` int32 for a language model. ``out`` is the model's output
      for one example (``DataSpec.output``: logits ``(C,)`` or ``(L, V)``), stored as
      ``(capacity, *out.shape)`` of its dtype for DER++; None stores no outputs.
    * ``init_buffer(capacity, input_shape, input_dtype=float32, num_logits=None)``: the
      image-classifier shorthand, inputs ``(capacity, *input_shape)`` of ``input_dtype``,
      int32 labels ``(capacity,)`` and, with ``num_logits``, float32 logits
      ``(capacity, num_logits)``.

    Args:
        capacity: Number of slots, a positive int.
        input_shape: Shape of one input example, e.g. ``(H, W, C)`` (shorthand form).
        input_dtype: Storage dtype of the inputs (shorthand form; default float32).
        num_logits: Store a float32 logit vector of this width per example (shorthand
            form); None stores none.
        example: One example's `Batch` of ``jax.ShapeDtypeStruct`` (``task_ids`` a scalar
            int); arrays with ``shape`` and ``dtype`` are accepted as leaves too.
        outputs: One example's model output, a ``jax.ShapeDtypeStruct``, or None.
        num_groups: Number of groups (classes or tasks) for :func:`balanced_insert`;
            None makes a buffer for :func:`reservoir_insert` only.

    Returns:
        The :class:`BufferState`.

    Raises:
        TypeError: On a capacity, ``num_logits`` or ``num_groups`` that is not an int, or
            an ``example`` that is not a `Batch` of shape/dtype leaves.
        ValueError: On a non-positive capacity, ``num_logits`` or ``num_groups``, a
            negative dimension in ``input_shape``, both call forms (or neither) at once,
            or ``example.task_ids`` that is not a scalar int.
    """
    capacity = check_positive_int("capacity", capacity)
    example, outputs = _example_spec(input_shape, input_dtype, num_logits, example, outputs)
    def store(s):
        return jnp.zeros((capacity, *s.shape), s.dtype)
    group_seen = group_size = group_full = None
    if num_groups is not None:
        g = check_positive_int("num_groups", num_groups)
        group_seen = jnp.zeros((g,), jnp.int32)
        group_size = jnp.zeros((g,), jnp.int32)
        group_full = jnp.zeros((g,), bool)
    return BufferState(
        x=jax.tree.map(store, example.x),
        y=jax.tree.map(store, example.y),
        task_ids=jnp.zeros((capacity,), jnp.int32),
        logits=None if outputs is None else store(outputs),
        size=jnp.zeros((), jnp.int32),
        seen=jnp.zeros((), jnp.int32),
        group_seen=group_seen,
        group_size=group_size,
        group_full=group_full,
    )


def capacity_of(state: BufferState) -> int:
    """Number of slots of the buffer (static)."""
    return state.task_ids.shape[0]


# ------------------------------------------------------------------------ input checks


def _cast(name: str, value: Any, dtype: Any) -> jax.Array:
    """``value`` as ``dtype``, refusing the casts that silently change integer values.

    Into an integer field: a float (or complex) value is refused from its dtype alone, so
    at trace time too; a concrete (not traced) integer value must fit the field's range
    (``int8`` storage receiving 300 would wrap). Traced values are not range checked.
    """
    dtype = np.dtype(dtype)
    traced = isinstance(value, jax.core.Tracer)
    if not (traced or hasattr(value, "dtype")):
        value = np.asarray(value)  # a Python scalar or list
    src = np.dtype(value.dtype)
    # Range checks read the values: not for tracers nor arrays spread over processes.
    concrete = not traced and getattr(value, "is_fully_addressable", True)
    if np.issubdtype(dtype, np.integer):
        if not (np.issubdtype(src, np.integer) or src == np.bool_):
            raise TypeError(f"{name} has dtype {src}, but this buffer stores it as {dtype}: "
                            f"casting would truncate it; pass {dtype} (or other integer) "
                            "values")
        if concrete and np.size(value) and not np.can_cast(src, dtype, "safe"):
            low, high = np.iinfo(dtype).min, np.iinfo(dtype).max
            lo, hi = int(np.min(value)), int(np.max(value))
            if lo < low or hi > high:
                raise ValueError(f"{name} has values in [{lo}, {hi}], outside the range "
                                 f"[{low}, {high}] of the buffer's {dtype} storage (they would "
                                 "wrap)")
    return jnp.asarray(value, dtype)


def _checked_part(name: str, what: str, values: PyTree, store: PyTree, n: int) -> PyTree:
    """`values` (``batch.x`` or ``batch.y``) checked against the buffer's `store` and cast
    to its dtypes; every leaf must be ``(n, *stored leaf shape)``."""
    if jax.tree.structure(values) != jax.tree.structure(store):
        raise ValueError(f"{name} must have the structure of the buffer's {what}, "
                         f"{jax.tree.structure(store)}; got {jax.tree.structure(values)}")

    def check(path, slot, value):
        leaf = f"{name}{jax.tree_util.keystr(path)}"
        want = (n, *slot.shape[1:])
        if np.shape(value) != want:
            raise ValueError(f"{leaf} has shape {np.shape(value)}; this buffer stores {what} "
                             f"of shape {slot.shape[1:]}, so {leaf} must be {want}")
        return _cast(leaf, value, slot.dtype)

    return jax.tree_util.tree_map_with_path(check, store, values)


def _checked_inputs(
    state: BufferState, batch: Batch, logits: jax.Array | None, mask: jax.Array | None
) -> tuple[Batch, jax.Array | None, jax.Array]:
    """Shape checks (static, so they raise at trace time too) and dtype casts."""
    if not isinstance(batch, Batch):
        raise TypeError(f"batch must be a clax.core.Batch, got {type(batch).__name__}")
    x, y, t = batch
    # The batch size comes from the targets first (then inputs, then task ids), so a
    # mismatch is reported on the other parts.
    first = jax.tree.leaves((y, x, t))[0]
    if np.ndim(first) == 0:
        raise ValueError(f"every array of the batch needs a leading batch axis, got a leaf "
                         f"of shape {np.shape(first)}")
    n = np.shape(first)[0]
    y = _checked_part("batch.y", "targets", y, state.y, n)
    x = _checked_part("batch.x", "inputs", x, state.x, n)
    if np.shape(t) != (n,):
        raise ValueError(f"batch.task_ids must have shape ({n},), got {np.shape(t)}")
    if state.logits is None and logits is not None:
        raise ValueError("logits given, but this buffer stores none (init_buffer(outputs=...))")
    if state.logits is not None:
        want = (n, *state.logits.shape[1:])
        if logits is None:
            raise ValueError(f"this buffer stores model outputs: pass logits of shape {want}")
        if np.shape(logits) != want:
            raise ValueError(f"logits must have shape {want}, got {np.shape(logits)}")
        logits = jax.lax.stop_gradient(_cast("logits", logits, state.logits.dtype))
    if mask is None:
        mask = jnp.ones((n,), bool)
    elif np.shape(mask) != (n,):
        raise ValueError(f"mask must have shape ({n},), got {np.shape(mask)}")
    t = _cast("batch.task_ids", t, jnp.int32)
    return Batch(x=x, y=y, task_ids=t), logits, jnp.asarray(mask, bool)


# ------------------------------------------------------------------------ writing


def last_writer(slots: jax.Array, capacity: int) -> jax.Array:
    """``slots`` with every write that a later row overwrites replaced by ``capacity``.

    Row ``i`` writes slot ``slots[i]`` (``capacity`` or more: no write). When several rows
    write the same slot, inserting them one at a time leaves the last one; this keeps only
    that one, so a scatter with unique indices reproduces the sequential result.
    """
    n = slots.shape[0]
    later = jnp.arange(n)[None, :] > jnp.arange(n)[:, None]  # [i, j]: j comes after i
    overwritten = jnp.any(later & (slots[None, :] == slots[:, None]), axis=1)
    return jnp.where(overwritten | (slots >= capacity), capacity, slots)


def _write(state: BufferState, batch: Batch, logits: jax.Array | None, slots: jax.Array
           ) -> BufferState:
    c = capacity_of(state)
    slots = last_writer(slots, c)

    def put(store, values):
        return store.at[slots].set(values, mode="drop", unique_indices=True)

    return state._replace(
        x=jax.tree.map(put, state.x, batch.x),
        y=jax.tree.map(put, state.y, batch.y),
        task_ids=put(state.task_ids, batch.task_ids),
        logits=None if state.logits is None else put(state.logits, logits),
    )


# ------------------------------------------------------------------------ reservoir


def row_keys(key: jax.Array, positions: jax.Array) -> jax.Array:
    """One key per row, ``fold_in(key, position)``: a row's randomness depends only on the
    call's key and its position in the stream, not on how the stream is cut into batches."""
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, positions)


def reservoir_draws(key: jax.Array, seen_before: jax.Array) -> jax.Array:
    """Algorithm R's draw for each row: ``j_i ~ U{0, ..., n_i}``, ``n_i = seen_before[i]``.

    Row ``i`` is the ``(n_i + 1)``-th example of the stream; once the buffer is full it
    replaces slot ``j_i`` if ``j_i < capacity`` (probability ``capacity / (n_i + 1)``).
    The draw uses the row key ``fold_in(key, n_i)`` (:func:`row_keys`).
    """
    def draw(k, n):
        return jax.random.randint(k, (), 0, n + 1, dtype=jnp.int32)
    return jax.vmap(draw)(row_keys(key, seen_before), seen_before)


def reservoir_insert(
    state: BufferState,
    batch: Batch,
    key: jax.Array,
    *,
    logits: jax.Array | None = None,
    mask: jax.Array | None = None,
) -> BufferState:
    """Inserts a batch with reservoir sampling (Vitter's algorithm R), inside jit.

    For the stream of offered examples, the ``(n+1)``-th one (``n`` seen before it) is
    stored in slot ``n`` while ``n < capacity``; afterwards it draws ``j ~ U{0..n}`` and
    replaces slot ``j`` if ``j < capacity``. After ``N`` examples every one of them is in
    the buffer with probability ``min(1, capacity / N)``.

    The batch is processed exactly as if inserted one row at a time in order, but in
    vectorized form: each row's slot comes from its own draw
    (:func:`reservoir_draws`), and when two rows pick the same slot the later one wins
    (:func:`last_writer`). Row keys are ``fold_in(key, stream position)``, so inserting a
    batch with ``key`` equals inserting its rows one by one with the same ``key``.

    Args:
        state: The buffer.
        batch: A `Batch` shaped like the buffer's examples with a leading axis ``B``
            (``x (B, *input_shape), y (B,)`` for a classifier, ``x, y (B, L)`` for an
            LM), ``task_ids (B,)``.
        key: A JAX key (rows draw from ``fold_in(key, position)``, so reusing a key
            across calls does not repeat draws).
        logits: ``(B, *output shape)`` model outputs to store (required iff the buffer
            stores them).
        mask: Optional bool ``(B,)``; False rows are not offered (not counted as seen).

    Returns:
        The new state.

    Raises:
        TypeError: On a float value for an integer field of the buffer (e.g. float labels
            for int labels; checked from the dtype, so at trace time too).
        ValueError: On shapes that do not match the buffer (at trace time); on concrete
            (not traced) integer values outside the range of their field's dtype (300 for
            ``int8`` storage; they would wrap).
    """
    batch, logits, mask = _checked_inputs(state, batch, logits, mask)
    c = capacity_of(state)
    offered = mask.astype(jnp.int32)
    seen_before = state.seen + jnp.cumsum(offered) - offered  # n_i, exclusive count
    draws = reservoir_draws(key, seen_before)
    slots = jnp.where(seen_before < c, seen_before, draws)
    slots = jnp.where(mask, slots, c)
    seen = state.seen + offered.sum()
    new = _write(state, batch, logits, slots)
    return new._replace(seen=seen, size=jnp.minimum(seen, c).astype(jnp.int32))


# ------------------------------------------------------------------------ balanced (CBRS)


def _random_choice(key: jax.Array, eligible: jax.Array) -> jax.Array:
    """A uniformly random index among True entries of `eligible` (0 if none)."""
    scores = jax.random.uniform(key, eligible.shape)
    return jnp.argmax(jnp.where(eligible, scores, -1.0)).astype(jnp.int32)


def _check_scalar_labels(y: PyTree) -> None:
    """Class-balancing groups by label: ``y`` must be one int class id per example."""
    is_leaf = jax.tree_util.treedef_is_leaf(jax.tree.structure(y))
    if not (is_leaf and np.ndim(y) == 1 and jnp.issubdtype(y.dtype, jnp.integer)):
        per_example = jax.tree.map(lambda a: f"{np.shape(a)[1:]} {a.dtype}", y)
        raise ValueError(
            "by='label' needs scalar int labels (example y of shape () int, batch.y (B,)); "
            f"this buffer stores y per example as {per_example}: use by='task'")


def balanced_insert(
    state: BufferState,
    batch: Batch,
    key: jax.Array,
    *,
    by: GroupBy = "label",
    logits: jax.Array | None = None,
    mask: jax.Array | None = None,
) -> BufferState:
    """Inserts a batch with class-balancing reservoir sampling (CBRS), inside jit.

    Chrysakis & Moens, "Online Continual Learning from Imbalanced Random Streams",
    ICML 2020, Algorithm 1, with groups = labels (``by="label"``, class-balanced) or task
    ids (``by="task"``, per-task: each task seen so far keeps an equal share). For each
    offered example of group ``c``, in batch order:

    * ``n_c ← n_c + 1`` (examples of ``c`` offered so far);
    * buffer not full: store it in the next free slot;
    * else, if ``c`` is not *full* (a group becomes full, for good, when it is a largest
      group of the full buffer): overwrite a uniformly random slot of a largest group
      (ties broken at random);
    * else, with probability ``m_c / n_c`` (``m_c`` stored examples of ``c``), overwrite a
      uniformly random slot of ``c`` (reservoir sampling within the group).

    The result is that small groups keep all their examples and the large ones share the
    rest equally (within one slot); a full group replaces its own examples by reservoir
    sampling. The per-example decisions run in a ``lax.scan`` over the batch that carries
    only the slots' groups and counts; the inputs are then written at once
    (:func:`last_writer`), so the result equals one-at-a-time insertion (row keys are
    ``fold_in(key, stream position)``, as in :func:`reservoir_insert`).

    Examples whose group id is outside ``[0, num_groups)`` are skipped (not counted):
    jitted code cannot raise; check ids on the host (e.g. at a task boundary).

    Args:
        state: A buffer made with ``num_groups``.
        batch: A `Batch` shaped like the buffer's examples with a leading axis ``B``;
            ``by="label"`` needs int labels ``y (B,)``.
        key: A JAX key.
        by: ``"label"`` or ``"task"``: what defines an example's group.
        logits: ``(B, *output shape)`` model outputs to store (required iff the buffer
            stores them).
        mask: Optional bool ``(B,)``; False rows are not offered.

    Returns:
        The new state.

    Raises:
        TypeError: On a float value for an integer field (as :func:`reservoir_insert`).
        ValueError: On a buffer without groups, a bad ``by``, ``by="label"`` on a buffer
            whose targets are not scalar int labels, shapes that do not match, or
            concrete integer values that do not fit their field's dtype.
    """
    if state.group_seen is None:
        raise ValueError("balanced_insert needs a buffer made with init_buffer(num_groups=...)")
    by = check_choice("by", by, ("label", "task"))
    if by == "label":
        _check_scalar_labels(state.y)
    batch, logits, mask = _checked_inputs(state, batch, logits, mask)
    c = capacity_of(state)
    g = state.group_seen.shape[0]
    groups = batch.y if by == "label" else batch.task_ids
    offered = mask & (groups >= 0) & (groups < g)
    slot_groups = state.y if by == "label" else state.task_ids
    filled = jnp.arange(c) < state.size
    slot_groups = jnp.where(filled, slot_groups, -1)
    slot_ids = jnp.arange(c)

    def step(carry, inputs):
        slot_groups, size, seen, gsize, full = carry
        grp, ok, k = inputs
        k_largest, k_slot, k_accept = jax.random.split(k, 3)
        grp_c = jnp.clip(grp, 0, g - 1)
        seen = seen.at[grp_c].add(ok.astype(jnp.int32))
        not_full_buffer = size < c
        largest = gsize == gsize.max()
        full = full | (largest & ~not_full_buffer)  # "has been a largest group"
        # Case 1: buffer not full -> next free slot.
        slot_fill = size
        # Case 2: group not full -> random slot of a random largest group.
        victim_group = _random_choice(k_largest, largest)
        slot_evict = _random_choice(k_slot, slot_groups == victim_group)
        # Case 3: group full -> with prob m_c / n_c, random slot of the group itself.
        accept = jax.random.uniform(k_accept) * seen[grp_c] <= gsize[grp_c]
        slot_own = _random_choice(k_slot, slot_groups == grp_c)
        slot = jnp.where(
            not_full_buffer, slot_fill,
            jnp.where(~full[grp_c], slot_evict, jnp.where(accept, slot_own, c)),
        )
        slot = jnp.where(ok, slot, c)
        writes = slot < c
        old_group = jnp.where(writes & ~not_full_buffer, slot_groups[jnp.minimum(slot, c - 1)],
                              -1)
        gsize = gsize.at[jnp.clip(old_group, 0, g - 1)].add(
            -(old_group >= 0).astype(jnp.int32))
        gsize = gsize.at[grp_c].add(writes.astype(jnp.int32))
        slot_groups = jnp.where((slot_ids == slot) & writes, grp_c, slot_groups)
        size = size + (writes & not_full_buffer).astype(jnp.int32)
        return (slot_groups, size, seen, gsize, full), slot

    counted = offered.astype(jnp.int32)
    keys = row_keys(key, state.seen + jnp.cumsum(counted) - counted)
    carry = (slot_groups, state.size, state.group_seen, state.group_size, state.group_full)
    (_, size, group_seen, group_size, group_full), slots = jax.lax.scan(
        step, carry, (groups, offered, keys)
    )
    new = _write(state, batch, logits, slots)
    return new._replace(
        size=size,
        seen=state.seen + offered.sum(dtype=jnp.int32),
        group_seen=group_seen,
        group_size=group_size,
        group_full=group_full,
    )


# ------------------------------------------------------------------------ sampling


def _is_concrete(x: Any) -> bool:
    return not isinstance(x, jax.core.Tracer)


def sample(
    state: BufferState,
    key: jax.Array,
    num: int,
    *,
    where: jax.Array | None = None,
    allow_empty: bool = False,
) -> ReplaySample:
    """``num`` slots drawn uniformly, with replacement, from the filled (eligible) slots.

    Args:
        state: The buffer.
        key: A JAX key.
        num: Sample size (static), a positive int.
        where: Optional bool ``(capacity,)``: only slots where it is True are eligible
            (e.g. ``state.task_ids < current_task``). Unfilled slots never are.
        allow_empty: Outside jit, return a zero-weight sample instead of raising when no
            slot is eligible. Inside jit this is always the behaviour.

    Returns:
        A :class:`ReplaySample`. With no eligible slot, ``weight`` is 0 and the rows are
        copies of slot 0 (zeros if it was never written): multiply losses by ``weight``.

    Raises:
        ValueError: On a bad ``num`` or ``where`` shape; outside jit, when no slot is
            eligible and not ``allow_empty``.
    """
    num = check_positive_int("num", num)
    c = capacity_of(state)
    eligible = jnp.arange(c) < state.size
    if where is not None:
        if np.shape(where) != (c,):
            raise ValueError(f"where must be a bool array of shape ({c},), got {np.shape(where)}")
        eligible = eligible & jnp.asarray(where, bool)
    cum = jnp.cumsum(eligible.astype(jnp.int32))
    count = cum[-1]
    if not allow_empty and _is_concrete(count) and int(count) == 0:
        what = "the buffer is empty" if int(state.size) == 0 else "no filled slot matches `where`"
        raise ValueError(
            f"cannot sample: {what} (size {int(state.size)} of {c}). Inside jit such a "
            "sample has weight 0; pass allow_empty=True for that behaviour here"
        )
    r = jax.random.randint(key, (num,), 0, jnp.maximum(count, 1), dtype=jnp.int32)
    # The (r+1)-th eligible slot: the first position whose running count exceeds r.
    index = jnp.minimum(jnp.searchsorted(cum, r, side="right"), c - 1).astype(jnp.int32)
    return ReplaySample(
        batch=Batch(x=take(state.x, index), y=take(state.y, index),
                    task_ids=state.task_ids[index]),
        logits=None if state.logits is None else state.logits[index],
        index=index,
        weight=(count > 0).astype(jnp.float32),
    )


def stored(state: BufferState) -> dict[str, PyTree]:
    """The filled entries as host numpy arrays (for inspection and tests; not for jit).

    ``"x"`` and ``"y"`` have the structure of the buffer's examples (an array for a
    classifier's inputs and labels)."""
    n = int(state.size)
    def host(a):
        return np.asarray(a[:n])
    out = {"x": jax.tree.map(host, state.x), "y": jax.tree.map(host, state.y),
           "task_ids": host(state.task_ids)}
    if state.logits is not None:
        out["logits"] = np.asarray(state.logits[:n])
    return out
