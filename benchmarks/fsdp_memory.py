r"""Per-device state bytes under FSDP, and the sharded/unsharded step-time ratio, on CPU.

    python benchmarks/fsdp_memory.py [--methods finetune ewc gpm ema] [--steps 5]

A Llama-family transformer LM (``LlamaLM``, dim 256, 4 layers, vocab 4096, MLP 1024:
about 6M parameters, float32) trains with Adam and each method's memory. For 1, 2, 4 and 8
simulated CPU devices as an FSDP mesh ``(data 1, fsdp n, tensor 1)`` it records the bytes
of parameters, optimizer state and method memory held by the fullest device (read from the
arrays' shards after ``StepFns.init_state``): with FSDP these should fall as ~1/n (small
arrays below ``fsdp_min_size`` stay replicated). It then times the jitted train step on
one device and on 8 devices as (2 data x 4 fsdp) and (2 data x 2 fsdp x 2 tensor),
medians of ``--steps`` steps after a compile, and reports each as a ratio to one device:
indicative only (8 simulated devices share this machine's cores; the point is that the
sharded step compiles and runs, not its speed). Writes
``benchmarks/results/fsdp_memory.json`` and ``.md``.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from clax.core import Batch, DataSpec, LanguageModeling, ModelFns, make_method  # noqa: E402
from clax.models.llama import LlamaLM  # noqa: E402
from clax.training.sharding import (  # noqa: E402
    ShardingRules,
    bytes_per_device,
    logical_axes,
    make_mesh,
)
from clax.training.steps import StepFns  # noqa: E402

RESULTS = "benchmarks/results/fsdp_memory"
SEQ, BATCH = 64, 16
MODEL = dict(dim=256, depth=4, num_heads=4, num_kv_heads=2, hidden_dim=1024, vocab_size=4096)


def _steps(method: str, mesh):
    lm = LlamaLM(preset="tiny", input_shape=(SEQ,), rngs=nnx.Rngs(0), **MODEL)
    fns, params, model_state = ModelFns.split(lm)
    m = make_method(method)
    data = DataSpec(Batch(jax.ShapeDtypeStruct((SEQ,), np.int32),
                          jax.ShapeDtypeStruct((SEQ,), np.int32),
                          jax.ShapeDtypeStruct((), np.int32)),
                    jax.ShapeDtypeStruct((SEQ, lm.vocab_size), np.float32))
    steps = StepFns(fns, m, m.optimizer(optax.adam(1e-3)), mesh, LanguageModeling(), data,
                    rules=ShardingRules(), param_axes=logical_axes(lm))
    return steps, steps.init_state(params, model_state, 0), lm.vocab_size


def _most(tree) -> int:
    per = bytes_per_device(tree)
    return max(per.values()) if per else 0


def _time_steps(steps, state, vocab, n):
    rng = np.random.default_rng(0)
    times = []
    for i in range(n + 1):
        tokens = rng.integers(0, vocab, (BATCH, SEQ + 1)).astype(np.int32)
        batch = steps.shard_batch(Batch(tokens[:, :-1], tokens[:, 1:],
                                        np.zeros(BATCH, np.int32)))
        t0 = time.perf_counter()
        state, m = steps.train_step(state, batch, np.int32(0))
        jax.block_until_ready(m.loss)
        if i:  # the first call compiles
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", nargs="+", default=["finetune", "ewc", "gpm", "ema"])
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    memory_rows, time_rows = [], []
    for method in args.methods:
        for n in (1, 2, 4, 8):
            mesh = make_mesh(1, n, 1, devices=jax.devices()[:n])
            _, state, _ = _steps(method, mesh)
            row = {"method": method, "devices": n, "params": _most(state.params),
                   "opt_state": _most(state.opt_state), "memory": _most(state.memory)}
            row["total"] = row["params"] + row["opt_state"] + row["memory"]
            memory_rows.append(row)
            print(row, flush=True)
        times = {}
        for name, mesh in {"1 device": make_mesh(devices=jax.devices()[:1]),
                           "2x4x1": make_mesh(2, 4, 1), "2x2x2": make_mesh(2, 2, 2)}.items():
            steps, state, vocab = _steps(method, mesh)
            times[name] = _time_steps(steps, state, vocab, args.steps)
        time_rows.append({"method": method, **{f"{k} s": v for k, v in times.items()},
                          **{f"{k} / 1 device": times[k] / times["1 device"]
                             for k in ("2x4x1", "2x2x2")}})
        print(time_rows[-1], flush=True)

    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(
        nnx.state(LlamaLM(preset="tiny", input_shape=(SEQ,), rngs=nnx.Rngs(0), **MODEL),
                  nnx.Param)))
    meta = {"date": datetime.date.today().isoformat(), "machine": platform.processor()
            or platform.machine(), "cpus": os.cpu_count(), "jax": jax.__version__,
            "model": {**MODEL, "seq_len": SEQ, "params": n_params}, "batch": BATCH,
            "command": "python benchmarks/fsdp_memory.py " + " ".join(sys.argv[1:])}
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS + ".json", "w") as f:
        json.dump({"meta": meta, "memory": memory_rows, "step_time": time_rows}, f, indent=2)
    lines = [f"# FSDP per-device state bytes and step-time ratio ({meta['date']})", "",
             f"`{meta['command']}` on {meta['cpus']} CPU cores (8 simulated devices), jax "
             f"{meta['jax']}. LlamaLM {MODEL}, {n_params / 1e6:.2f}M float32 parameters, "
             "Adam. Bytes held by the fullest device; mesh (data 1, fsdp n, tensor 1).", "",
             "| method | devices | params MiB | optimizer MiB | memory MiB | total MiB | "
             "total x n / total at 1 |", "|---|---|---|---|---|---|---|"]
    base = {r["method"]: r["total"] for r in memory_rows if r["devices"] == 1}
    for r in memory_rows:
        lines.append(f"| {r['method']} | {r['devices']} | {r['params'] / 2**20:.2f} | "
                     f"{r['opt_state'] / 2**20:.2f} | {r['memory'] / 2**20:.2f} | "
                     f"{r['total'] / 2**20:.2f} | "
                     f"{r['total'] * r['devices'] / base[r['method']]:.3f} |")
    lines += ["", "Step time (median of the steps after the compile), ratio to one device "
              "(indicative only: simulated devices share the cores):", "",
              "| method | 1 device s | 2x4x1 s | 2x2x2 s | 2x4x1 / 1 | 2x2x2 / 1 |",
              "|---|---|---|---|---|---|"]
    for r in time_rows:
        lines.append(f"| {r['method']} | {r['1 device s']:.4f} | {r['2x4x1 s']:.4f} | "
                     f"{r['2x2x2 s']:.4f} | {r['2x4x1 / 1 device']:.2f} | "
                     f"{r['2x2x2 / 1 device']:.2f} |")
    with open(RESULTS + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
