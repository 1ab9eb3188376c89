r"""Full-class unlearning with Selective Synaptic Dampening (SSD), against retraining.

    python -m experiments.unlearn_ssd [--forget_classes=0,6,9] [--epochs=5] \
        [--train_subsample=0] [--out=benchmarks/results/unlearn_ssd.json]

Protocol (Foster et al., AAAI 2024, full-class forgetting; ``clax.edits.ssd``):

1. Train clax's SmallCNN (``make_model("cnn")``: conv 32, conv 64, dense 128, head) on the
   training set (Fashion-MNIST IDX files; ``--data=digits`` for an offline run).
2. For each forget class ``c``: the forget set ``D_f`` is the training examples of class
   ``c``. Importances are SSD's: the empirical Fisher from the squared gradient of each
   batch-mean loss, averaged over batches (``granularity="batch"``), batch size 64, model
   in evaluation mode, on the full training set ``D`` and on ``D_f``; then every parameter
   entry with ``F_f > α·F_D`` is multiplied by ``min(λ·F_D/F_f, 1)`` (λ = 1, α = 10).
3. clax's α search (``clax.edits.ssd_search_alpha``, ``--search_target``, not in the
   paper): from the same two Fishers, the largest α whose edited model has forget-train
   accuracy <= the target (0.01); only forget-train data is evaluated.
4. Reference: the same network retrained from scratch on the retain set (all training
   examples not of class ``c``), same epochs and settings.
5. Metrics (``clax.metrics.unlearning``): accuracy on forget/retain test and train data,
   and the membership-inference score (balanced logistic regression on the output entropy,
   retain-train vs test, applied to forget-train); gaps to the retrained model.

``--sweep_alphas``, ``--sweep_fisher_batch_sizes`` and ``--sweep_example_alphas`` add a
sensitivity table: SSD from the same original model at every (Fisher granularity, batch
size, α), which shows why α = 10 is not a universal setting (see ``clax.edits.ssd``).

Times: ``ssd_s`` is the whole SSD edit (both Fisher passes and the dampening) measured on a
second, compiled run; ``ssd_first_s`` includes compilation. ``search_s`` is the α search
alone (after its Fisher passes). ``retrain_s`` is the training time of the reference
(compilation included, like ``train_s`` of the original).

Steps 1-5 run through the unlearning driver (`clax.training.unlearn`): the original and
the reference are trained by `clax.training.train_continual` (one task holding every
class, host-fed steps), SSD and the α search are the driver's ``ssd`` unlearner configured
by ``experiments/configs/unlearn_ssd_fmnist.py``, which reproduces one class with
``python -m experiments.unlearn``. The sensitivity sweep reuses the driver's original
model and calls the building blocks directly (it caches the Fishers across α values).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags

from clax.core import ModelFns
from clax.edits import ssd_dampen
from clax.fisher import diagonal_fisher
from clax.metrics.unlearning import UnlearningSplit, reference_gap, unlearning_metrics
from clax.training import build_scenario
from clax.training.unlearn import continual_config, forget_sets, train_original, unlearn
from experiments.configs.unlearn_ssd_fmnist import get_config as get_ssd_config

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything one unlearning run depends on (flags map 1:1 onto these fields)."""

    data: str = "fashion_mnist"  # or "digits" (sklearn's 8x8 digits, offline)
    root: str = FASHION_MNIST_DIR
    train_subsample: int = 0  # keep this many training examples (stratified), 0 = all
    test_subsample: int = 0
    forget_classes: tuple[int, ...] = (0,)
    channels: tuple[int, ...] = (32, 64)
    hidden: int = 128
    epochs: int = 5
    batch_size: int = 128
    learning_rate: float = 1e-3  # Adam
    seed: int = 0
    alpha: float = 10.0
    lam: float = 1.0
    fisher_batch_size: int = 64
    # Sensitivity sweep (empty = none): SSD re-applied from the same original model with
    # each α and each Fisher batch size (batch granularity), and with each
    # `sweep_example_alphas` on the exact per-example Fisher.
    sweep_alphas: tuple[float, ...] = ()
    sweep_fisher_batch_sizes: tuple[int, ...] = ()
    sweep_example_alphas: tuple[float, ...] = ()
    # clax's α search (`ssd_search_alpha`): the largest α whose forget-train accuracy is
    # <= this target; < 0 turns it off.
    search_target: float = 0.01


