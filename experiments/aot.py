r"""Ahead-of-time compile of a Llama training step for a TPU pod you do not have.

    python -m experiments.aot --topology=v5e:16x16 --preset=llama-3.2-1b \
        --methods=finetune,ewc,gpm,ema [--fsdp=128 --tensor=2] [--seq_len=2048] \
        [--batch_size=256] [--json_out=/tmp/aot.json]

libtpu describes the devices of a TPU topology (``jax.experimental.topologies``) without
any TPU attached, so a CPU machine can compile for a pod and read the compiled program's
memory needs. For each continual-learning method this

1. builds the ``--preset`` Llama model abstractly (``nnx.eval_shape``: no parameter is
   materialised) and splits it like ``clax.core.ModelFns.split``;
2. makes the ``("data", "fsdp", "tensor")`` mesh over the topology's devices
   (``clax.training.sharding.make_mesh``) and the run's `StepFns` with the
   `LanguageModeling` objective and ``method.optimizer(optax.adamw(...))``;
3. computes the abstract `TrainState` as ``StepFns.init_state`` does, places it with
   ``StepFns.set_state_shardings`` and lowers and compiles ``StepFns.train_step`` on a
   sharded abstract batch of ``(batch_size, seq_len)`` token ids and targets;
4. reports per device: the bytes of the parameters, the optimizer state (and how much of
   it the method's optimizer hook adds over plain AdamW, e.g. EMA's averaged weights) and
   the method memory, computed from the state's shardings, and the compiled program's
   ``memory_analysis()`` (arguments, outputs, aliased, temporaries, generated code), their
   total against the chip's HBM, and the compile time.

``sum`` is ``arguments + outputs - aliased + temporaries + generated code`` (the train
state is donated, so its outputs reuse the argument buffers); ``peak`` is the compiler's
``peak_memory_in_bytes`` (its buffer assignment's peak of live buffers, code excluded);
``total`` is the larger of the two, and ``fits`` compares it with the chip's HBM. When the
program does not fit, the TPU compiler refuses it ("Ran out of memory on HBM ... required
for HLO temporaries (X) exceeds available HBM (Y)", Y = the HBM it may use, a little under
the chip's); the row then says so (``fits: false``, ``temp_required`` = X) and has no other
compiled figures. HBM per chip is from Google's public Cloud TPU documentation (system
architecture pages, :data:`HBM_GIB`); ``--hbm_gib`` overrides it. ``--nocompile`` reports
only the state's per-device bytes (seconds, where a 1B compile takes minutes).

Keep ``JAX_PLATFORMS=cpu`` (set here when unset): jax's default backend stays the CPU and
only the compile targets the TPU topology.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
import time
from collections.abc import Sequence
from typing import Any

from absl import app, flags

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command's flags, defined when it runs (not at import: a test importing this
    module beside another command, e.g. experiments.report's --methods, must not clash)."""
    flags.DEFINE_string("topology", "v5e:2x2",
                        "TPU topology, '<chip>:<AxB[xC]>', e.g. v5e:2x2, v5e:16x16, v4:2x2x2.")
    flags.DEFINE_string("preset", "llama-3.2-1b", "Llama preset (clax.models.llama.PRESETS).")
    flags.DEFINE_list("methods", ["finetune", "ewc", "gpm", "ema"],
                      "Registered methods, comma separated; one report row each.")
    flags.DEFINE_integer("seq_len", 2048, "Tokens per sequence (also the model's max_len).")
    flags.DEFINE_integer("batch_size", 0,
                         "Global batch (sequences); 0: one per batch shard (data * fsdp).")
    flags.DEFINE_integer("data", 0, "Mesh data axis; 0: the devices left by fsdp * tensor.")
    flags.DEFINE_integer("fsdp", 0, "Mesh fsdp axis; 0: all devices / (data * tensor).")
    flags.DEFINE_integer("tensor", 1, "Mesh tensor axis.")
    flags.DEFINE_enum("param_dtype", "bfloat16", ["float32", "bfloat16"],
                      "Parameter storage dtype.")
    flags.DEFINE_enum("dtype", "bfloat16", ["float32", "bfloat16"], "Compute dtype.")
    flags.DEFINE_float("learning_rate", 3e-4, "AdamW learning rate (does not change memory).")
    flags.DEFINE_float("weight_decay", 0.1, "AdamW weight decay (does not change memory).")
    flags.DEFINE_enum("gpm_project", "update", ["gradient", "update"],
                      "GPM's projection point ('update': after Adam, as GPM advises for Adam).")
    flags.DEFINE_float("hbm_gib", 0.0, "HBM per chip in GiB; 0: from the topology's chip.")
    flags.DEFINE_bool("compile", True,
                      "Compile (memory analysis); --nocompile: only the state's shardings.")
    flags.DEFINE_string("json_out", None, "Write the report as JSON here.")
    flags.DEFINE_bool("traceback", False, "Show the full traceback of an error, not one line.")


