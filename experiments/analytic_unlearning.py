r"""Analytic continual learning of every task, then exact unlearning of one class (ACU).

    python -m experiments.analytic_unlearning [--benchmark=split_fmnist] [--forget_class=0] \
        [--buffer_size=2048] [--gamma=0.1] [--dtype=float64] [--repeats=3] \
        [--out=benchmarks/results/analytic_unlearning]

Features: a **fixed random ReLU expansion of the raw pixels**, ``ReLU(x · P)`` with
``P ~ U(±1/√(H·W·C))`` of width ``--buffer_size`` (ACIL's buffer layer applied to the
pixels; no backbone is trained, so every number is deterministic given the seed).

1. The tasks of the class-incremental benchmark are learned one after another with
   :func:`clax.analytic.rls.learn` (recursive least squares, batches of ``--batch_size``);
   the accuracy matrix after each task gives ACC / BWT / forgetting.
2. Every training example of ``--forget_class`` is unlearned with
   :func:`clax.analytic.rls.unlearn` (the ACU downdate), with the checks of the public
   function (class counts, positive-definite downdate).
3. The reference: ridge regression refit from scratch on the retained training data
   (:func:`clax.analytic.rls.fit`, one Cholesky solve). The unlearned weights are compared
   with it (max and relative differences of ``W``; identical test predictions).
4. Forget / retain accuracy and the membership-inference score come from
   :func:`clax.metrics.unlearning.unlearning_metrics` for the model before unlearning, after
   ACU and after the refit, with the gap of ACU to the refit.
5. Time: median over ``--repeats`` of the exact unlearning versus the refit from scratch,
   both compiled beforehand (a warm-up call), results waited for.

Writes ``<out>.json`` and ``<out>.md`` (``--out=''`` writes nothing).
"""

from __future__ import annotations