def unlearn_config(s: Settings, forget_class: int, *, search: bool = False
                   ) -> ml_collections.ConfigDict:
    """The driver's config (``experiments/configs/unlearn_ssd_fmnist.py``) for `s`."""
    c = get_ssd_config(f"{forget_class}" + (",search" if search else ""))
    c.name = f"unlearn_ssd/{forget_class}" + ("/search" if search else "")
    c.seed = s.seed
    if s.data == "digits":
        c.data.source, c.data.root, c.data.name = "digits", None, None
    else:
        c.data.root, c.data.name = s.root, s.data
    c.scenario.seed = s.seed
    c.scenario.max_train_per_task = s.train_subsample or None
    c.scenario.max_test_per_task = s.test_subsample or None
    c.model.cnn.channels, c.model.cnn.hidden = tuple(s.channels), s.hidden
    c.optimizer.learning_rate = s.learning_rate
    c.train.epochs_per_task, c.train.batch_size = s.epochs, s.batch_size
    u = c.unlearn
    u.ssd.alpha, u.ssd.lam, u.ssd.fisher_batch_size = s.alpha, s.lam, s.fisher_batch_size
    if search:
        u.ssd.search_target = s.search_target
        u.repeats = 0  # the search's time is its first run (as the α-search row reports)
    return c


def make_predict(fns: ModelFns, params, model_state):
    apply = jax.jit(lambda p, ms, x: fns.apply(p, ms, x, None, train=False)[0])
    return lambda x: np.asarray(apply(params, model_state, jnp.asarray(x)))


def importances(fns, params, model_state, x, y, *, granularity="batch", batch_size=64):
    """SSD's importance: empirical Fisher, mean-normalised, model in evaluation mode."""
    return diagonal_fisher(fns, params, (x, y), model_state=model_state, labels="empirical",
                           granularity=granularity, normalization="mean",
                           batch_size=batch_size)


_METRICS = ("forget_train_acc", "retain_train_acc", "forget_test_acc", "retain_test_acc", "mia")


def _pct(m: dict[str, float]) -> dict[str, float]:
    keep = {*_METRICS, *(f"{k}_gap" for k in _METRICS)}
    return {k: round(100 * v, 2) for k, v in m.items() if k in keep}


def sweep_settings(s: Settings) -> list[tuple[str, int, float]]:
    """``(granularity, fisher batch size, α)`` of every sweep point, in table order."""
    points = [("batch", b, a) for b in s.sweep_fisher_batch_sizes for a in s.sweep_alphas]
    return points + [("example", s.fisher_batch_size, a) for a in s.sweep_example_alphas]


def sensitivity(s: Settings, fns, params, model_state, xtr, ytr, split: UnlearningSplit,
                full_cache: dict) -> list[dict[str, Any]]:
    """SSD from the same original model at every sweep point (λ = ``s.lam``).

    The full-data importance depends only on (granularity, batch size), so it is computed
    once per run (``full_cache``) and shared by all forget classes.
    """
    rows, forget_cache = [], {}
    for granularity, b, alpha in sweep_settings(s):
        key = (granularity, b)
        if key not in full_cache:
            full_cache[key] = importances(fns, params, model_state, xtr, ytr,
                                          granularity=granularity, batch_size=b)
        if key not in forget_cache:
            forget_cache[key] = importances(fns, params, model_state, *split.forget_train,
                                            granularity=granularity, batch_size=b)
        new_params, report = ssd_dampen(params, full_cache[key], forget_cache[key],
                                        alpha=alpha, lam=s.lam)
        m = _pct(unlearning_metrics(make_predict(fns, new_params, model_state), split))
        rows.append({"granularity": granularity, "fisher_batch_size": b, "alpha": alpha,
                     "lam": s.lam, **m, "num_dampened": report.num_dampened,
                     "dampened": report.dampened})
        print(f"  sweep {granularity} B={b} α={alpha:g}: forget test {m['forget_test_acc']:.1f}"
              f" retain test {m['retain_test_acc']:.1f} dampened {report.num_dampened}",
              flush=True)
    return rows


