r"""Pretrain-then-continual: base-task retention and new-task accuracy per method.

    python -m experiments.bench.pretrain_continual --benchmark=pretrain_digits
    python -m experiments.bench.pretrain_continual --benchmark=pretrain_fmnist

Task 0 is the base split (classes 0-4), then {5,6}, {7,8}, {9} class-incrementally
(`clax.data.pretrain_continual`), same epochs for every task; the model, optimizer and
schedule come from ``experiments/configs/pretrain_continual_<digits|fmnist>.py``. Methods:
finetune, ema, adaptive_ema, weight_averaging, lines at λ ∈ {0.25, 0.5, 0.75}, slow_learner
with classifier alignment, each with its default hyperparameters otherwise. Writes
``benchmarks/results/pretrain_continual_<benchmark>.md`` and ``.json``. Columns: base
accuracy after task 0 and after the last task, their ratio (retention), mean final
accuracy on the new tasks, ACC (final mean over all tasks), training time (compiles
included, evaluation excluded).
"""

from __future__ import annotations

import json
import os
import sys

import jax
from absl import app, flags

from clax.metrics import pretrain_continual_summary
from clax.training import build_scenario, train_continual
from experiments.bench.common import device_description
from experiments.compare import run_config
from experiments.configs import pretrain_continual_digits, pretrain_continual_fmnist

FLAGS = flags.FLAGS
flags.DEFINE_enum("benchmark", "pretrain_digits", ["pretrain_digits", "pretrain_fmnist"],
                  "Benchmark preset (experiments/configs/benchmarks.py).")
flags.DEFINE_integer("epochs", None, "Override train.epochs_per_task (smoke runs).")
flags.DEFINE_integer("max_train_per_task", None, "Subsample each task (smoke runs).")
flags.DEFINE_string("methods", None, "Comma-separated subset of the run labels (smoke runs).")
flags.DEFINE_string("out_dir", "benchmarks/results", "Where the .md and .json go ('' = none).")

CONFIGS = {"pretrain_digits": pretrain_continual_digits,
           "pretrain_fmnist": pretrain_continual_fmnist}

# (label, method, hyperparameters)
RUNS = [
    ("finetune", "finetune", {}),
    ("ema", "ema", {}),
    ("adaptive_ema", "adaptive_ema", {}),
    ("weight_averaging", "weight_averaging", {}),
    ("lines(lam=0.25)", "lines", {"lam": 0.25}),
    ("lines(lam=0.5)", "lines", {"lam": 0.5}),
    ("lines(lam=0.75)", "lines", {"lam": 0.75}),
    ("slow_learner+ca", "slow_learner", {"align_classifier": True}),
]


def _pct(x):
    return "n/a" if x is None else f"{100 * x:.1f}"


def main(argv):
    del argv
    base = CONFIGS[FLAGS.benchmark].get_config()
    if FLAGS.epochs is not None:
        base.train.epochs_per_task = FLAGS.epochs
    if FLAGS.max_train_per_task is not None:
        base.benchmarks[FLAGS.benchmark].scenario.max_train_per_task = FLAGS.max_train_per_task
    wanted = None if FLAGS.methods is None else set(FLAGS.methods.split(","))
    runs = [r for r in RUNS if wanted is None or r[0] in wanted]
    scenario = None
    rows = []
    for label, method, hp in runs:
        config = run_config(base, FLAGS.benchmark, method)
        config.method[method].update(hp)
        scenario = scenario or build_scenario(config)
        result = train_continual(config, scenario=scenario)
        s = pretrain_continual_summary(result.accuracy_matrix)
        row = {"method": label, **s, "acc": result.summary["acc"],
               "train_time_s": result.train_time_s,
               "accuracy_matrix": result.accuracy_matrix.tolist()}
        rows.append(row)
        print(f"{label}: base {_pct(s['base_before'])} -> {_pct(s['base_after'])}, "
              f"new {_pct(s['new_tasks_acc'])}, ACC {_pct(row['acc'])}, "
              f"{row['train_time_s']:.1f}s", flush=True)

    command = "python -m experiments.bench.pretrain_continual " + " ".join(sys.argv[1:])
    device = device_description()
    t = base.train
    work = (f"{FLAGS.benchmark}: {[t_.classes.tolist() for t_ in scenario.tasks]}, MLP "
            f"{tuple(base.model.mlp.widths)}, {base.optimizer.name} lr "
            f"{base.optimizer.learning_rate}, batch {t.batch_size}, {t.epochs_per_task} "
            f"epochs/task, seed {base.seed}")
    lines = [
        f"# Pretrain-then-continual: {FLAGS.benchmark}", "",
        f"Command: `{command}`", "", f"Work: {work}", "",
        f"Device: {device}; jax {jax.__version__}", "",
        "| method | base acc before (%) | base acc after (%) | retention | new-task acc (%) "
        "| ACC (%) | train time (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ret = "n/a" if r["base_retention"] is None else f"{r['base_retention']:.3f}"
        lines.append(f"| {r['method']} | {_pct(r['base_before'])} | {_pct(r['base_after'])} | "
                     f"{ret} | {_pct(r['new_tasks_acc'])} | {_pct(r['acc'])} | "
                     f"{r['train_time_s']:.1f} |")
    table = "\n".join(lines) + "\n"
    print("\n" + table)
    if FLAGS.out_dir:
        os.makedirs(FLAGS.out_dir, exist_ok=True)
        stem = os.path.join(FLAGS.out_dir, f"pretrain_continual_{FLAGS.benchmark}")
        with open(stem + ".md", "w") as f:
            f.write(table)
        with open(stem + ".json", "w") as f:
            json.dump({"command": command, "work": work, "device": device,
                       "jax": jax.__version__, "rows": rows}, f, indent=2)
        print(f"wrote {stem}.md and {stem}.json")


if __name__ == "__main__":
    app.run(main)
