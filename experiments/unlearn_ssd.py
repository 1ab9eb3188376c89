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
3. Reference: the same network retrained from scratch on the retain set (all training
   examples not of class ``c``), same epochs and settings.
4. Metrics (``clax.metrics.unlearning``): accuracy on forget/retain test and train data,
   and the membership-inference score (balanced logistic regression on the output entropy,
   retain-train vs test, applied to forget-train); gaps to the retrained model.

Times: ``ssd_s`` is the whole SSD edit (both Fisher passes and the dampening) measured on a
second, compiled run; ``ssd_first_s`` includes compilation. ``retrain_s`` is the training
time of the reference (compilation included, like ``train_s`` of the original).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

from clax.data import load_source
from clax.edits import ssd_dampen
from clax.fisher import diagonal_fisher
from clax.metrics.unlearning import UnlearningSplit, reference_gap, unlearning_metrics
from clax.models import make_model
from clax.training import ModelFns, StepFns, TrainArrays, data_mesh, make_method
from clax.training.feed import epoch_index_batches, host_batches

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


def _subsample(x, y, n, seed):
    if not n or n >= len(y):
        return x, y
    idx = np.sort(np.random.default_rng(seed).permutation(len(y))[:n])
    return x[idx], y[idx]


def load_data(s: Settings):
    ds = load_source("digits") if s.data == "digits" else load_source(
        "idx", root=s.root, name=s.data)
    xtr, ytr = _subsample(ds.x_train, ds.y_train, s.train_subsample, s.seed)
    xte, yte = _subsample(ds.x_test, ds.y_test, s.test_subsample, s.seed + 1)
    return xtr, ytr, xte, yte, ds.num_classes


def train(s: Settings, x: np.ndarray, y: np.ndarray, num_classes: int, *, seed: int):
    """Trains a fresh SmallCNN with Adam; returns ``(fns, params, model_state, seconds)``."""
    model = make_model("cnn", input_shape=x.shape[1:], num_classes=num_classes,
                       channels=s.channels, hidden=s.hidden, seed=seed)
    fns, params, model_state = ModelFns.split(model)
    method = make_method("finetune")
    steps = StepFns(fns, method, method.optimizer(optax.adam(s.learning_rate)), data_mesh(1))
    start = time.perf_counter()
    state = steps.init_state(params, model_state, seed)
    data = TrainArrays(x, y, np.zeros(len(y), np.int32))
    # One jitted step per batch (not the loop's on-device `run_chunk`): XLA:CPU runs
    # convolutions inside a while loop an order of magnitude slower.
    for epoch in range(s.epochs):
        idx = epoch_index_batches(len(y), s.batch_size, seed=seed, task_index=0, epoch=epoch)
        for batch in host_batches(data, idx):
            state, _ = steps.train_step(state, steps.shard_batch(batch), np.int32(0))
    jax.block_until_ready(state.params)
    seconds = time.perf_counter() - start
    return fns, state.params, state.model_state, seconds


def make_predict(fns: ModelFns, params, model_state):
    apply = jax.jit(lambda p, ms, x: fns.apply(p, ms, x, None, train=False)[0])
    return lambda x: np.asarray(apply(params, model_state, jnp.asarray(x)))


def ssd_unlearn(s: Settings, fns, params, model_state, x_full, y_full, x_forget, y_forget):
    """SSD's importances (batch-granularity empirical Fisher) and the dampening edit."""
    kw = {"model_state": model_state, "labels": "empirical", "granularity": "batch",
          "normalization": "mean", "batch_size": s.fisher_batch_size}
    fisher_full = diagonal_fisher(fns, params, (x_full, y_full), **kw)
    fisher_forget = diagonal_fisher(fns, params, (x_forget, y_forget), **kw)
    new_params, report = ssd_dampen(params, fisher_full, fisher_forget, alpha=s.alpha,
                                    lam=s.lam)
    jax.block_until_ready(new_params)
    return new_params, report


def _pct(m: dict[str, float]) -> dict[str, float]:
    return {k: round(100 * v, 2) for k, v in m.items()}


def run(s: Settings) -> dict[str, Any]:
    """Trains once, then forgets each class of ``s.forget_classes``; returns the results."""
    xtr, ytr, xte, yte, num_classes = load_data(s)
    fns, params, model_state, train_s = train(s, xtr, ytr, num_classes, seed=s.seed)
    original_predict = make_predict(fns, params, model_state)
    results = {"settings": dataclasses.asdict(s), "train_s": train_s,
               "num_train": len(ytr), "num_test": len(yte), "classes": []}
    for c in s.forget_classes:
        f_tr, f_te = ytr == c, yte == c
        split = UnlearningSplit((xtr[f_tr], ytr[f_tr]), (xtr[~f_tr], ytr[~f_tr]),
                                (xte[f_te], yte[f_te]), (xte[~f_te], yte[~f_te]))
        original = unlearning_metrics(original_predict, split)

        start = time.perf_counter()
        ssd_unlearn(s, fns, params, model_state, xtr, ytr, *split.forget_train)
        ssd_first_s = time.perf_counter() - start
        start = time.perf_counter()
        new_params, report = ssd_unlearn(s, fns, params, model_state, xtr, ytr,
                                         *split.forget_train)
        ssd_s = time.perf_counter() - start
        unlearned = unlearning_metrics(make_predict(fns, new_params, model_state), split)

        r_fns, r_params, r_state, retrain_s = train(s, *split.retain_train, num_classes,
                                                    seed=s.seed)
        retrained = unlearning_metrics(make_predict(r_fns, r_params, r_state), split)
        results["classes"].append({
            "forget_class": int(c),
            "num_forget_train": int(f_tr.sum()),
            "original": _pct(original),
            "ssd": _pct(unlearned),
            "retrain": _pct(retrained),
            "ssd_gap_to_retrain": _pct(reference_gap(unlearned, retrained)),
            "original_gap_to_retrain": _pct(reference_gap(original, retrained)),
            "ssd_s": ssd_s,
            "ssd_first_s": ssd_first_s,
            "retrain_s": retrain_s,
            "dampened": report.dampened,
            "total": report.total,
            "num_dampened": report.num_dampened,
            "num_params": report.num_total,
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
        for name, time_s in (("original", results["train_s"]), ("ssd", r["ssd_s"]),
                             ("retrain", r["retrain_s"])):
            m = r[name]
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
    return "\n".join(lines) + "\n"


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