import statistics
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from clax import metrics as clax_metrics
from clax.analytic import rls
from clax.metrics.unlearning import UnlearningSplit, reference_gap, unlearning_metrics
from clax.training import build_scenario, default_config
from experiments.bench.common import device_description, write_json
from experiments.configs.benchmarks import use_benchmark

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defines this script's flags (only when run as a script: tests import the module, and
    absl flags are global, so two scripts defining ``--out`` would collide)."""
    flags.DEFINE_string("benchmark", "split_fmnist", "Class-incremental benchmark preset.")
    flags.DEFINE_integer("forget_class", 0, "The class whose training examples are unlearned.")
    flags.DEFINE_integer("buffer_size", 2048, "Width of the random ReLU expansion of the pixels.")
    flags.DEFINE_float("gamma", 0.1, "Ridge regularisation γ (ACIL's default).")
    flags.DEFINE_enum("dtype", "float64", ["float32", "float64"], "Precision (ACIL: float64).")
    flags.DEFINE_integer("batch_size", 1024, "Rows per recursive least-squares update.")
    flags.DEFINE_integer("repeats", 3, "Timed repeats of unlearning and refitting.")
    flags.DEFINE_integer("seed", 0, "Seed of the random expansion.")
    flags.DEFINE_string("out", "benchmarks/results/analytic_unlearning",
                        "Output path without extension ('' = write nothing).")


def _flat(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, np.float32).reshape(len(x), -1)


def _timed(fn, repeats: int) -> tuple[Any, list[float]]:
    """Result of a warm-up call (compiles) and the times of `repeats` further calls."""
    out = jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return out, times


def run(*, benchmark: str = "split_fmnist", forget_class: int = 0, buffer_size: int = 2048,
        gamma: float = 0.1, dtype: str = "float64", batch_size: int = 1024, repeats: int = 3,
        seed: int = 0) -> dict[str, Any]:
    """Runs the experiment; returns the summary (see the module docstring)."""
    config = use_benchmark(default_config(), benchmark)
    scenario = build_scenario(config)
    if scenario.kind != "class_incremental":
        raise ValueError(f"benchmark {benchmark!r} is {scenario.kind}; use a class-incremental one")
    if not 0 <= forget_class < scenario.num_classes:
        raise ValueError(f"forget_class must be in [0, {scenario.num_classes}), got {forget_class}")
    with jax.enable_x64(dtype == "float64"):
        return _run(scenario, benchmark=benchmark, forget_class=forget_class,
                    buffer_size=buffer_size, gamma=gamma, dtype=dtype, batch_size=batch_size,
                    repeats=repeats, seed=seed)


def _run(scenario, *, benchmark, forget_class, buffer_size, gamma, dtype, batch_size, repeats,
         seed) -> dict[str, Any]:
    tasks = scenario.tasks
    d_in = int(np.prod(scenario.input_shape))
    state = rls.init(d_in, scenario.num_classes, gamma=gamma, buffer_size=buffer_size,
                     key=jax.random.key(seed), dtype=jnp.dtype(dtype))

    def accuracy(s, x, y):
        return float(np.mean(np.asarray(rls.predict(s, _flat(x))).argmax(1) == y))

    # 1. Learn the tasks in order.
    baseline = [accuracy(state, t.x_test, t.y_test) for t in tasks]
    rows, learn_s = [], 0.0
    for task in tasks:
        start = time.perf_counter()
        state = jax.block_until_ready(
            rls.learn(state, _flat(task.x_train), task.y_train, batch_size=batch_size))
        learn_s += time.perf_counter() - start
        rows.append([accuracy(state, t.x_test, t.y_test) for t in tasks])
    R = np.asarray(rows)
    summary = clax_metrics.summarize(R, np.asarray(baseline))

    x_train = _flat(np.concatenate([t.x_train for t in tasks]))
    y_train = np.concatenate([t.y_train for t in tasks])
    x_test = _flat(np.concatenate([t.x_test for t in tasks]))
    y_test = np.concatenate([t.y_test for t in tasks])
    forget = y_train == forget_class
    retain = ~forget

    # 2. Exact unlearning (ACU) and 3. the refit from scratch, timed.
    unlearned, unlearn_times = _timed(
        lambda: rls.unlearn(state, x_train[forget], y_train[forget], batch_size=batch_size),
        repeats)
    refit, refit_times = _timed(lambda: rls.fit(state, x_train[retain], y_train[retain],
                                                chunk_size=4096), repeats)
    w_acu = np.asarray(unlearned.weights, np.float64)
    w_ref = np.asarray(refit.weights, np.float64)
    weights = {
        "max_abs_diff": float(np.abs(w_acu - w_ref).max()),
        "relative_frobenius_diff": float(np.linalg.norm(w_acu - w_ref) / np.linalg.norm(w_ref)),
        "max_abs_weight": float(np.abs(w_ref).max()),
        "forgotten_column_max_abs": float(np.abs(w_acu[:, forget_class]).max()),
        "inverse_max_abs_diff": float(np.abs(np.asarray(unlearned.inverse, np.float64)
                                             - np.asarray(refit.inverse, np.float64)).max()),
        "class_counts_equal": bool(np.array_equal(unlearned.class_counts, refit.class_counts)),
        "test_predictions_identical": float(np.mean(
            np.asarray(rls.predict(unlearned, x_test)).argmax(1)
            == np.asarray(rls.predict(refit, x_test)).argmax(1))),
    }

    # 4. Unlearning metrics (accuracies are fractions in [0, 1]).
    test_forget = y_test == forget_class
    split = UnlearningSplit(
        forget_train=(x_train[forget], y_train[forget]),
        retain_train=(x_train[retain], y_train[retain]),
        forget_test=(x_test[test_forget], y_test[test_forget]),
        retain_test=(x_test[~test_forget], y_test[~test_forget]),
    )

    def metrics_of(s):
        return unlearning_metrics(lambda x: np.asarray(rls.predict(s, x)), split,
                                  batch_size=4096)

    metrics = {"before": metrics_of(state), "acu": metrics_of(unlearned),
               "refit": metrics_of(refit)}
    med = statistics.median
    return {
        "benchmark": benchmark,
        "scenario": scenario.name,
        "features": (f"fixed random ReLU expansion of the raw pixels: ReLU(x P), P ~ "
                     f"U(+-1/sqrt({d_in})) of shape ({d_in}, {buffer_size}), seed {seed}; "
                     "no backbone"),
        "gamma": gamma,
        "dtype": dtype,
        "batch_size": batch_size,
        "forget_class": forget_class,
        "num_forget_train": int(forget.sum()),
        "num_retain_train": int(retain.sum()),
        "learning": {"accuracy_matrix": R.tolist(), "baseline": baseline, **summary,
                     "learn_time_s_all_tasks": learn_s},
        "weights_vs_refit": weights,
        "metrics": metrics,
        "acu_gap_to_refit": reference_gap(metrics["acu"], metrics["refit"]),
        "time_s": {"unlearn_median": med(unlearn_times), "refit_median": med(refit_times),
                   "unlearn": unlearn_times, "refit": refit_times,
                   "refit_over_unlearn": med(refit_times) / med(unlearn_times)},
        "device": device_description(),
        "jax": jax.__version__,
    }


def markdown(summary: dict[str, Any], command: str) -> str:
    """A short report of `summary`."""
    m, w, t = summary["metrics"], summary["weights_vs_refit"], summary["time_s"]
    lines = [
        f"`{command}`",
        "",
        (f"Benchmark {summary['benchmark']} ({summary['scenario']}); features: "
        f"{summary['features']}; γ = {summary['gamma']}, {summary['dtype']}, RLS batches of "
        f"{summary['batch_size']}. Device: {summary['device']}."),
        "",
        (f"Analytic learning of all tasks: ACC {100 * summary['learning']['acc']:.2f}%, "
        f"BWT {100 * summary['learning']['bwt']:+.2f} pp, forgetting "
        f"{100 * summary['learning']['forgetting']:.2f} pp (learn time, all tasks: "
        f"{summary['learning']['learn_time_s_all_tasks']:.2f} s, compilation included)."),
        "",
        (f"Forget class {summary['forget_class']} ({summary['num_forget_train']} training "
        f"examples; {summary['num_retain_train']} retained). Accuracies in %:"),
        "",
        "| model | forget-train | retain-train | forget-test | retain-test | MIA |",
        "|---|---|---|---|---|---|",
    ]
    for name, label in (("before", "before unlearning"), ("acu", "ACU (exact unlearning)"),
                        ("refit", "ridge refit on retained data")):
        r = m[name]
        lines.append(f"| {label} | {100 * r['forget_train_acc']:.2f} | "
                     f"{100 * r['retain_train_acc']:.2f} | {100 * r['forget_test_acc']:.2f} | "
                     f"{100 * r['retain_test_acc']:.2f} | {r['mia']:.3f} |")
    lines += [
        "",
        (f"ACU vs refit: max |ΔW| = {w['max_abs_diff']:.3g} (max |W| = {w['max_abs_weight']:.3g},"
        f" relative Frobenius {w['relative_frobenius_diff']:.3g}), max |ΔR| = "
        f"{w['inverse_max_abs_diff']:.3g}, forgotten column max |W| = "
        f"{w['forgotten_column_max_abs']:.3g}, identical test predictions "
        f"{100 * w['test_predictions_identical']:.2f}%."),
        "",
        (f"Time (median of {len(t['unlearn'])}, compiled): exact unlearning "
        f"{t['unlearn_median']:.3f} s vs refit from scratch {t['refit_median']:.3f} s "
        f"({t['refit_over_unlearn']:.2f}x). Measured on a shared, loaded machine: timing "
        "ratios are indicative only."),
    ]
    return "\n".join(lines) + "\n"


def main(argv):
    del argv
    summary = run(benchmark=FLAGS.benchmark, forget_class=FLAGS.forget_class,
                  buffer_size=FLAGS.buffer_size, gamma=FLAGS.gamma, dtype=FLAGS.dtype,
                  batch_size=FLAGS.batch_size, repeats=FLAGS.repeats, seed=FLAGS.seed)
    command = "python -m experiments.analytic_unlearning " + " ".join(sys.argv[1:])
    summary["command"] = command.strip()
    report = markdown(summary, summary["command"])
    print(report)
    if FLAGS.out:
        write_json(FLAGS.out + ".json", summary)
        with open(FLAGS.out + ".md", "w") as f:
            f.write(report)
        print(f"wrote {FLAGS.out}.md")


if __name__ == "__main__":
    define_flags()
    app.run(main)