def run(s: Settings) -> dict[str, Any]:
    """Trains once, then forgets each class of ``s.forget_classes`` through the unlearning
    driver (SSD, then the α search, each against the retrained reference)."""
    if not s.forget_classes:
        raise ValueError("forget_classes must name at least one class")
    first = unlearn_config(s, s.forget_classes[0])
    original = train_original(first)
    print(f"trained the original model in {original.train_time_s:.1f} s", flush=True)
    fns, params = original.model, original.state.params
    model_state = original.state.model_state
    scenario = build_scenario(continual_config(first))
    task = scenario.tasks[0]
    results = {"settings": dataclasses.asdict(s), "train_s": original.train_time_s,
               "num_train": len(task.y_train), "num_test": len(task.y_test), "classes": []}
    full_cache: dict = {}
    for c in s.forget_classes:
        config = unlearn_config(s, c)
        res = unlearn(config, scenario=scenario, original=original)
        sets = forget_sets(config.unlearn, scenario)
        split = UnlearningSplit(*((getattr(sets, k).x, getattr(sets, k).y)
                                  for k in UnlearningSplit._fields))
        info = res.info
        searched = None
        if s.search_target >= 0:
            found = unlearn(unlearn_config(s, c, search=True), scenario=scenario,
                            original=original, reference_metrics=res.reference_metrics)
            q = found.info
            searched = {
                "metrics": _pct(found.metrics), "alpha": q["alpha"],
                "reached": q["search"]["reached"], "search_s": q["dampen_s"],
                "trace": [{"alpha": t["alpha"], "forget_train_acc": round(
                    100 * t["forget_train_acc"], 2), "num_dampened": t["num_dampened"]}
                    for t in q["search"]["trace"]],
                "num_dampened": q["num_dampened"], "dampened": q["dampened"],
            }
            print(f"  α search: α = {q['alpha']:g} (reached: {searched['reached']}), forget "
                  f"test {searched['metrics']['forget_test_acc']:.1f}, retain test "
                  f"{searched['metrics']['retain_test_acc']:.1f}, {q['dampen_s']:.1f} s",
                  flush=True)
        original_m, unlearned, retrained = (res.original_metrics, res.metrics,
                                            res.reference_metrics)
        print(f"class {c}: SSD {res.times['unlearn_s']:.1f} s (forget test acc "
              f"{original_m['forget_test_acc']:.3f} -> {unlearned['forget_test_acc']:.3f}), "
              f"retrained in {res.times['reference_s']:.1f} s", flush=True)
        results["classes"].append({
            "forget_class": int(c),
            "num_forget_train": res.sizes["forget_train"],
            "original": _pct(original_m),
            "ssd": _pct(unlearned),
            "retrain": _pct(retrained),
            "ssd_gap_to_retrain": _pct(reference_gap(unlearned, retrained)),
            "original_gap_to_retrain": _pct(reference_gap(original_m, retrained)),
            "ssd_s": res.times["unlearn_s"],
            "ssd_first_s": res.times["unlearn_first_s"],
            "retrain_s": res.times["reference_s"],
            "dampened": info["dampened"],
            "total": info["total"],
            "num_dampened": info["num_dampened"],
            "num_params": info["num_params"],
            "ssd_search": searched,
            "sweep": sensitivity(s, fns, params, model_state, sets.train.x, sets.train.y, split,
                                 full_cache),
        })
    return results


