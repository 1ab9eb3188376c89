r"""Cost of continual evaluation: time evaluating every seen task every ρ steps vs training.

    python -m experiments.bench.eval_overhead [--rho=10] [--eval_subsample=1000] [--repeats=3] \
        [--out=benchmarks/results/eval_overhead.json]

Work: MLP 784-256-256-10, SGD lr 0.01, batch 128, Permuted Fashion-MNIST (Debian IDX files;
8x8 digits when absent), 5 tasks x 1 epoch (469 steps per task), in the clax loop, as
``experiments.bench.throughput``. Two runs per repeat in one process: continual evaluation
off, and on (every seen task every ρ steps on ``eval_subsample`` test examples per task, one
jitted call per evaluation). Times are the loop's own per-task ``task_train_time_s`` and
``task_eval_time_s`` without task 1 (it includes compilation), so "steady" covers tasks 2-5
(2-5 seen tasks per evaluation). Reported, medians over repeats:

* ``eval_share``: evaluation time / training time of the evaluated run (target <= 30%);
* ``chunking``: training time with evaluation / without - 1 (chunks end every ρ steps);
* ``total_overhead``: (training + evaluation time) / training time without evaluation - 1.

For an MLP the work ratio is about ``seen * eval_subsample / (3 * batch * ρ)`` (a forward
pass per evaluated example against forward + backward per trained one); it is printed as
``flop_ratio`` next to the measurement.
"""

from __future__ import annotations

import os
import statistics

from absl import app, flags

from clax.training import build_scenario, default_config, train_continual
from experiments.bench.common import device_description, write_json
from experiments.configs.benchmarks import FASHION_MNIST_DIR, use_benchmark

FLAGS = flags.FLAGS
flags.DEFINE_integer("rho", 10, "Evaluate every seen task every rho steps.")
flags.DEFINE_integer("eval_subsample", 1000, "Test examples per task in each evaluation.")
flags.DEFINE_integer("repeats", 3, "Back-to-back repeats of the two runs.")
flags.DEFINE_integer("tasks", 5, "Number of permuted tasks.")
flags.DEFINE_integer("batch", 128, "Training batch size.")
flags.DEFINE_string("out", "benchmarks/results/eval_overhead.json", "Where to write ('' = none).")

WIDTHS = (256, 256)
LR = 0.01


def config_for(rho: int, benchmark: str):
    c = default_config()
    c.name = f"eval_overhead/rho{rho}"
    use_benchmark(c, benchmark)
    c.scenario.num_tasks = FLAGS.tasks
    c.model.mlp.widths = WIDTHS
    c.optimizer.name = "sgd"
    c.optimizer.learning_rate = LR
    c.train.batch_size = FLAGS.batch
    c.train.eval_batch_size = 1000
    c.train.num_devices = 1
    c.train.eval_every_steps = rho
    c.train.eval_subsample = FLAGS.eval_subsample
    return c


def main(argv):
    del argv
    if FLAGS.tasks < 2:
        raise app.UsageError("--tasks must be >= 2 (task 1 includes compilation)")
    if FLAGS.rho < 1:
        raise app.UsageError(f"--rho must be >= 1, got {FLAGS.rho}")
    benchmark = "permuted_fmnist" if os.path.isdir(FASHION_MNIST_DIR) else "permuted_digits"
    scenario = build_scenario(config_for(0, benchmark))
    task_steps = [len(t.y_train) // FLAGS.batch for t in scenario.tasks]
    rows = []
    for r in range(FLAGS.repeats):
        off = train_continual(config_for(0, benchmark), scenario=scenario)
        on = train_continual(config_for(FLAGS.rho, benchmark), scenario=scenario)
        train_off = sum(off.task_train_time_s[1:])
        train_on = sum(on.task_train_time_s[1:])
        evals = sum(on.task_eval_time_s[1:])
        row = {
            "train_off_s": train_off, "train_on_s": train_on, "eval_s": evals,
            "eval_share": evals / train_on,
            "chunking": train_on / train_off - 1,
            "total_overhead": (train_on + evals) / train_off - 1,
            "per_task_eval_share": [e / t for e, t in zip(on.task_eval_time_s[1:],
                                                          on.task_train_time_s[1:], strict=False)],
            "acc_off": off.summary["acc"], "acc_on": on.summary["acc"],
            "num_evaluations": len({c["step"] for c in on.curves}),
        }
        rows.append(row)
        print(f"repeat {r + 1}/{FLAGS.repeats}: train {train_off:.2f}s without evaluation, "
              f"{train_on:.2f}s + {evals:.2f}s evaluation with it "
              f"(eval share {100 * row['eval_share']:.0f}%)", flush=True)
    med = statistics.median
    steady_seen = list(range(2, FLAGS.tasks + 1))
    flop_ratio = [k * FLAGS.eval_subsample / (3 * FLAGS.batch * FLAGS.rho) for k in steady_seen]
    summary = {
        "command": (f"python -m experiments.bench.eval_overhead --rho={FLAGS.rho} "
                    f"--eval_subsample={FLAGS.eval_subsample} --repeats={FLAGS.repeats} "
                    f"--tasks={FLAGS.tasks} --batch={FLAGS.batch}"),
        "device": device_description(),
        "work": (f"MLP 784-{'-'.join(map(str, WIDTHS))}-10, SGD lr {LR}, batch {FLAGS.batch}, "
                 f"{benchmark}, {FLAGS.tasks} tasks x 1 epoch ({task_steps[0]} steps per "
                 f"task); continual evaluation every {FLAGS.rho} steps on "
                 f"{FLAGS.eval_subsample} test examples per seen task; steady = tasks "
                 f"2..{FLAGS.tasks}"),
        "rho": FLAGS.rho,
        "eval_subsample": FLAGS.eval_subsample,
        "eval_share_median": med(r["eval_share"] for r in rows),
        "chunking_median": med(r["chunking"] for r in rows),
        "total_overhead_median": med(r["total_overhead"] for r in rows),
        "per_task_eval_share_median": [med(r["per_task_eval_share"][i] for r in rows)
                                       for i in range(FLAGS.tasks - 1)],
        "seen_tasks_per_evaluation": steady_seen,
        "flop_ratio_per_task": flop_ratio,
        "target_eval_share": 0.3,
        "repeats": rows,
    }
    print(f"\n{summary['work']}\ndevice: {summary['device']}")
    print(f"evaluation / training time (steady, median): "
          f"{100 * summary['eval_share_median']:.0f}% (target <= 30%)")
    print("  per task (2..{}, seen tasks {}): {}".format(
        FLAGS.tasks, steady_seen,
        ", ".join(f"{100 * s:.0f}%" for s in summary["per_task_eval_share_median"])))
    print("  work ratio seen*S/(3*B*rho): " + ", ".join(f"{100 * f:.0f}%" for f in flop_ratio))
    print(f"training slowdown from ending chunks every {FLAGS.rho} steps: "
          f"{100 * summary['chunking_median']:+.0f}%")
    print(f"total overhead vs no evaluation: {100 * summary['total_overhead_median']:+.0f}%")
    if FLAGS.out:
        write_json(FLAGS.out, summary)


if __name__ == "__main__":
    app.run(main)
