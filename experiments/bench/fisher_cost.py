r"""Cost of the exact per-example Fisher: time versus one training epoch, memory versus batch.

    python -m experiments.bench.fisher_cost [--models=mlp,cnn] [--examples=60000] \
        [--cnn_examples=8192] [--batch_size=64] [--vmap_examples=1024] \
        [--memory_batch_sizes=16,64,256,1024] \
        [--out=benchmarks/results/fisher_cost.json]

Work, per model (MLP 784-100-100-10 as in the permuted protocol; clax's SmallCNN, conv
32-64, dense 128), on the first ``--examples`` (MLP) or ``--cnn_examples`` (CNN)
Fashion-MNIST training images (8x8 digits when the IDX files are absent), in one process:

* ``epoch``: one training epoch (SGD 0.01, batch ``B``) with clax's jitted train step,
  best of two back-to-back runs (after a warm-up epoch that compiles). Both dispatch
  styles are timed: one ``train_step`` call per batch (``epoch_step_s``) and the loop's
  on-device ``run_chunk`` (``epoch_chunk_s``); the ratio uses the faster of the two.
* ``fisher_example``: ``diagonal_fisher(ModelFns, labels="true", granularity="example")``
  over the same data and batch size: exact mean of squared per-example gradients (Dense
  identity for dense layers, per-module VJPs in chunks for convs). Best of two, compiled.
* ``fisher_batch``: the same with ``granularity="batch"`` (SSD / Avalanche), for contrast.
* ``vmap_grad``: the plain estimator, ``jax.vmap(jax.grad)`` of whole-model per-example
  gradients (``diagonal_fisher`` on an apply function, ``chunk_size = B``: a ``B x params``
  array per batch), on the first ``--vmap_examples`` examples, scaled to the full data.

Memory: XLA's compiled memory analysis (``jit(...).lower(...).compile().memory_analysis()``,
``temp_size_in_bytes``: scratch memory of one compiled batch update, excluding arguments and
outputs) of the per-batch Fisher update for each batch size in ``--memory_batch_sizes``, for
the per-example (taps) and vmap(grad) estimators, and for the plain batch gradient
(``granularity="batch"``) as the baseline every estimator pays (the batch's activations).
It is a static figure of the compiled program, not a runtime measurement.
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

from clax.core import Batch, ModelFns, TrainArrays, make_method
from clax.data import load_source
from clax.fisher import diagonal_fisher
from clax.fisher.estimators import fisher_batch_update
from clax.models import make_model
from clax.training import StepFns, data_mesh
from clax.training.feed import epoch_index_batches, host_batches
from experiments.bench.common import device_description, write_json
from experiments.configs.benchmarks import FASHION_MNIST_DIR

FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["mlp", "cnn"], "Models to measure (mlp, cnn).")
flags.DEFINE_integer("examples", 60000, "Training examples (a task's data) for the MLP.")
flags.DEFINE_integer("cnn_examples", 8192, "Training examples for the CNN (slower on CPU).")
flags.DEFINE_integer("batch_size", 64, "Batch size of the epoch and of the Fisher passes.")
flags.DEFINE_integer("vmap_examples", 1024, "Examples for the plain vmap(grad) estimator.")
flags.DEFINE_list("memory_batch_sizes", ["16", "64", "256", "1024"],
                  "Batch sizes of the compiled memory analysis.")
flags.DEFINE_string("out", "benchmarks/results/fisher_cost.json", "JSON output ('' = none).")


def _model(name: str, input_shape, num_classes: int):
    if name == "mlp":
        return make_model("mlp", input_shape=input_shape, num_classes=num_classes,
                          widths=(100, 100), seed=0)
    return make_model("cnn", input_shape=input_shape, num_classes=num_classes, seed=0)


def _best(fn, repeats: int = 2) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - start)
    return best


def _epoch_fns(fns, params, model_state, x, y, batch_size):
    method = make_method("finetune")
    steps = StepFns(fns, method, method.optimizer(optax.sgd(0.01)), data_mesh(1))
    data = TrainArrays(x, y, np.zeros(len(y), np.int32))
    idx = epoch_index_batches(len(y), batch_size, seed=0, task_index=0, epoch=0)
    device_data = steps.replicate(Batch(*data))

    def by_step():
        state = steps.init_state(params, model_state, 0)
        for batch in host_batches(data, idx):
            state, _ = steps.train_step(state, steps.shard_batch(batch), np.int32(0))
        return state.params

    def by_chunk():
        state = steps.init_state(params, model_state, 0)
        state, _ = steps.run_chunk(state, device_data, idx, 0)
        return state.params

    return by_step, by_chunk


def _temp_bytes(model, fns_or_apply, params, model_state, shape, batch, chunk,
                granularity="example"):
    x = jax.ShapeDtypeStruct((batch, *shape), jnp.float32)
    ints = jax.ShapeDtypeStruct((batch,), jnp.int32)
    w = jax.ShapeDtypeStruct((batch,), jnp.float32)
    acc = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, jnp.float32), params)
    lowered = fisher_batch_update.lower(
        fns_or_apply, acc, params, model_state, x, ints, ints, w, jax.random.key(0), None,
        labels="true", granularity=granularity, chunk_size=chunk)
    analysis = lowered.compile().memory_analysis()
    return None if analysis is None else int(analysis.temp_size_in_bytes)


def measure(name: str, x: np.ndarray, y: np.ndarray, num_classes: int) -> dict:
    b = FLAGS.batch_size
    fns, params, model_state = ModelFns.split(_model(name, x.shape[1:], num_classes))
    apply = jax.jit(lambda p, xx, t: fns.apply(p, model_state, xx, t, train=False)[0])
    num_params = sum(int(np.size(p)) for p in jax.tree.leaves(params))
    out = {"model": name, "params": num_params, "examples": len(y), "batch_size": b}

    by_step, by_chunk = _epoch_fns(fns, params, model_state, x, y, b)
    jax.block_until_ready(by_step())  # compile
    out["epoch_step_s"] = _best(by_step)
    jax.block_until_ready(by_chunk())
    out["epoch_chunk_s"] = _best(by_chunk, repeats=1 if name == "cnn" else 2)
    epoch = min(out["epoch_step_s"], out["epoch_chunk_s"])

    key = jax.random.key(0)

    def fisher(**kw):
        return diagonal_fisher(fns, params, (x, y), model_state=model_state, batch_size=b,
                               key=key, **kw)

    start = time.perf_counter()
    jax.block_until_ready(fisher(labels="true"))
    out["fisher_example_first_s"] = time.perf_counter() - start
    out["fisher_example_s"] = _best(lambda: fisher(labels="true"))
    jax.block_until_ready(fisher(granularity="batch"))
    out["fisher_batch_s"] = _best(lambda: fisher(granularity="batch"))

    n_v = min(FLAGS.vmap_examples, len(y))
    loop = "host" if name == "cnn" and jax.default_backend() == "cpu" else "device"

    def vmap():
        return diagonal_fisher(apply, params, (x[:n_v], y[:n_v]), batch_size=b, chunk_size=b,
                               key=key, labels="true", loop=loop)

    jax.block_until_ready(vmap())
    out["vmap_grad_subset_s"] = _best(vmap)
    out["vmap_grad_examples"] = n_v
    out["vmap_grad_s_scaled"] = out["vmap_grad_subset_s"] * len(y) / n_v

    out["ratio_fisher_example_to_epoch"] = out["fisher_example_s"] / epoch
    out["ratio_fisher_batch_to_epoch"] = out["fisher_batch_s"] / epoch
    out["ratio_vmap_grad_to_epoch"] = out["vmap_grad_s_scaled"] / epoch
    out["ratio_vmap_grad_to_fisher_example"] = out["vmap_grad_s_scaled"] / out["fisher_example_s"]

    out["temp_bytes"] = {}
    for mb in map(int, FLAGS.memory_batch_sizes):
        out["temp_bytes"][mb] = {
            "per_example_taps": _temp_bytes(name, fns, params, model_state, x.shape[1:], mb,
                                            16),
            "vmap_grad": _temp_bytes(name, apply, params, model_state, x.shape[1:], mb, mb),
            "batch_gradient": _temp_bytes(name, fns, params, model_state, x.shape[1:], mb, 16,
                                          granularity="batch"),
        }
    return out


def main(argv):
    del argv
    if os.path.isdir(FASHION_MNIST_DIR):
        ds = load_source("idx", root=FASHION_MNIST_DIR, name="fashion_mnist")
    else:
        ds = load_source("digits")
    x, y = ds.x_train, ds.y_train
    rows = []
    for name in FLAGS.models:
        n = FLAGS.cnn_examples if name == "cnn" else FLAGS.examples
        row = measure(name, x[:n], y[:n], ds.num_classes)
        rows.append(row)
        print(f"{name}: {row['params']} params, {row['examples']} examples, batch "
              f"{row['batch_size']}: epoch {row['epoch_step_s']:.2f} s (per step) / "
              f"{row['epoch_chunk_s']:.2f} s (on-device loop); per-example Fisher "
              f"{row['fisher_example_s']:.2f} s = {row['ratio_fisher_example_to_epoch']:.2f}x "
              f"epoch; batch Fisher {row['fisher_batch_s']:.2f} s; vmap(grad) "
              f"{row['vmap_grad_s_scaled']:.1f} s scaled = "
              f"{row['ratio_vmap_grad_to_epoch']:.1f}x epoch", flush=True)
        for mb, m in row["temp_bytes"].items():
            print(f"  batch {mb}: temp bytes: per-example (taps) {m['per_example_taps']}, "
                  f"vmap(grad) {m['vmap_grad']}, batch gradient {m['batch_gradient']}")
    summary = {
        "command": "python -m experiments.bench.fisher_cost "
                   f"--models={','.join(FLAGS.models)} --examples={FLAGS.examples} "
                   f"--cnn_examples={FLAGS.cnn_examples} "
                   f"--batch_size={FLAGS.batch_size} --vmap_examples={FLAGS.vmap_examples} "
                   f"--memory_batch_sizes={','.join(FLAGS.memory_batch_sizes)}",
        "device": device_description(),
        "jax": jax.__version__,
        "data": ds.name,
        "memory_method": "XLA compiled memory analysis, temp_size_in_bytes of one "
                         "fisher_batch_update (static, excludes arguments/outputs)",
        "target": "fisher_example_s <= 3 x epoch",
        "rows": rows,
    }
    if FLAGS.out:
        write_json(FLAGS.out, summary)
        md = os.path.splitext(FLAGS.out)[0] + ".md"
        with open(md, "w") as f:
            f.write(markdown(summary))
        print(f"wrote {md}")


def _mib(b):
    return "n/a" if b is None else f"{b / 2**20:.1f}"


def markdown(summary: dict) -> str:
    lines = [f"`{summary['command']}`", "",
             f"Device: {summary['device']}; jax {summary['jax']}; data {summary['data']}.",
             "", ("| model | params | examples | batch | epoch (s), per-step / on-device loop "
                  "| per-example Fisher (s) | x epoch | batch Fisher (s) "
                  "| vmap(grad), scaled (s) | x epoch |"),
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in summary["rows"]:
        lines.append(
            f"| {r['model']} | {r['params']} | {r['examples']} | {r['batch_size']} | "
            f"{r['epoch_step_s']:.2f} / {r['epoch_chunk_s']:.2f} | {r['fisher_example_s']:.2f} "
            f"| {r['ratio_fisher_example_to_epoch']:.2f} | {r['fisher_batch_s']:.2f} | "
            f"{r['vmap_grad_s_scaled']:.1f} | {r['ratio_vmap_grad_to_epoch']:.1f} |")
    lines += ["", "Ratios use the faster epoch. Peak scratch memory (MiB) of one compiled "
              "batch update, " + summary["memory_method"] + ":", "",
              "| model | batch | per-example (taps) | vmap(grad) | batch gradient (baseline) |",
              "|---|---|---|---|---|"]
    for r in summary["rows"]:
        for mb, m in r["temp_bytes"].items():
            lines.append(f"| {r['model']} | {mb} | {_mib(m['per_example_taps'])} | "
                         f"{_mib(m['vmap_grad'])} | {_mib(m['batch_gradient'])} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    app.run(main)
