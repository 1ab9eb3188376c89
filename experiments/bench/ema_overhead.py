r"""Cost of EMA balancing: training-step throughput with and without the EMA wrapper.

    python -m experiments.bench.ema_overhead [--repeats=5] \
        [--out=benchmarks/results/ema_overhead.json]

Work: MLP 784-256-256-10, SGD lr 0.01, batch 128, Permuted Fashion-MNIST (Debian IDX files;
8x8 digits when absent), 5 tasks x 1 epoch, in the clax loop. Three methods on the same
model, data and steps, in the same process: ``finetune`` (plain optimizer), ``ema`` (fixed
rate) and ``adaptive_ema`` (CoIN's per-tensor rate), with the EMA swap at task end off so
only the per-step cost is timed. Timings are ``train_continual(...).task_train_time_s``
without task 1 (it includes compilation). Each repeat runs the three back to back; the
ratio is the median over repeats of the per-repeat ratio. Target: <= 1.1x.
"""

from __future__ import annotations

import os
import statistics

import jax
from absl import app, flags

from clax.training import build_scenario, default_config, train_continual
from experiments.bench.common import device_description, write_json
from experiments.configs.benchmarks import FASHION_MNIST_DIR, use_benchmark

FLAGS = flags.FLAGS
flags.DEFINE_integer("repeats", 5, "Back-to-back repeats of the three runs.")
flags.DEFINE_integer("tasks", 5, "Number of permuted tasks.")
flags.DEFINE_string("out", "benchmarks/results/ema_overhead.json", "Where to write ('' = none).")

WIDTHS = (256, 256)
LR = 0.01
BATCH = 128
METHODS = {
    "plain": ("finetune", {}),
    "ema": ("ema", {"swap_at_task_end": False}),
    "adaptive_ema": ("adaptive_ema", {"swap_at_task_end": False}),
}


def config_for(method: str, hp: dict, num_tasks: int, benchmark: str):
    c = default_config()
    c.name = f"ema_overhead/{method}"
    use_benchmark(c, benchmark)
    c.scenario.num_tasks = num_tasks
    c.model.mlp.widths = WIDTHS
    c.optimizer.name = "sgd"
    c.optimizer.learning_rate = LR
    c.train.batch_size = BATCH
    c.train.eval_batch_size = 1000
    c.train.num_devices = 1
    c.method.name = method
    c.method[method].update(hp)
    return c


def main(argv):
    del argv
    if FLAGS.tasks < 2:
        raise app.UsageError("--tasks must be >= 2 (task 1 includes compilation)")
    benchmark = "permuted_fmnist" if os.path.isdir(FASHION_MNIST_DIR) else "permuted_digits"
    scenario = build_scenario(config_for("finetune", {}, FLAGS.tasks, benchmark))
    steps = sum(len(t.y_train) // BATCH for t in scenario.tasks[1:])
    rows = []
    for r in range(FLAGS.repeats):
        row = {}
        for label, (method, hp) in METHODS.items():
            result = train_continual(config_for(method, hp, FLAGS.tasks, benchmark),
                                     scenario=scenario)
            row[label] = {"task_s": result.task_train_time_s,
                          "steady_s": sum(result.task_train_time_s[1:]),
                          "acc": result.summary["acc"]}
        rows.append(row)
        print(f"repeat {r + 1}/{FLAGS.repeats}: " + ", ".join(
            f"{k} {v['steady_s']:.2f}s" for k, v in row.items()), flush=True)
    med = statistics.median
    summary = {
        "command": f"python -m experiments.bench.ema_overhead --repeats={FLAGS.repeats} "
                   f"--tasks={FLAGS.tasks}",
        "work": f"MLP 784-{'-'.join(map(str, WIDTHS))}-10, SGD lr {LR}, batch {BATCH}, "
                f"{benchmark}, {FLAGS.tasks} tasks x 1 epoch; steady = tasks 2..{FLAGS.tasks}",
        "device": device_description(),
        "jax": jax.__version__,
        "steady_steps": steps,
        "ratio_median": {k: med(r[k]["steady_s"] / r["plain"]["steady_s"] for r in rows)
                         for k in ("ema", "adaptive_ema")},
        "steady_steps_per_s_best": {k: steps / min(r[k]["steady_s"] for r in rows)
                                    for k in METHODS},
        "target": "ratio <= 1.1",
        "repeats": rows,
    }
    print(f"\n{summary['work']}\ndevice: {summary['device']}")
    for k, v in summary["ratio_median"].items():
        print(f"{k} / plain, median steady ratio: {v:.3f}x (target <= 1.1x)")
    for k, v in summary["steady_steps_per_s_best"].items():
        print(f"{k}: best {v:.0f} steps/s")
    if FLAGS.out:
        write_json(FLAGS.out, summary)


if __name__ == "__main__":
    app.run(main)