def markdown(results: dict[str, Any], command: str, device: str) -> str:
    s = results["settings"]
    lines = [
        f"`{command}`", "",
        f"SmallCNN (channels {tuple(s['channels'])}, dense {s['hidden']}) on {s['data']} "
        f"({results['num_train']} train / {results['num_test']} test), Adam "
        f"{s['learning_rate']}, batch {s['batch_size']}, {s['epochs']} epochs "
        f"(original trained in {results['train_s']:.1f} s). SSD: α = {s['alpha']}, "
        f"λ = {s['lam']}, batch-granularity empirical Fisher, batch {s['fisher_batch_size']}, "
        "eval mode. Accuracies and MIA in %. Device: " + device + ".", "",
        ("| class | model | forget test | retain test | forget train | retain train | MIA "
         "| time (s) |"),
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results["classes"]:
        rows = [("original", r["original"], results["train_s"]),
                ("ssd", r["ssd"], r["ssd_s"])]
        if r.get("ssd_search"):
            q = r["ssd_search"]
            rows.append((f"ssd, α search → {q['alpha']:g}" + ("" if q["reached"] else
                                                              " (target not reached)"),
                         q["metrics"], r["ssd_s"] + q["search_s"]))
        rows.append(("retrain", r["retrain"], r["retrain_s"]))
        for name, m, time_s in rows:
            lines.append(
                f"| {r['forget_class']} | {name} | {m['forget_test_acc']:.1f} | "
                f"{m['retain_test_acc']:.1f} | {m['forget_train_acc']:.1f} | "
                f"{m['retain_train_acc']:.1f} | {m['mia']:.1f} | {time_s:.2f} |")
    lines += ["", "Entries dampened by SSD per parameter (dampened / total):", "",
              "| class | " + " | ".join(results["classes"][0]["total"]) + " | all |",
              "|---" * (len(results["classes"][0]["total"]) + 2) + "|"]
    for r in results["classes"]:
        cells = [f"{r['dampened'][k]} / {r['total'][k]}" for k in r["total"]]
        lines.append(f"| {r['forget_class']} | " + " | ".join(cells)
                     + f" | {r['num_dampened']} / {r['num_params']} |")
    lines += ["", "SSD time is the compiled (second) run of both Fisher passes and the edit; "
              "with compilation: " + ", ".join(
                  f"class {r['forget_class']} {r['ssd_first_s']:.1f} s"
                  for r in results["classes"]) + "."]
    if any(r.get("ssd_search") for r in results["classes"]):
        lines += ["", "α search (clax's `ssd_search_alpha`, not in the SSD paper): from the "
                  "same Fishers, α is tried from 1000 down and the first whose "
                  "forget-*train* accuracy is <= "
                  f"{100 * s['search_target']:g} % is kept (only forget-train data is "
                  "evaluated); its time adds the search to the SSD time. Trace (α: "
                  "forget-train accuracy %):"]
        for r in results["classes"]:
            trace = ", ".join(f"{t['alpha']:g}: {t['forget_train_acc']:.1f}"
                              for t in r["ssd_search"]["trace"])
            lines.append(f"- class {r['forget_class']}: {trace}")
    if any(r["sweep"] for r in results["classes"]):
        lines += sweep_markdown(results)
    return "\n".join(lines) + "\n"


def sweep_markdown(results: dict[str, Any]) -> list[str]:
    """The sensitivity table: forget/retain test accuracy and dampened fraction per point."""
    classes = results["classes"]
    n = classes[0]["num_params"]
    lines = ["", f"Sensitivity (same original model, λ = {results['settings']['lam']}): "
             "forget test / retain test accuracy (%), and the percentage of parameter "
             "entries dampened, per forget class.", "",
             "| Fisher | batch | α | " + " | ".join(
                 f"class {r['forget_class']}" for r in classes) + " |",
             "|---|---|---|" + "---|" * len(classes)]
    for i, p in enumerate(classes[0]["sweep"]):
        cells = []
        for r in classes:
            q = r["sweep"][i]
            cells.append(f"{q['forget_test_acc']:.1f} / {q['retain_test_acc']:.1f} "
                         f"({100 * q['num_dampened'] / n:.2f} %)")
        lines.append(f"| {p['granularity']} | {p['fisher_batch_size']} | {p['alpha']:g} | "
                     + " | ".join(cells) + " |")
    return lines


# ----------------------------------------------------------------------------- flags

FLAGS = flags.FLAGS
def define_flags() -> None:
    """Defines the script's flags; called only when run as a script (absl flags are
    global: tests import several scripts, whose --out flags would collide)."""
    flags.DEFINE_enum("data", "fashion_mnist", ["fashion_mnist", "digits"], "Dataset.")
    flags.DEFINE_string("root", FASHION_MNIST_DIR, "Folder of the IDX files.")
    flags.DEFINE_integer("train_subsample", 0, "Training examples to keep (0 = all).")
    flags.DEFINE_integer("test_subsample", 0, "Test examples to keep (0 = all).")
    flags.DEFINE_list("forget_classes", ["0"], "Classes to forget, one at a time.")
    flags.DEFINE_integer("epochs", 5, "Training epochs (original and retrained).")
    flags.DEFINE_integer("batch_size", 128, "Training batch size.")
    flags.DEFINE_float("learning_rate", 1e-3, "Adam learning rate.")
    flags.DEFINE_integer("seed", 0, "Seed of initialisation, batch order and subsampling.")
    flags.DEFINE_float("alpha", 10.0, "SSD selection weighting α.")
    flags.DEFINE_float("lam", 1.0, "SSD dampening constant λ.")
    flags.DEFINE_integer("fisher_batch_size", 64, "Batch size of the Fisher passes.")
    flags.DEFINE_list("sweep_alphas", [], "Sensitivity sweep: α values (batch Fisher).")
    flags.DEFINE_list("sweep_fisher_batch_sizes", [],
                      "Sensitivity sweep: Fisher batch sizes (batch Fisher).")
    flags.DEFINE_list("sweep_example_alphas", [],
                      "Sensitivity sweep: α values on the exact per-example Fisher.")
    flags.DEFINE_float("search_target", 0.01,
                       "α search: largest α with forget-train accuracy <= this (< 0: off).")
    flags.DEFINE_string("out", "benchmarks/results/unlearn_ssd.json",
                        "JSON output ('' = none); a .md table is written beside it.")


def main(argv):
    del argv
    from experiments.bench.common import device_description

    s = Settings(
        data=FLAGS.data, root=FLAGS.root, train_subsample=FLAGS.train_subsample,
        test_subsample=FLAGS.test_subsample,
        forget_classes=tuple(int(c) for c in FLAGS.forget_classes), epochs=FLAGS.epochs,
        batch_size=FLAGS.batch_size, learning_rate=FLAGS.learning_rate, seed=FLAGS.seed,
        alpha=FLAGS.alpha, lam=FLAGS.lam, fisher_batch_size=FLAGS.fisher_batch_size,
        sweep_alphas=tuple(float(a) for a in FLAGS.sweep_alphas),
        sweep_fisher_batch_sizes=tuple(int(b) for b in FLAGS.sweep_fisher_batch_sizes),
        sweep_example_alphas=tuple(float(a) for a in FLAGS.sweep_example_alphas),
        search_target=FLAGS.search_target,
    )
    command = "python -m experiments.unlearn_ssd " + " ".join(
        f"--{name}={','.join(map(str, v)) if isinstance(v, tuple) else v}"
        for name, v in dataclasses.asdict(s).items()
        if name not in ("channels", "hidden") and v != getattr(Settings, name))
    results = run(s)
    results["command"] = command.strip()
    results["device"] = device_description()
    md = markdown(results, results["command"], results["device"])
    print(md)
    if FLAGS.out:
        os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
        with open(FLAGS.out, "w") as f:
            json.dump(results, f, indent=2)
        with open(os.path.splitext(FLAGS.out)[0] + ".md", "w") as f:
            f.write(md)
        print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
