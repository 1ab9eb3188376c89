r"""Throughput: the clax training loop against a bare jitted JAX loop doing the same work.

    python -m experiments.bench.throughput [--repeats=3] [--out=benchmarks/results/throughput.json]

Work: MLP 784-256-256-10, SGD lr 0.01, batch 128, Permuted Fashion-MNIST (Debian IDX
files in /usr/share/datasets/fashion-mnist), 5 tasks x 1 epoch, finetune. Both loops keep
each task's data on device and run an epoch as one `lax.scan` over shuffled index batches,
with the same batch order. Timings are training time only (clax's evaluation after each
task is excluded); "steady" leaves out task 1, whose time includes compilation. Each
repeat runs the two loops back to back and the ratio uses the median over repeats.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

from clax.training import build_scenario, default_config, train_continual
from clax.training.feed import epoch_index_batches
from experiments.bench.common import device_description, write_json
from experiments.configs.benchmarks import use_benchmark

FLAGS = flags.FLAGS
flags.DEFINE_integer("repeats", 3, "Back-to-back repeats of both loops.")
flags.DEFINE_integer("tasks", 5, "Number of permuted tasks.")
flags.DEFINE_string("out", "benchmarks/results/throughput.json", "Where to write the figures.")

WIDTHS = (256, 256)
LR = 0.01
BATCH = 128
SEED = 0


def clax_config(num_tasks: int):
    c = default_config()
    c.name = "throughput/clax"
    use_benchmark(c, "permuted_fmnist")
    c.scenario.num_tasks = num_tasks
    c.model.mlp.widths = WIDTHS
    c.optimizer.name = "sgd"
    c.optimizer.learning_rate = LR
    c.train.batch_size = BATCH
    c.train.eval_batch_size = 1000
    c.train.num_devices = 1
    return c


def bare_loop(scenario, seed: int) -> list[float]:
    """The same training in plain JAX: params dict, jnp MLP, optax.sgd, one scan/epoch."""
    sizes = (int(np.prod(scenario.input_shape)), *WIDTHS, scenario.num_classes)
    keys = jax.random.split(jax.random.key(seed), len(sizes) - 1)
    init = jax.nn.initializers.lecun_normal()
    params = [
        {"w": init(k, (a, b), jnp.float32), "b": jnp.zeros((b,), jnp.float32)}
        for k, a, b in zip(keys, sizes[:-1], sizes[1:], strict=False)
    ]
    tx = optax.sgd(LR)
    opt_state = tx.init(params)

    def loss_fn(params, x, y):
        h = x.reshape(x.shape[0], -1)
        for layer in params[:-1]:
            h = jax.nn.relu(h @ layer["w"] + layer["b"])
        logits = h @ params[-1]["w"] + params[-1]["b"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def epoch(params, opt_state, x, y, idx):
        def body(carry, i):
            params, opt_state = carry
            loss, grads = jax.value_and_grad(loss_fn)(params, x[i], y[i])
            updates, opt_state = tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        (params, opt_state), losses = jax.lax.scan(body, (params, opt_state), idx)
        return params, opt_state, losses

    times = []
    for t, task in enumerate(scenario.tasks):
        x, y = jax.device_put(task.x_train), jax.device_put(task.y_train)
        idx = epoch_index_batches(len(task.y_train), BATCH, seed=seed, task_index=t, epoch=0)
        start = time.perf_counter()
        params, opt_state, losses = epoch(params, opt_state, x, y, jax.device_put(idx))
        np.asarray(losses)  # wait for the device, as the clax loop does
        times.append(time.perf_counter() - start)
    return times


def main(argv):
    del argv
    if FLAGS.tasks < 2:
        raise app.UsageError("--tasks must be >= 2 (task 1 includes compilation)")
    config = clax_config(FLAGS.tasks)
    scenario = build_scenario(config)
    rows = []
    for r in range(FLAGS.repeats):
        result = train_continual(config, scenario=scenario)
        bare = bare_loop(scenario, SEED)
        rows.append({"clax_task_s": result.task_train_time_s, "bare_task_s": bare,
                     "clax_acc": result.summary["acc"]})
        print(f"repeat {r + 1}/{FLAGS.repeats}: clax {sum(result.task_train_time_s):.2f}s "
              f"(steady {sum(result.task_train_time_s[1:]):.2f}s), bare {sum(bare):.2f}s "
              f"(steady {sum(bare[1:]):.2f}s)")
    steps = sum(len(t.y_train) // BATCH for t in scenario.tasks)
    steady_steps = steps - len(scenario.tasks[0].y_train) // BATCH
    med = statistics.median
    clax_total = [sum(r["clax_task_s"]) for r in rows]
    bare_total = [sum(r["bare_task_s"]) for r in rows]
    clax_steady = [sum(r["clax_task_s"][1:]) for r in rows]
    bare_steady = [sum(r["bare_task_s"][1:]) for r in rows]
    summary = {
        "command": "python -m experiments.bench.throughput " + f"--repeats={FLAGS.repeats}",
        "work": f"MLP 784-{'-'.join(map(str, WIDTHS))}-10, SGD lr {LR}, batch {BATCH}, "
                f"Permuted Fashion-MNIST, {FLAGS.tasks} tasks x 1 epoch, finetune",
        "device": device_description(),
        "jax": jax.__version__,
        "steps": steps,
        "ratio_total_median": med(c / b for c, b in zip(clax_total, bare_total, strict=False)),
        "ratio_steady_median": med(c / b for c, b in zip(clax_steady, bare_steady, strict=False)),
        "ratio_steady_best": min(clax_steady) / min(bare_steady),
        "steady_steps_per_s_best": {"clax": steady_steps / min(clax_steady),
                                    "bare": steady_steps / min(bare_steady)},
        "repeats": rows,
    }
    print(f"\n{summary['work']}")
    print(f"steps: {steps}; device: {summary['device']}")
    best = summary["steady_steps_per_s_best"]
    print(f"total incl. compile, median ratio clax/bare: {summary['ratio_total_median']:.3f}x")
    print(f"steady state (tasks 2-{FLAGS.tasks}), median ratio clax/bare: "
          f"{summary['ratio_steady_median']:.3f}x (target <= 1.2x)")
    print(f"steady state, best of {FLAGS.repeats}: clax {best['clax']:.0f} steps/s, bare "
          f"{best['bare']:.0f} steps/s, ratio {summary['ratio_steady_best']:.3f}x")
    if FLAGS.out:
        write_json(FLAGS.out, summary)


if __name__ == "__main__":
    app.run(main)
