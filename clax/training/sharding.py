"""Device meshes and sharding rules: data parallel, FSDP and tensor parallel, in one place.

Every run has a 3-D mesh with axes ``("data", "fsdp", "tensor")`` (:func:`make_mesh`; a
data-parallel run is ``(n, 1, 1)``). Batches are split over ``("data", "fsdp")``: FSDP is
data parallel whose parameters are also split. Where each array of the train state lives
is decided here, by :class:`ShardingRules`, and nowhere else:

* **Parameters** with logical axis names (Flax ``nnx.with_partitioning`` metadata, as on
  :class:`~clax.models.llama.LlamaLM` and the MLP) map each name to mesh axes through
  ``ShardingRules.logical`` (``"embed" -> "fsdp"``, ``"mlp"/"heads"/"vocab" -> "tensor"``,
  the layout of MaxText's and big_vision's rules). A named dimension that does not divide
  its mesh axes is an error naming the parameter, the dimension and the axes.
* **Parameters without names**, and any other leaf, are split FSDP-style: the largest
  dimension divisible by the ``fsdp`` axis is split over it (leaves smaller than
  ``fsdp_min_size`` elements stay replicated: splitting a bias costs more than it saves).
* **Optimizer state and method memory** follow the parameters: a leaf whose path ends with a
  parameter's path and has that parameter's shape (Adam's moments, EWC's Fisher and anchor,
  EMA and averaged weights, A-GEM's reference gradient, ...) gets the parameter's sharding;
  one at a parameter's path with another shape (CoSO's ``(n, r)`` projector of an
  ``(m, n)`` kernel) splits each dimension that matches a split parameter dimension the
  same way; other leaves (GPM bases ``(n, k)``, replay buffers ``(capacity, ...)``) take
  the FSDP rule, so a basis is split along its long axis and a buffer along its examples.
* **Decompositions** (the SVD in CoSO's per-step sketch, GPM's and the Fisher tools' SVDs
  at task boundaries) run on a gathered matrix: XLA has no partitioned SVD. These are the
  only gathers of a parameter-sized array a method adds to the step
  (``tests/training/pod_hlo_test.py`` checks every method for any other).
* PRNG keys and scalars are replicated.

Nothing here gathers a parameter: the shardings are handed to ``jax.jit`` and XLA's SPMD
partitioner inserts the collectives the computation needs (FSDP's per-layer all-gather of
weights for the matmuls; reductions in global norms and dot products are exact all-reduces).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from clax.params import path_str, plain_path
from clax.typing import Path, PyTree

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the batch dimension is split over both

# Logical axis name -> mesh axis (or axes, or None = replicated). Names used by clax's
# models: "vocab", "embed", "mlp", "heads", "kv_heads"; "batch" for activations.
DEFAULT_LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("classes", None),
)


def make_mesh(data: int = 0, fsdp: int = 1, tensor: int = 1, *,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``("data", "fsdp", "tensor")`` mesh over `devices` (default: every global device).

    Args:
      data: size of the data axis; 0 takes the devices left over by ``fsdp * tensor``.
      fsdp: size of the FSDP axis (parameters, optimizer state and memory split over it).
      tensor: size of the tensor-parallel axis (named matmul dimensions split over it).
      devices: the devices, e.g. ``jax.devices()[:4]`` or a TPU topology's devices for an
        ahead-of-time compile. On a multi-process run every process passes the same list.

    Raises:
      ValueError: if an axis size is not positive or the sizes do not multiply to the
        number of devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    for name, size in (("fsdp", fsdp), ("tensor", tensor)):
        if int(size) < 1:
            raise ValueError(f"mesh {name}={size}: must be >= 1")
    if int(data) < 0:
        raise ValueError(f"mesh data={data}: must be >= 1, or 0 for the devices left over")
    inner = int(fsdp) * int(tensor)
    if data == 0:
        if n % inner:
            raise ValueError(f"mesh fsdp={fsdp} x tensor={tensor} = {inner} does not divide "
                             f"the {n} devices")
        data = n // inner
    if int(data) * inner != n:
        raise ValueError(f"mesh data={data} x fsdp={fsdp} x tensor={tensor} = "
                         f"{int(data) * inner} devices, but {n} are given")
    shape = (int(data), int(fsdp), int(tensor))
    try:
        # Topology-aware order on TPU/GPU (neighbours on the fast links); CPU: reshape.
        from jax.experimental import mesh_utils
        grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    except (ValueError, NotImplementedError, AssertionError):
        grid = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(grid, AXES)


def data_mesh(num_devices: int | None = None) -> Mesh:
    """A data-parallel mesh ``(n, 1, 1)`` over the first `num_devices` local devices.

    Batches are sharded along ``"data"``; parameters and method memory are replicated.
    `None` uses every local device.
    """
    devices = jax.local_devices()
    n = len(devices) if num_devices is None else int(num_devices)
    if not 1 <= n <= len(devices):
        raise ValueError(
            f"num_devices={num_devices} but only {len(devices)} local device(s) are available"
        )
    return make_mesh(n, 1, 1, devices=devices[:n])


def _axis_size(mesh: Mesh, axes: str | tuple[str, ...] | None) -> int:
    if axes is None:
        return 1
    axes = (axes,) if isinstance(axes, str) else axes
    return math.prod(mesh.shape[a] for a in axes)


def logical_axes(model: nnx.Module) -> dict[Path, tuple[str | None, ...]]:
    """The logical axis names of `model`'s parameters, keyed by plain path.

    Read from the ``out_sharding`` (or older ``sharding``) metadata that
    ``nnx.with_partitioning`` attaches; parameters without names are absent.
    """
    params = nnx.state(model, nnx.Param)
    out = {}
    leaves = jax.tree_util.tree_leaves_with_path(
        params, is_leaf=lambda x: isinstance(x, nnx.Variable))
    for path, var in leaves:
        if not isinstance(var, nnx.Variable):
            continue
        meta = var.get_metadata()
        names = meta.get("out_sharding") or meta.get("sharding") or meta.get("sharding_names")
        if names:
            out[plain_path(path)] = tuple(names)
    return out


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """How logical names and unnamed arrays map onto the mesh (see the module docstring).

    Attributes:
      logical: ``(logical name, mesh axes)`` pairs; a name not listed is replicated.
      fsdp_min_size: leaves with fewer elements stay replicated under the FSDP rule.
    """

    logical: tuple[tuple[str, str | tuple[str, ...] | None], ...] = DEFAULT_LOGICAL_RULES
    fsdp_min_size: int = 1024

    def _mesh_axes(self, name: str | None) -> tuple[str, ...]:
        if name is None:
            return ()
        for logical, axes in self.logical:
            if logical == name:
                if axes is None:
                    return ()
                return (axes,) if isinstance(axes, str) else tuple(axes)
        return ()

    def spec(self, shape: tuple[int, ...], names: Sequence[str | None] | None, mesh: Mesh,
             what: str = "array") -> P:
        """The `PartitionSpec` of one array of `shape` (logical `names`, or None)."""
        shape = tuple(int(s) for s in shape)
        dims: list[Any] = [None] * len(shape)
        used: set[str] = set()
        if names is not None:
            if len(names) != len(shape):
                raise ValueError(f"{what}: {len(names)} logical axis names {tuple(names)} for "
                                 f"an array of shape {shape}")
            for i, name in enumerate(names):
                axes = tuple(a for a in self._mesh_axes(name)
                             if mesh.shape.get(a, 1) > 1 and a not in used)
                if not axes:
                    continue
                size = _axis_size(mesh, axes)
                if shape[i] % size:
                    raise ValueError(
                        f"{what}: dimension {i} (size {shape[i]}, logical axis {name!r}) does "
                        f"not divide mesh axis {'x'.join(axes)} of size {size}; change the "
                        "mesh or the model width, or map the name elsewhere in "
                        "ShardingRules.logical")
                dims[i] = axes[0] if len(axes) == 1 else axes
                used.update(axes)
        return self.fill_fsdp(shape, dims, mesh)

    def fill_fsdp(self, shape: tuple[int, ...], dims: Sequence[Any], mesh: Mesh) -> P:
        """`dims` (a spec's entries) with the FSDP rule applied if no entry uses ``fsdp``:
        the largest free dimension divisible by it is split over it."""
        dims = list(dims) + [None] * (len(shape) - len(dims))
        used = {a for d in dims if d is not None for a in ((d,) if isinstance(d, str) else d)}
        fsdp = mesh.shape.get("fsdp", 1)
        if fsdp > 1 and "fsdp" not in used and math.prod(shape) >= self.fsdp_min_size:
            free = [i for i in range(len(shape)) if dims[i] is None and shape[i] % fsdp == 0]
            if free:
                i = max(free, key=lambda j: (shape[j], -j))  # largest; first on ties
                dims[i] = "fsdp"
        while dims and dims[-1] is None:
            dims.pop()
        return P(*dims)


def _is_key_array(x: Any) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def param_specs(params: PyTree, mesh: Mesh, *,
                axes: Mapping[Path, Sequence[str | None]] | None = None,
                rules: ShardingRules | None = None) -> PyTree:
    """`PartitionSpec` per parameter (a tree like `params`)."""
    rules = rules or ShardingRules()
    axes = axes or {}

    def one(path, leaf):
        p = plain_path(path)
        return rules.spec(np.shape(leaf), axes.get(p), mesh, f"parameter {path_str(p)}")

    return jax.tree_util.tree_map_with_path(one, params)


def tree_specs(tree: PyTree, mesh: Mesh, *, params: PyTree | None = None,
               specs_of_params: PyTree | None = None,
               rules: ShardingRules | None = None) -> PyTree:
    """`PartitionSpec` per leaf of any state tree, following the parameters where it can.

    A leaf whose path ends with a parameter's path and has its shape takes that
    parameter's spec; keys and scalars are replicated; any other leaf takes the FSDP rule.
    """
    rules = rules or ShardingRules()
    by_path: dict[Path, tuple[tuple[int, ...], P]] = {}
    if params is not None:
        for (path, leaf), spec in zip(jax.tree_util.tree_leaves_with_path(params),
                                      jax.tree.leaves(specs_of_params,
                                                      is_leaf=lambda x: isinstance(x, P)),
                                      strict=True):
            by_path[plain_path(path)] = (tuple(np.shape(leaf)), spec)

    def one(path, leaf):
        shape = tuple(np.shape(leaf))
        if _is_key_array(leaf) or not shape:
            return P()
        p = plain_path(path)
        # The parameter's path may end the leaf's (Adam's mu/...) or be followed by a field
        # of the method's record (a basis's .../kernel/vectors): longest match first.
        for end in range(len(p), 0, -1):
            for k in range(end):
                hit = by_path.get(p[k:end])
                if hit is None:
                    continue
                if hit[0] == shape:
                    return hit[1]
                followed = _follow(shape, *hit)
                if followed is not None:
                    # e.g. a basis following a kernel's "tensor" split is FSDP-split too.
                    return rules.fill_fsdp(shape, tuple(followed), mesh)
        return rules.spec(shape, None, mesh, f"state leaf {path_str(p)}")

    return jax.tree_util.tree_map_with_path(one, tree)


def _follow(shape: tuple[int, ...], param_shape: tuple[int, ...], spec: P) -> P | None:
    """The spec of a leaf kept at a parameter's path with another shape (e.g. a CoSO
    projector ``(n, r)`` of an ``(m, n)`` kernel): each leaf dimension equal in size to a
    split parameter dimension is split the same way, so contractions between the two need
    no gather. None if no dimension matches."""
    entries = list(spec) + [None] * (len(param_shape) - len(spec))
    free = [j for j, e in enumerate(entries) if e is not None]
    dims: list[Any] = [None] * len(shape)
    for i, size in enumerate(shape):
        for j in free:
            if param_shape[j] == size:
                dims[i] = entries[j]
                free.remove(j)
                break
    if all(d is None for d in dims):
        return None
    while dims and dims[-1] is None:
        dims.pop()
    return P(*dims)


def state_shardings(state: PyTree, mesh: Mesh, *,
                    axes: Mapping[Path, Sequence[str | None]] | None = None,
                    rules: ShardingRules | None = None) -> PyTree:
    """`NamedSharding` per leaf of a `TrainState` (arrays or ``ShapeDtypeStruct``\\s).

    ``state.params`` are placed by `param_specs`; ``opt_state``, ``memory`` and
    ``model_state`` by `tree_specs` (following the parameters); ``rng`` and ``step``
    replicated.
    """
    specs_p = param_specs(state.params, mesh, axes=axes, rules=rules)
    specs = state._replace(
        params=specs_p,
        opt_state=tree_specs(state.opt_state, mesh, params=state.params,
                             specs_of_params=specs_p, rules=rules),
        memory=tree_specs(state.memory, mesh, params=state.params, specs_of_params=specs_p,
                          rules=rules),
        model_state=tree_specs(state.model_state, mesh, rules=rules),
        rng=jax.tree.map(lambda _: P(), state.rng),
        step=jax.tree.map(lambda _: P(), state.step),
    )
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                        is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over ``("data", "fsdp")``."""
    return NamedSharding(mesh, P(BATCH_AXES))


def batch_divisor(mesh: Mesh) -> int:
    """The number of shards of the batch axis (``data * fsdp``)."""
    return _axis_size(mesh, BATCH_AXES)


def bytes_per_device(tree: PyTree) -> dict[str, int]:
    """Bytes of `tree`'s leaves held by each device (``{str(device): bytes}``)."""
    out: dict[str, int] = {}
    for leaf in jax.tree.leaves(tree):
        for shard in getattr(leaf, "addressable_shards", ()):
            key = str(shard.device)
            out[key] = out.get(key, 0) + shard.data.nbytes
    return out
