r"""Cost of device-resident replay: a replay step versus a finetune step at equal batch.

    python -m experiments.bench.replay_overhead [--repeats=7] [--steps=200] \
        [--out=benchmarks/results/replay_overhead.json]

Work: MLP 784-256-256-10, SGD lr 0.05, task 0 of class-incremental Split Fashion-MNIST
(Debian IDX files; 8x8 digits when absent), ``B = 64`` new examples per step, buffer 200
(full, so every insertion is a reservoir replacement). Each configuration runs
``--steps`` steps as one compiled chunk on device-resident data (``StepFns.run_chunk``),
after a warm-up chunk that compiles it and fills the buffer; per-step time = chunk time /
steps. All configurations run back to back in the same process, ``--repeats`` times; the
ratios are ratios of medians.

* ``er / finetune@B+M``: ER with ``M = B`` replayed examples against finetune on a batch
  of ``B + M`` (the same number of examples through the network): what insertion,
  sampling and the separate replay forward pass cost. Target <= 1.15x.
* ``derpp / finetune@B+2M``: DER++ (two replay batches, stored logits) likewise.
* ``er / finetune@B``: the full price of replay (it trains on twice the examples).
* ``insert+sample / finetune@B``: a jitted loop of only ``reservoir_insert`` + ``sample``
  (no model), per step.

Also recorded: the same ratios of the best (minimum) times, less sensitive to other load
on the machine than medians.
"""

from __future__ import annotations

import os
import statistics
import time

import jax
import numpy as np
import optax
from absl import app, flags

from clax.core import Batch, ModelFns, make_method
from clax.models import make_model
from clax.replay import init_buffer, reservoir_insert, sample
from clax.training import StepFns, build_scenario, data_mesh, default_config
from clax.training.feed import epoch_index_batches
from experiments.bench.common import device_description, write_json
from experiments.configs.benchmarks import FASHION_MNIST_DIR, use_benchmark

FLAGS = flags.FLAGS
flags.DEFINE_integer("repeats", 7, "Back-to-back repeats of every configuration.")
flags.DEFINE_integer("steps", 200, "Steps per timed chunk.")
flags.DEFINE_integer("batch", 64, "New examples per step (B).")
flags.DEFINE_integer("buffer_size", 200, "Replay buffer capacity.")
flags.DEFINE_string("out", "benchmarks/results/replay_overhead.json", "Where to write ('' = none).")

WIDTHS = (256, 256)
LR = 0.05


def _task0():
    c = default_config()
    name = "split_fmnist" if os.path.isdir(FASHION_MNIST_DIR) else "split_digits"
    use_benchmark(c, name)
    task = build_scenario(c).tasks[0]
    return name, task


def _index(n, batch, steps):
    """`steps` rows of batch indices (several epochs if needed)."""
    rows, epoch = [], 0
    while sum(len(r) for r in rows) < steps:
        rows.append(epoch_index_batches(n, batch, seed=0, task_index=0, epoch=epoch))
        epoch += 1
    return np.concatenate(rows)[:steps]


class _Runner:
    """One configuration: a compiled chunk of `steps` steps, timed per call."""

    def __init__(self, method, hp, batch, task, steps):
        model = make_model("mlp", input_shape=task.x_train.shape[1:], num_classes=10,
                           widths=WIDTHS, seed=0)
        fns, params, model_state = ModelFns.split(model)
        m = make_method(method, **hp)
        self.steps = StepFns(fns, m, m.optimizer(optax.sgd(LR)), data_mesh(1))
        self.state = self.steps.init_state(params, model_state, 0)
        tids = np.zeros(len(task.y_train), np.int32)
        self.data = self.steps.replicate(Batch(task.x_train, task.y_train, tids))
        self.idx = _index(len(task.y_train), batch, steps)
        self.n = steps
        self.run()  # compile, fill the buffer

    def run(self) -> float:
        t = time.perf_counter()
        self.state, m = self.steps.run_chunk(self.state, self.data, self.idx, 0)
        jax.block_until_ready((self.state, m))
        return (time.perf_counter() - t) / self.n


