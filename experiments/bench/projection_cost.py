r"""Cost of GPM's gradient projection: time per training step with vs without it.

    python -m experiments.bench.projection_cost [--repeats=5] [--steps=2000] \
        [--batch_sizes=10,128] [--out=benchmarks/results/projection_cost.json]

Work: MLP 784-100-100-10 (GPM's Permuted-MNIST network), plain SGD lr 0.01, random
Fashion-MNIST-shaped inputs, in the clax training loop's compiled chunk
(``StepFns.run_chunk``: one jitted ``lax.fori_loop`` of steps on device-resident data), not
a bare step. ``finetune`` (the plain optimizer) and ``gpm`` (the projection before SGD, 1-D
parameters frozen) run on the same model, data and step indices in the same process. GPM's
memory is set to random orthonormal bases filling 0 %, 25 %, 50 %, 75 % and 100 % of each
layer's capacity (its fan-in: 784, 100, 100), so the cost is measured at each rank without
training ten tasks. Each repeat times one chunk of ``--steps`` steps per setting, back to
back (after a warm-up chunk that compiles); the reported ratio is the median over repeats
of the per-repeat ratio ``time(gpm at rank r) / time(finetune)``. Target: <= 1.3x. The
load-independent ratio of matmul FLOPs (:func:`flops_per_step`) is recorded beside it.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

from clax.core import Batch, ModelFns, make_method
from clax.models import make_model
from clax.subspace import SubspaceBasis
from clax.training import StepFns, data_mesh
from experiments.bench.common import device_description, write_json

FLAGS = flags.FLAGS
flags.DEFINE_integer("repeats", 5, "Back-to-back repeats of every setting.")
flags.DEFINE_integer("steps", 2000, "Training steps per timed chunk.")
flags.DEFINE_list("batch_sizes", ["10", "128"], "Batch sizes (GPM uses 10).")
flags.DEFINE_list("fractions", ["0", "0.25", "0.5", "0.75", "1"], "Basis rank / capacity.")
flags.DEFINE_string("out", "benchmarks/results/projection_cost.json", "Where to write ('' = none).")

WIDTHS = (100, 100)
LR = 0.01
N_DATA = 4096


def random_bases(memory, fraction: float, key: jax.Array):
    """Orthonormal bases of rank ``round(fraction · capacity)`` in the layout of ``memory``."""

    def fill(path, basis):
        n, cap = basis.vectors.shape
        rank = round(fraction * cap)
        k = jax.random.fold_in(key, hash(jax.tree_util.keystr(path)) % (2**31))
        q, _ = jnp.linalg.qr(jax.random.normal(k, (n, cap)))
        vectors = jnp.where(jnp.arange(cap)[None, :] < rank, q, 0.0).astype(basis.vectors.dtype)
        return SubspaceBasis(vectors, jnp.asarray(rank, jnp.int32))

    return jax.tree_util.tree_map_with_path(
        fill, memory, is_leaf=lambda x: isinstance(x, SubspaceBasis))


def flops_per_step(batch_size: int, fraction: float | None, rank_buckets: int = 4) -> float:
    """Matmul FLOPs of one step: forward + backward ``6·B·Σ n·out``, plus the projection's
    ``4·n·c·out`` per layer, ``c`` the bucket that holds the rank (0 at rank 0)."""
    from clax.transforms.projection import bucket_sizes

    dims = list(zip((784, *WIDTHS), (*WIDTHS, 10), strict=False))
    total = 6.0 * batch_size * sum(n * o for n, o in dims)
    if fraction is not None:
        for n, o in dims:
            rank = round(fraction * n)
            c = next((s for s in bucket_sizes(n, rank_buckets) if s >= rank), n) if rank else 0
            total += 4.0 * n * c * o
    return total


def time_chunk(steps: StepFns, state, data, idx) -> tuple[float, object]:
    start = time.perf_counter()
    state, metrics = steps.run_chunk(state, data, idx, 1)
    jax.block_until_ready((state, metrics))
    return time.perf_counter() - start, state


def main(argv):
    del argv
    model = make_model("mlp", input_shape=(28, 28, 1), num_classes=10, widths=WIDTHS, seed=0)
    fns, params, model_state = ModelFns.split(model)
    rng = np.random.default_rng(0)
    data = Batch(rng.uniform(0, 1, (N_DATA, 28, 28, 1)).astype(np.float32),
                 rng.integers(0, 10, N_DATA).astype(np.int32), np.zeros(N_DATA, np.int32))
    fractions = [float(f) for f in FLAGS.fractions]
    results = {}
    for batch_size in [int(b) for b in FLAGS.batch_sizes]:
        idx = rng.integers(0, N_DATA, (FLAGS.steps, batch_size)).astype(np.int32)
        runners = {}
        for name in ("finetune", "gpm"):
            method = make_method(name)
            steps = StepFns(fns, method, method.optimizer(optax.sgd(LR)), data_mesh(1))
            runners[name] = (steps, steps.init_state(params, model_state, 0))
        settings = {"finetune": runners["finetune"]}
        gpm_steps, gpm_state = runners["gpm"]
        for f in fractions:
            memory = random_bases(gpm_state.memory, f, jax.random.key(1))
            settings[f"gpm@{f:g}"] = (gpm_steps, gpm_steps.place_state(
                gpm_state._replace(memory=memory)))
        device_data = runners["finetune"][0].replicate(data)
        states = {}
        for label, (steps, state) in settings.items():  # warm-up: compile
            _, states[label] = time_chunk(steps, state, device_data, idx)
        rows = []
        for r in range(FLAGS.repeats):
            row = {}
            for label, (steps, _) in settings.items():
                row[label], states[label] = time_chunk(steps, states[label], device_data, idx)
            rows.append(row)
            print(f"batch {batch_size} repeat {r + 1}/{FLAGS.repeats}: " + ", ".join(
                f"{k} {1e6 * v / FLAGS.steps:.0f}us" for k, v in row.items()), flush=True)
        med = statistics.median
        results[str(batch_size)] = {
            "us_per_step_median": {k: 1e6 * med(r[k] for r in rows) / FLAGS.steps
                                   for k in settings},
            "ratio_median": {k: med(r[k] / r["finetune"] for r in rows)
                             for k in settings if k != "finetune"},
            "flops_ratio": {f"gpm@{f:g}": flops_per_step(batch_size, f)
                            / flops_per_step(batch_size, None) for f in fractions},
            "repeats_s": rows,
        }
    summary = {
        "command": (f"python -m experiments.bench.projection_cost --repeats={FLAGS.repeats} "
                    f"--steps={FLAGS.steps} --batch_sizes={','.join(FLAGS.batch_sizes)} "
                    f"--fractions={','.join(FLAGS.fractions)}"),
        "work": (f"MLP 784-{'-'.join(map(str, WIDTHS))}-10, SGD lr {LR}, clax training chunk "
                 f"(StepFns.run_chunk) of {FLAGS.steps} steps; gpm@f = GPM with random "
                 "orthonormal bases of rank f*capacity in every layer (capacities 784/100/100)"),
        "device": device_description(),
        "jax": jax.__version__,
        "target": "ratio <= 1.3",
        "results": results,
    }
    print(f"\n{summary['work']}\ndevice: {summary['device']}")
    for b, res in results.items():
        print(f"batch {b}: finetune {res['us_per_step_median']['finetune']:.0f} us/step")
        for k, v in res["ratio_median"].items():
            print(f"  {k}: {res['us_per_step_median'][k]:.0f} us/step, {v:.2f}x finetune "
                  f"(matmul FLOPs {res['flops_ratio'][k]:.2f}x)")
    if FLAGS.out:
        write_json(FLAGS.out, summary)


if __name__ == "__main__":
    app.run(main)