# HBM per chip, GiB, by topology prefix / device kind. Source: Google's public Cloud TPU
# docs, system architecture tables (https://cloud.google.com/tpu/docs/v4, .../v5e, .../v5p,
# .../v6e): v4 32 GiB, v5e 16 GB, v5p 95 GB, v6e 32 GB per chip (read as GiB: the v5e
# compiler itself allows 15.75 GiB of the 16).
HBM_GIB: dict[str, float] = {"v4": 32.0, "v5e": 16.0, "v5litepod": 16.0, "v5p": 95.0,
                             "v6e": 32.0}
_HBM_BY_KIND: dict[str, str] = {"TPU v4": "v4", "TPU v5 lite": "v5e", "TPU v5": "v5p",
                                "TPU v5p": "v5p", "TPU v6 lite": "v6e", "TPU v6e": "v6e"}
TOPOLOGY_FORMS = ("v5e:2x2", "v5e:4x4", "v5e:16x16", "v4:2x2x2", "v5p:2x2x2", "v6e:4x4")


class AotError(ValueError):
    """A bad input, explained in one line (the command prints it and exits)."""


def _environment() -> None:
    """CPU as jax's default backend; no libtpu lockfile (no TPU is opened: several
    processes may describe topologies at once)."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def tpu_topology(topology: str):
    """The `TopologyDescription` of `topology` (needs libtpu; no TPU attached)."""
    _environment()
    from jax.experimental import topologies

    try:
        return topologies.get_topology_desc(topology, platform="tpu")
    except Exception as e:  # noqa: BLE001 - libtpu raises JaxRuntimeError / RuntimeError
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "INVALID_ARGUMENT" in first or "NOT_FOUND" in first or "UNIMPLEMENTED" in first:
            raise AotError(f"unknown or unsupported TPU topology {topology!r} ({first}); "
                           f"use '<chip>:<AxB[xC]>', e.g. {', '.join(TOPOLOGY_FORMS)}") from e
        raise AotError(f"libtpu could not describe TPU topology {topology!r}: {first}") from e


def hbm_bytes(topology: str, device_kind: str = "") -> int | None:
    """HBM bytes of one chip of `topology` (by prefix, else by device kind), or None."""
    prefix = topology.split(":", 1)[0].split("-", 1)[0].lower()
    gib = HBM_GIB.get(prefix)
    if gib is None and device_kind in _HBM_BY_KIND:
        gib = HBM_GIB[_HBM_BY_KIND[device_kind]]
    return None if gib is None else int(gib * 2**30)


def abstract_model(preset: str, seq_len: int, *, dtype: str, param_dtype: str):
    """`LlamaLM` of `preset` with ``ShapeDtypeStruct`` leaves (nothing allocated)."""
    from flax import nnx

    from clax.models.llama import PRESETS, LlamaLM

    if preset not in PRESETS:
        raise AotError(f"unknown Llama preset {preset!r}; valid: {', '.join(sorted(PRESETS))}")
    return nnx.eval_shape(lambda: LlamaLM(input_shape=(seq_len,), preset=preset, dtype=dtype,
                                          param_dtype=param_dtype, rngs=nnx.Rngs(0)))


def split_abstract(model):
    """``(ModelFns, params, model_state, logical axes)`` of an abstract model.

    `ModelFns.split` itself on the abstract module: ``nnx.clone`` / ``nnx.split`` keep the
    ``ShapeDtypeStruct`` leaves, and ``nnx.to_pure_dict`` gives them as plain dicts.
    """
    from clax.core import ModelFns
    from clax.training.sharding import logical_axes

    fns, params, model_state = ModelFns.split(model)
    return fns, params, model_state, logical_axes(model)


def mesh_sizes(num_devices: int, data: int, fsdp: int, tensor: int) -> tuple[int, int, int]:
    """Resolves the flags' zeros: ``fsdp=0`` takes all devices / (data * tensor)."""
    if fsdp == 0:
        fsdp = max(num_devices // (max(data, 1) * max(tensor, 1)), 1)
    return data, fsdp, tensor


def leaf_bytes(leaf) -> int:
    """Bytes of one device's shard of a (sharded) ``ShapeDtypeStruct``.

    ``sharding.shard_shape`` is the shape every device holds (NamedShardings split
    evenly), so this is also the maximum over devices; an unsharded leaf counts whole.
    """
    shape = tuple(leaf.shape)
    sharding = getattr(leaf, "sharding", None)
    if sharding is not None:
        shape = tuple(sharding.shard_shape(shape))
    return int(math.prod(shape)) * leaf.dtype.itemsize  # PRNG keys: 8 (threefry)


def tree_bytes_per_device(tree) -> int:
    """Bytes of `tree` (sharded ``ShapeDtypeStruct`` leaves) held by the fullest device."""
    import jax

    return sum(leaf_bytes(x) for x in jax.tree.leaves(tree))


def tree_bytes_total(tree) -> int:
    """Unsharded bytes of `tree` (one copy of every leaf)."""
    import jax

    return sum(int(math.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _with_shardings(tree, shardings):
    import jax

    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        tree, shardings)


def method_kwargs(name: str, gpm_project: str = "update") -> dict[str, Any]:
    """Hyperparameters passed to ``make_method`` (defaults otherwise).

    GPM has no capacity hyperparameter: ``gpm_memory`` gives every 2-D kernel a basis of
    capacity = its fan-in, ``(fan_in, fan_in)`` float32 (the threshold only decides how
    many columns fill up, not the array size). Only the projection point is set.
    """
    if name == "gpm":
        return {"project": gpm_project}
    return {}


@dataclasses.dataclass
class Settings:
    """Everything that defines one AOT report (the flags, resolved)."""

    topology: str = "v5e:2x2"
    preset: str = "llama-3.2-1b"
    methods: Sequence[str] = ("finetune", "ewc", "gpm", "ema")
    seq_len: int = 2048
    batch_size: int = 0
    data: int = 0
    fsdp: int = 0
    tensor: int = 1
    param_dtype: str = "bfloat16"
    dtype: str = "bfloat16"
    learning_rate: float = 3e-4
    weight_decay: float = 0.1
    gpm_project: str = "update"
    hbm_gib: float = 0.0
    compile: bool = True


def compile_report(settings: Settings, *, log=None) -> dict[str, Any]:
    """Compiles every method's train step for the topology and returns the report.

    Returns:
      ``{"settings": ..., "mesh": ..., "model": ..., "hbm_bytes": ..., "rows": [...]}``,
      one row per method with per-device bytes (``params``, ``opt_state``,
      ``opt_state_base`` (plain AdamW), ``method_opt_state`` (the difference),
      ``memory``, ``model_state``), the compiled ``memory_analysis()`` fields, ``total``,
      ``fits`` and ``lower_s`` / ``compile_s``.

    Raises:
      AotError: a bad topology, mesh, batch size, preset or method (one-line message).
    """
    _environment()
    import jax
    import numpy as np
    import optax

    import clax.methods  # noqa: F401 - registers the built-in methods
    from clax.core import Batch, DataSpec, LanguageModeling, TrainState, make_method
    from clax.core.registry import registered_methods
    from clax.training import sharding as sharding_lib
    from clax.training.steps import StepFns

    s = settings
    log = log or (lambda msg: None)
    unknown = [m for m in s.methods if m not in registered_methods()]
    if unknown:
        raise AotError(f"unknown method(s) {unknown}; valid: {', '.join(registered_methods())}")
    if not s.methods:
        raise AotError("--methods is empty")
    for name in ("seq_len", "batch_size", "data", "fsdp", "tensor"):
        if getattr(s, name) < 0 or (name in ("seq_len", "tensor") and getattr(s, name) < 1):
            raise AotError(f"--{name}={getattr(s, name)} must be positive")
    topo = tpu_topology(s.topology)
    devices = list(topo.devices)
    data, fsdp, tensor = mesh_sizes(len(devices), s.data, s.fsdp, s.tensor)
    try:
        mesh = sharding_lib.make_mesh(data, fsdp, tensor, devices=devices)
    except ValueError as e:
        raise AotError(f"{e} of topology {s.topology}") from e
    shards = sharding_lib.batch_divisor(mesh)
    batch_size = s.batch_size or shards
    if batch_size % shards:
        raise AotError(f"--batch_size={batch_size} is not divisible by data x fsdp = "
                       f"{mesh.shape['data']} x {mesh.shape['fsdp']} = {shards} (the batch "
                       "is split over both)")
    hbm = int(s.hbm_gib * 2**30) if s.hbm_gib else hbm_bytes(s.topology,
                                                              devices[0].device_kind)

    model = abstract_model(s.preset, s.seq_len, dtype=s.dtype, param_dtype=s.param_dtype)
    fns, params, model_state, axes = split_abstract(model)
    config = model.config
    try:
        specs_p = sharding_lib.param_specs(params, mesh, axes=axes)
    except ValueError as e:
        raise AotError(str(e)) from e
    vocab = config.vocab_size
    length = s.seq_len
    spec = DataSpec(
        example=Batch(x=jax.ShapeDtypeStruct((length,), np.int32),
                      y=jax.ShapeDtypeStruct((length,), np.int32),
                      task_ids=jax.ShapeDtypeStruct((), np.int32)),
        output=jax.ShapeDtypeStruct((length, vocab), np.float32))
    bs = sharding_lib.batch_sharding(mesh)
    # LanguageModeling: x = input ids, y = next-token targets (negative = no loss; the
    # loss mask is y >= 0, no separate array), task_ids per sequence.
    batch = Batch(x=jax.ShapeDtypeStruct((batch_size, length), np.int32, sharding=bs),
                  y=jax.ShapeDtypeStruct((batch_size, length), np.int32, sharding=bs),
                  task_ids=jax.ShapeDtypeStruct((batch_size,), np.int32, sharding=bs))
    base = optax.adamw(s.learning_rate, weight_decay=s.weight_decay)
    base_opt = jax.eval_shape(base.init, params)
    base_opt = _with_shardings(base_opt, jax.tree.map(
        lambda p: jax.sharding.NamedSharding(mesh, p),
        sharding_lib.tree_specs(base_opt, mesh, params=params, specs_of_params=specs_p),
        is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)))
    base_opt_bytes = tree_bytes_per_device(base_opt)

    report: dict[str, Any] = {
        "settings": {**dataclasses.asdict(s), "methods": list(s.methods),
                     "batch_size": batch_size},
        "topology": {"name": s.topology, "devices": len(devices),
                     "device_kind": devices[0].device_kind},
        "mesh": dict(mesh.shape),
        "model": {"preset": s.preset, "num_params": config.num_params(),
                  "param_bytes_total": tree_bytes_total(params),
                  "dim": config.dim, "depth": config.depth, "vocab_size": vocab},
        "hbm_bytes": hbm,
        "hbm_source": "Google Cloud TPU docs (system architecture: v4, v5e, v5p, v6e)",
        "rows": [],
    }
    log(f"{s.topology}: {len(devices)} x {devices[0].device_kind}, mesh {dict(mesh.shape)}, "
        f"{s.preset} ({config.num_params() / 1e9:.2f} B params), batch {batch_size} x "
        f"{length}")
    for name in s.methods:
        kwargs = method_kwargs(name, s.gpm_project)
        method = make_method(name, **kwargs)
        tx = method.optimizer(base)
        steps = StepFns(fns, method, tx, mesh, objective=LanguageModeling(), data=spec,
                        param_axes=axes)

        def make(params, model_state, method=method, tx=tx, spec=spec):
            # As StepFns.init_state builds the state (seed 0).
            return TrainState(params=params, model_state=model_state,
                              opt_state=tx.init(params),
                              memory=method.initial_memory(params, spec),
                              rng=jax.random.key(0), step=np.zeros((), np.int32))

        row: dict[str, Any] = {"method": name, "hyperparameters": kwargs}
        t0 = t1 = time.perf_counter()
        try:
            abstract = jax.eval_shape(make, params, model_state)
            shardings = steps.set_state_shardings(abstract)
            state = _with_shardings(abstract, shardings)
            row.update(
                params=tree_bytes_per_device(state.params),
                opt_state=tree_bytes_per_device(state.opt_state),
                opt_state_base=base_opt_bytes,
                memory=tree_bytes_per_device(state.memory),
                memory_total=tree_bytes_total(state.memory),
                model_state=tree_bytes_per_device(state.model_state),
            )
            row["method_opt_state"] = row["opt_state"] - base_opt_bytes
            if not s.compile:
                report["rows"].append(row)
                continue
            t0 = time.perf_counter()
            lowered = steps.train_step.lower(state, batch, np.int32(0))
            t1 = time.perf_counter()
            compiled = lowered.compile()
            t2 = time.perf_counter()
        except Exception as e:  # noqa: BLE001 - reported per method, the others still run
            message = str(e).strip().splitlines()[0][:500] if str(e).strip() else ""
            oom = _parse_oom(message)
            if oom is not None:
                # The TPU compiler refuses a program that does not fit: that is the answer.
                row.update(oom, fits=False, compile_s=round(time.perf_counter() - t1, 2),
                           lower_s=round(t1 - t0, 2), oom=message)
                log(f"  {name}: does not fit ({message})")
            else:
                row["error"] = f"{type(e).__name__}: {message}"
                log(f"  {name}: FAILED {row['error']}")
            report["rows"].append(row)
            continue
        mem = compiled.memory_analysis()
        fields = {"argument": "argument_size_in_bytes", "output": "output_size_in_bytes",
                  "alias": "alias_size_in_bytes", "temp": "temp_size_in_bytes",
                  "generated_code": "generated_code_size_in_bytes"}
        for key, attr in fields.items():
            row[key] = int(getattr(mem, attr, 0) or 0) if mem is not None else None
        if mem is not None:
            row["sum"] = (row["argument"] + row["output"] - row["alias"] + row["temp"]
                          + row["generated_code"])
            row["peak"] = int(getattr(mem, "peak_memory_in_bytes", 0) or 0) or None
            row["total"] = max(row["sum"], row["peak"] or 0)
            row["fits"] = None if hbm is None else bool(row["total"] <= hbm)
        else:
            row["sum"] = row["peak"] = row["total"] = row["fits"] = None
        row["lower_s"] = round(t1 - t0, 2)
        row["compile_s"] = round(t2 - t1, 2)
        log(f"  {name}: compiled in {row['compile_s']:.1f} s, total "
            f"{format_bytes(row['total'])} per device")
        report["rows"].append(row)
    return report


_OOM = re.compile(r"Ran out of memory in memory space (?P<space>\w+)|"
                  r"Ran out of memory on (?P<space2>\w+)")
_SIZE = re.compile(r"\(([0-9.]+)([KMGT]?)\)")


def _parse_oom(message: str) -> dict[str, Any] | None:
    """``{"temp_required": bytes, "hbm_available": bytes}`` of the TPU compiler's
    out-of-memory error ("... required for HLO temporaries (41.70G) exceeds available HBM
    (15.75G)"), or None for another error. XLA prints sizes in binary units."""
    if "RESOURCE_EXHAUSTED" not in message or not _OOM.search(message):
        return None
    scale = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    sizes = [int(float(v) * scale[u]) for v, u in _SIZE.findall(message)]
    return {"temp_required": sizes[0] if sizes else None,
            "hbm_available": sizes[1] if len(sizes) > 1 else None}


def format_bytes(n: int | None, missing: str = "n/a") -> str:
    """Bytes as B / KiB / MiB / GiB (`missing` for None)."""
    if n is None:
        return missing
    if abs(n) >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    if abs(n) >= 2**20:
        return f"{n / 2**20:.1f} MiB"
    if abs(n) >= 2**10:
        return f"{n / 2**10:.1f} KiB"
    return f"{n} B"


_COLUMNS = (("method", "method"), ("params", "params"), ("opt state", "opt_state"),
            ("method opt state", "method_opt_state"), ("method memory", "memory"),
            ("arguments", "argument"), ("outputs", "output"), ("aliased", "alias"),
            ("temp", "temp"), ("code", "generated_code"), ("sum", "sum"), ("peak", "peak"),
            ("total", "total"), ("fits HBM", "fits"), ("compile s", "compile_s"))
_COMPILED = ("argument", "output", "alias", "temp", "generated_code", "sum", "peak", "total")


def _cell(row: dict[str, Any], key: str) -> str:
    v = row.get(key)
    if key == "method":
        return str(v)
    if "oom" in row and key == "temp":
        return f"{format_bytes(row.get('temp_required'))} needed"
    if "oom" in row and key == "fits":
        return f"**no** (compiler: {format_bytes(row.get('hbm_available'))} usable)"
    if "oom" in row and key in _COMPILED:
        return "-"
    if v is None:  # not compiled (--nocompile), or no figure from the compiler
        return "-"
    if key == "fits":
        return "yes" if v else "**no**"
    if key == "compile_s":
        return f"{v:.1f}"
    return format_bytes(v)


def format_table(report: dict[str, Any]) -> str:
    """The report as a heading line and a markdown table (bytes per device)."""
    t, m, st = report["topology"], report["mesh"], report["settings"]
    lines = [f"{t['name']} ({t['devices']} x {t['device_kind']}), mesh data={m['data']} "
             f"fsdp={m['fsdp']} tensor={m['tensor']}; {report['model']['preset']} "
             f"({report['model']['num_params'] / 1e9:.3f} B params), batch "
             f"{st['batch_size']} x {st['seq_len']}, {st['param_dtype']} params, "
             f"{st['dtype']} compute; HBM per chip {format_bytes(report['hbm_bytes'])}; "
             "bytes per device",
             "",
             "| " + " | ".join(c for c, _ in _COLUMNS) + " |",
             "|" + "|".join("---" for _ in _COLUMNS) + "|"]
    for row in report["rows"]:
        if "error" in row:
            lines.append(f"| {row['method']} | error: {row['error']} |")
        else:
            lines.append("| " + " | ".join(_cell(row, k) for _, k in _COLUMNS) + " |")
    return "\n".join(lines)


def settings_from_flags() -> Settings:
    return Settings(topology=FLAGS.topology, preset=FLAGS.preset,
                    methods=tuple(m.strip() for m in FLAGS.methods if m.strip()),
                    seq_len=FLAGS.seq_len, batch_size=FLAGS.batch_size, data=FLAGS.data,
                    fsdp=FLAGS.fsdp, tensor=FLAGS.tensor, param_dtype=FLAGS.param_dtype,
                    dtype=FLAGS.dtype, learning_rate=FLAGS.learning_rate,
                    weight_decay=FLAGS.weight_decay, gpm_project=FLAGS.gpm_project,
                    hbm_gib=FLAGS.hbm_gib, compile=FLAGS.compile)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    _environment()
    try:
        report = compile_report(settings_from_flags(),
                                log=lambda m: print(m, file=sys.stderr, flush=True))
    except AotError as e:
        if FLAGS.traceback:
            raise
        sys.exit(f"error: {e}")
    print(format_table(report))
    if FLAGS.json_out:
        os.makedirs(os.path.dirname(os.path.abspath(FLAGS.json_out)), exist_ok=True)
        with open(FLAGS.json_out, "w") as f:
            json.dump(report, f, indent=1)
            f.write("\n")
    if any("error" in r for r in report["rows"]):
        sys.exit(1)


if __name__ == "__main__":
    define_flags()
    app.run(main)