class _BufferOnly:
    """`steps` iterations of reservoir_insert + sample of M, in one jitted fori_loop."""

    def __init__(self, batch, task, steps, capacity):
        x = np.asarray(task.x_train[: steps * batch]).reshape(steps, batch, *task.x_train.shape[1:])
        y = np.asarray(task.y_train[: steps * batch]).reshape(steps, batch)
        self.data = jax.device_put((x, y))
        self.state = init_buffer(capacity, task.x_train.shape[1:])
        self.n = steps

        @jax.jit
        def loop(state, data):
            xs, ys = data

            def body(i, carry):
                state, acc = carry
                b = Batch(xs[i], ys[i], ys[i] * 0)
                key = jax.random.fold_in(jax.random.key(0), i)
                state = reservoir_insert(state, b, key)
                s = sample(state, jax.random.fold_in(key, 1), batch)
                return state, acc + s.batch.x.sum()

            return jax.lax.fori_loop(0, steps, body, (state, 0.0))

        self.loop = loop
        self.run()

    def run(self) -> float:
        t = time.perf_counter()
        self.state, acc = self.loop(self.state, self.data)
        jax.block_until_ready(acc)
        return (time.perf_counter() - t) / self.n


def main(argv):
    del argv
    b, m, cap = FLAGS.batch, FLAGS.batch, FLAGS.buffer_size
    bench, task = _task0()
    need = FLAGS.steps * b
    if len(task.y_train) < need:
        reps = -(-need // len(task.y_train))
        task = task._replace(x_train=np.concatenate([task.x_train] * reps),
                             y_train=np.concatenate([task.y_train] * reps))
    configs = {
        "finetune@B": ("finetune", {}, b),
        "finetune@B+M": ("finetune", {}, b + m),
        "finetune@B+2M": ("finetune", {}, b + 2 * m),
        "er": ("er", {"buffer_size": cap}, b),
        "derpp": ("derpp", {"buffer_size": cap}, b),
    }
    runners = {k: _Runner(meth, hp, bs, task, FLAGS.steps) for k, (meth, hp, bs) in configs.items()}
    runners["insert+sample"] = _BufferOnly(b, task, FLAGS.steps, cap)
    times = {k: [] for k in runners}
    for r in range(FLAGS.repeats):
        for k, runner in runners.items():
            times[k].append(runner.run())
        print(f"repeat {r + 1}/{FLAGS.repeats}: " + ", ".join(
            f"{k} {1e3 * v[-1]:.2f}ms" for k, v in times.items()), flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    pairs = [("er", "finetune@B+M"), ("derpp", "finetune@B+2M"), ("er", "finetune@B"),
             ("derpp", "finetune@B"), ("insert+sample", "finetune@B")]
    ratios = {f"{a} / {b}": med[a] / med[b] for a, b in pairs}
    ratios_best = {f"{a} / {b}": best[a] / best[b] for a, b in pairs}
    summary = {
        "command": f"python -m experiments.bench.replay_overhead --repeats={FLAGS.repeats} "
                   f"--steps={FLAGS.steps} --batch={b} --buffer_size={cap}",
        "work": f"MLP 784-{'-'.join(map(str, WIDTHS))}-10, SGD lr {LR}, {bench} task 0, "
                f"B={b} new + M={m} replayed per step, buffer {cap} (full), "
                f"{FLAGS.steps} steps per timed chunk",
        "device": device_description(),
        "jax": jax.__version__,
        "median_step_ms": {k: 1e3 * v for k, v in med.items()},
        "ratio_of_medians": ratios,
        "ratio_of_best": ratios_best,
        "target": "er / finetune@B+M <= 1.15",
        "step_ms": {k: [1e3 * t for t in v] for k, v in times.items()},
    }
    print(f"\n{summary['work']}\ndevice: {summary['device']}")
    for k, v in med.items():
        print(f"{k}: median {1e3 * v:.3f} ms/step")
    for k, v in ratios.items():
        print(f"{k}: {v:.3f}x (ratio of medians; of best: {ratios_best[k]:.3f}x)")
    if FLAGS.out:
        write_json(FLAGS.out, summary)


if __name__ == "__main__":
    app.run(main)
