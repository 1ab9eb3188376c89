r"""Analytic continual learning of every task, then exact unlearning of one class (ACU).

    python -m experiments.analytic_unlearning [--benchmark=split_fmnist] [--forget_class=0] \
        [--buffer_size=2048] [--gamma=0.1] [--dtype=float64] [--repeats=3] \
        [--out=benchmarks/results/analytic_unlearning]

Features: a **fixed random ReLU expansion of the raw pixels**, ``ReLU(x · P)`` with
``P ~ U(±1/√(H·W·C))`` of width ``--buffer_size`` (ACIL's buffer layer applied to the
pixels; no backbone is trained, so every number is deterministic given the seed).

Everything runs through the unlearning driver (`clax.training.unlearn`) with the recipe of
``experiments/configs/unlearn_acu_fmnist.py``:

1. The tasks of the class-incremental benchmark are learned one after another by the
   continual method ``acil`` (`clax.training.train_continual`) on a model with no hidden
   layer (its features are the pixels; its own head, trained on task 0, is not used):
   recursive least squares (:func:`clax.analytic.rls.learn`, 1024-row batches) at each
   task end; the accuracy matrix after each task gives ACC / BWT / forgetting. With
   ``--dtype=float64`` the method's memory is float64 (:func:`acil_method`).
2. Every training example of ``--forget_class`` is unlearned by the driver's ``acu``
   unlearner: :func:`clax.analytic.rls.unlearn` (the ACU downdate, batches of
   ``--batch_size``), with the checks of the public function (class counts,
   positive-definite downdate).
3. The reference (``reference="closed_form"``): ridge regression refit from scratch on the
   retained training data (:func:`clax.analytic.rls.fit`, one Cholesky solve). The
   unlearned weights are compared with it (max and relative differences of ``W``;
   identical test predictions).
4. Forget / retain accuracy and the membership-inference score come from
   :func:`clax.metrics.unlearning.unlearning_metrics` for the model before unlearning, after
   ACU and after the refit, with the gap of ACU to the refit.
5. Time: median over ``--repeats`` of the exact unlearning versus the refit from scratch,
   both compiled beforehand (a first call), results waited for; both include embedding
   the examples (the identity here). The learning time is the whole ``acil`` run.

Writes ``<out>.json`` and ``<out>.md`` (``--out=''`` writes nothing).
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags

from clax.analytic import rls
from clax.core import Method, make_method
from clax.metrics.unlearning import reference_gap
from clax.training import build_scenario
from clax.training.unlearn import continual_config, unlearn
from experiments.bench.common import device_description, write_json
from experiments.configs.benchmarks import use_benchmark
from experiments.configs.unlearn_acu_fmnist import get_config as get_acu_config

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


_METRICS = ("forget_train_acc", "retain_train_acc", "forget_test_acc", "retain_test_acc", "mia")


def unlearn_config(*, benchmark: str, forget_class: int, buffer_size: int, gamma: float,
                   dtype: str, batch_size: int, repeats: int, seed: int
                   ) -> ml_collections.ConfigDict:
    """The driver's config (``experiments/configs/unlearn_acu_fmnist.py``) for these flags."""
    c = get_acu_config()
    use_benchmark(c, benchmark)
    c.name = f"analytic_unlearning/{benchmark}"
    c.method.acil.gamma = gamma
    c.method.acil.buffer_size = buffer_size
    c.method.acil.buffer_seed = seed
    c.unlearn.acu.batch_size = batch_size
    c.unlearn.forget_classes = (forget_class,)
    c.unlearn.repeats = repeats
    c.unlearn.x64 = dtype == "float64"
    return c


def acil_method(*, gamma: float, buffer_size: int, seed: int, dtype: str) -> Method:
    """``acil`` with its recursive-least-squares memory in `dtype`.

    The registered ``acil`` keeps float32 memory; ACIL (and the exactness checks here)
    computes in float64, so for ``dtype="float64"`` its ``init_memory`` is replaced by the
    same state in float64 (run under ``jax.enable_x64``).
    """
    base = make_method("acil", gamma=gamma, buffer_size=buffer_size, buffer_seed=seed)
    if dtype == "float32":
        return base

    def init_memory(params) -> rls.RLSState:
        d, c = np.shape(params["head"]["kernel"])
        return rls.init(int(d), int(c), gamma=gamma, buffer_size=buffer_size,
                        key=jax.random.key(seed), dtype=jnp.dtype(dtype))

    return dataclasses.replace(base, init_memory=init_memory)


def run(*, benchmark: str = "split_fmnist", forget_class: int = 0, buffer_size: int = 2048,
        gamma: float = 0.1, dtype: str = "float64", batch_size: int = 1024, repeats: int = 3,
        seed: int = 0) -> dict[str, Any]:
    """Runs the experiment through the unlearning driver; returns the summary (see the
    module docstring)."""
    config = unlearn_config(benchmark=benchmark, forget_class=forget_class,
                            buffer_size=buffer_size, gamma=gamma, dtype=dtype,
                            batch_size=batch_size, repeats=repeats, seed=seed)
    scenario = build_scenario(continual_config(config))
    if scenario.kind != "class_incremental":
        raise ValueError(f"benchmark {benchmark!r} is {scenario.kind}; use a class-incremental one")
    if not 0 <= forget_class < scenario.num_classes:
        raise ValueError(f"forget_class must be in [0, {scenario.num_classes}), got {forget_class}")
    with jax.enable_x64(dtype == "float64"):
        res = unlearn(config, scenario=scenario,
                      method=acil_method(gamma=gamma, buffer_size=buffer_size, seed=seed,
                                         dtype=dtype))
        return _summary(res, scenario, benchmark=benchmark, forget_class=forget_class,
                        buffer_size=buffer_size, gamma=gamma, dtype=dtype,
                        batch_size=batch_size, seed=seed)


def _summary(res, scenario, *, benchmark, forget_class, buffer_size, gamma, dtype, batch_size,
             seed) -> dict[str, Any]:
    d_in = int(np.prod(scenario.input_shape))
    learned = res.original
    R, baseline = learned.matrix, learned.baseline
    unlearned, refit = res.state.memory, res.reference.memory
    x_test = _flat(np.concatenate([t.x_test for t in scenario.tasks]))
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
    metrics = {name: {k: m[k] for k in _METRICS} for name, m in (
        ("before", res.original_metrics), ("acu", res.metrics), ("refit", res.reference_metrics))}
    t = res.times
    unlearn_times = t.get("unlearn_repeats_s") or []
    refit_times = t.get("reference_repeats_s") or []
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
        "num_forget_train": res.sizes["forget_train"],
        "num_retain_train": res.sizes["retain_train"],
        "learning": {"accuracy_matrix": R.tolist(), "baseline": baseline.tolist(),
                     **{k: learned.summary[k] for k in ("acc", "bwt", "forgetting")},
                     "learn_time_s_all_tasks": learned.train_time_s},
        "weights_vs_refit": weights,
        "metrics": metrics,
        "acu_gap_to_refit": reference_gap(metrics["acu"], metrics["refit"]),
        "time_s": {"unlearn_median": t["unlearn_s"], "refit_median": t["reference_s"],
                   "unlearn": unlearn_times, "refit": refit_times,
                   "refit_over_unlearn": t["reference_s"] / t["unlearn_s"]},
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
