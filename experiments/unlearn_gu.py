r"""Unlearning with gradient ascent and NPO, with and without geometric disentanglement (GU).

    python -m experiments.unlearn_gu                       # Fashion-MNIST, class + random
    python -m experiments.unlearn_gu --dataset=digits --out_dir=/tmp/gu   # offline, seconds

Protocol (one seed): train an MLP on the whole training set; then, for each forget mode,

* ``class``: forget every training example of class ``--forget_class``; forget-test is
  that class's test examples, retain-test the others;
* ``random``: forget a random ``--random_fraction`` of the training set; the test set is
  split in two random halves (forget-test / retain-test: same distribution);

retrain a reference model from scratch on the retain set (same recipe), and unlearn the
original model with each variant: a forget loss (``ga``: gradient ascent, ``npo``:
Negative Preference Optimization, β = ``--npo_beta``, reference = the original model),
and an update rule:

* ``plain``: the forget gradient only;
* ``rt``: ``γ·g_f + α·g_r`` (forget plus retain gradient, no projection; "GradDiff");
* ``gu``: GU, rank 1 (mean retain-batch gradient), in Adam geometry:
  ``γ·(ĝ_f − proj_{ĝ_r} ĝ_f) + α·ĝ_r`` (:func:`clax.transforms.disentangle`);
* ``gu_k``: GU, rank k: the span of ``--gu_k`` per-example retain gradients.

Every variant uses the optimizer GU assumes: Adam with β1 = 0 (lr ``--unlearn_lr``), one
forget batch and one retain batch per step, and stops as soon as its forget-train
accuracy is at most the retrained reference's plus ``--stop_margin`` (checked every
``--eval_every`` steps, at most ``--max_steps``), so the variants are compared at a similar
forget accuracy. Metrics (:mod:`clax.metrics.unlearning`): accuracy on forget/retain
train/test, entropy MIA, and the gap to the retrained reference. Times are of the
unlearning steps only (compiled beforehand; periodic evaluations excluded). Writes
``<out_dir>/unlearn_gu.json`` and ``.md`` with the command at the top.

Everything runs through the unlearning driver (`clax.training.unlearn`): the original and
the reference are trained by `clax.training.train_continual` (one task holding every
class), each variant is the driver's ``ga`` / ``npo`` unlearner configured by
``experiments/configs/unlearn_gu_fmnist.py:<variant>``, which reproduces one row with
``python -m experiments.unlearn``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Any

import jax
import ml_collections
from absl import app, flags

from clax.metrics.unlearning import reference_gap
from clax.training.unlearn import train_original, unlearn
from experiments.configs.unlearn_gu_fmnist import LOSSES, RULES, apply_variant
from experiments.configs.unlearn_gu_fmnist import get_config as get_gu_config

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
__all__ = ["LOSSES", "RULES", "Config", "markdown", "run", "unlearn_config"]


@dataclasses.dataclass
class Config:
    """Everything one run depends on (the flags, or a test's tiny values)."""

    dataset: str = "fashion_mnist"  # "fashion_mnist" (IDX files) or "digits" (bundled)
    data_root: str = FASHION_MNIST_DIR
    max_train: int = 0  # subsample the training set (0: all)
    widths: tuple[int, ...] = (256, 256)
    train_epochs: int = 10
    train_lr: float = 1e-3
    batch_size: int = 128
    modes: tuple[str, ...] = ("class", "random")
    forget_class: int = 0
    random_fraction: float = 0.1
    variants: tuple[str, ...] = ("ga", "ga+rt", "ga+gu", "ga+gu_k", "npo", "npo+rt", "npo+gu",
                                 "npo+gu_k")
    unlearn_lr: float = 1e-4
    unlearn_batch: int = 128
    max_steps: int = 1000
    eval_every: int = 1
    stop_margin: float = 0.01
    gamma: float = 1.0
    alpha: float = 1.0
    gu_k: int = 16
    npo_beta: float = 0.1
    seed: int = 0


# ----------------------------------------------------------------------------- configs


def unlearn_config(cfg: Config, mode: str, variant: str) -> ml_collections.ConfigDict:
    """The driver's config of one (forget mode, variant) of this experiment."""
    c = get_gu_config(variant)
    c.name = f"unlearn_gu/{mode}/{variant}"
    c.seed = cfg.seed
    if cfg.dataset == "digits":
        c.data.source, c.data.root, c.data.name = "digits", None, None
        if cfg.seed:  # the digits train/test split (seed 0 is the source's default)
            with c.data.unlocked():
                c.data.seed = cfg.seed
    elif cfg.dataset == "fashion_mnist":
        c.data.root = cfg.data_root
    else:
        raise ValueError(f"dataset must be 'fashion_mnist' or 'digits', got {cfg.dataset!r}")
    c.scenario.seed = cfg.seed
    c.scenario.max_train_per_task = cfg.max_train or None
    c.model.mlp.widths = tuple(cfg.widths)
    c.optimizer.learning_rate = cfg.train_lr
    c.train.epochs_per_task = cfg.train_epochs
    c.train.batch_size = cfg.batch_size
    u = c.unlearn
    if mode == "class":
        u.forget, u.forget_classes = "classes", (cfg.forget_class,)
    elif mode == "random":
        # The test set is split in two random halves (forget-test / retain-test).
        u.forget, u.forget_fraction, u.forget_test_fraction = "fraction", cfg.random_fraction, 0.5
        u.forget_seed = cfg.seed
    else:
        raise ValueError(f"mode must be 'class' or 'random', got {mode!r}")
    u.optimizer.learning_rate = cfg.unlearn_lr
    u.batch_size = u.retain_batch_size = cfg.unlearn_batch
    u.steps, u.eval_every, u.target_margin = cfg.max_steps, cfg.eval_every, cfg.stop_margin
    return apply_variant(c, variant, gamma=cfg.gamma, alpha=cfg.alpha, gu_k=cfg.gu_k,
                         npo_beta=cfg.npo_beta)


# ----------------------------------------------------------------------------- driver

_METRICS = ("forget_train_acc", "retain_train_acc", "forget_test_acc", "retain_test_acc", "mia")


def run(cfg: Config, log=print) -> dict[str, Any]:
    """Trains once, then per forget mode retrains the reference and unlearns with every
    variant through `clax.training.unlearn.unlearn`; returns the rows."""
    modes = tuple(cfg.modes)
    if not modes or not cfg.variants:
        raise ValueError("modes and variants must each name at least one entry")
    original = train_original(unlearn_config(cfg, modes[0], cfg.variants[0]))
    train_s = original.train_time_s
    log(f"original model trained in {train_s:.1f}s")
    out: dict[str, Any] = {"config": dataclasses.asdict(cfg), "train_time_s": train_s,
                           "modes": {}}
    for mode in modes:
        reference, rows, res = None, [], None
        for variant in cfg.variants:
            res = unlearn(unlearn_config(cfg, mode, variant), original=original,
                          reference_metrics=reference)
            if reference is None:
                reference, retrain_s = res.reference_metrics, res.times["reference_s"]
                target = res.info["target"]
                log(f"[{mode}] original: {_fmt(res.original_metrics)}")
                log(f"[{mode}] retrained ({retrain_s:.1f}s): {_fmt(reference)}; stop at "
                    f"forget-train acc <= {target:.3f}")
            m = {k: res.metrics[k] for k in _METRICS}
            row = {"variant": variant, **m, "steps": res.steps,
                   "reached_target": bool(res.reached_target),
                   "unlearn_time_s": res.times["unlearn_s"],
                   **reference_gap(m, reference)}
            rows.append(row)
            log(f"[{mode}] {variant}: {_fmt(m)} steps {res.steps}"
                f"{'' if row['reached_target'] else ' (target not reached)'} "
                f"{row['unlearn_time_s']:.2f}s")
        out["modes"][mode] = {"original": {k: res.original_metrics[k] for k in _METRICS},
                              "retrained": {k: reference[k] for k in _METRICS},
                              "retrain_time_s": retrain_s, "target_forget_train_acc": target,
                              "sizes": res.sizes, "rows": rows}
    return out


def _fmt(m):
    return (f"forget train/test {100 * m['forget_train_acc']:.1f}/"
            f"{100 * m['forget_test_acc']:.1f}, retain train/test "
            f"{100 * m['retain_train_acc']:.1f}/{100 * m['retain_test_acc']:.1f}, "
            f"MIA {m['mia']:.3f}")


def markdown(result: dict[str, Any], command: str, device: str) -> str:
    cfg = result["config"]
    lines = [
        "# Unlearning: GA / NPO with and without geometric disentanglement (GU)", "",
        f"Command: `{command}`", "",
        (f"Work: {cfg['dataset']}, MLP {tuple(cfg['widths'])}, trained {cfg['train_epochs']} "
         f"epochs (Adam {cfg['train_lr']}, batch {cfg['batch_size']}); unlearning with Adam "
         f"β1=0 lr {cfg['unlearn_lr']}, batches {cfg['unlearn_batch']}+{cfg['unlearn_batch']}, "
         f"γ={cfg['gamma']}, α={cfg['alpha']}, NPO β={cfg['npo_beta']}, gu_k k={cfg['gu_k']}; "
         f"each variant stops when forget-train acc <= retrained + {cfg['stop_margin']} "
         f"(checked every {cfg['eval_every']} steps, max {cfg['max_steps']}); "
         f"seed {cfg['seed']}."),
        "", (f"Device: {device}; jax {jax.__version__}. Times measured on a shared, loaded "
             "machine: compare them within this table only."), "",
        "Accuracies in %. gap = unlearned − retrained (retain columns: closer to 0 is better).",
    ]
    for mode, res in result["modes"].items():
        lines += ["", f"## forget mode: {mode}", "",
                  (f"Sizes: {res['sizes']}. Stop target: forget-train acc <= "
                   f"{100 * res['target_forget_train_acc']:.1f}%."), "",
                  ("| model | steps | forget train | forget test | retain train | retain test "
                   "| MIA | retain test gap | unlearn time (s) |"),
                  "|---|---|---|---|---|---|---|---|---|"]

        def row(name, m, steps="", gap="", t=""):
            return (f"| {name} | {steps} | {100 * m['forget_train_acc']:.1f} | "
                    f"{100 * m['forget_test_acc']:.1f} | {100 * m['retain_train_acc']:.1f} | "
                    f"{100 * m['retain_test_acc']:.1f} | {m['mia']:.3f} | {gap} | {t} |")

        lines.append(row("original", res["original"]))
        lines.append(row("retrained (reference)", res["retrained"],
                         t=f"{res['retrain_time_s']:.1f} (retrain)"))
        for r in res["rows"]:
            steps = f"{r['steps']}" + ("" if r["reached_target"] else " (max)")
            lines.append(row(r["variant"], r, steps, f"{100 * r['retain_test_acc_gap']:+.1f}",
                             f"{r['unlearn_time_s']:.2f}"))
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- CLI

FLAGS = flags.FLAGS
_DEFAULT = Config()
def define_flags() -> None:
    """Defines the script's flags; called only when run as a script (absl flags are
    global: tests import several scripts, whose --out flags would collide)."""
    flags.DEFINE_enum("dataset", _DEFAULT.dataset, ["fashion_mnist", "digits"], "Data source.")
    flags.DEFINE_string("data_root", _DEFAULT.data_root, "Fashion-MNIST IDX folder.")
    flags.DEFINE_integer("max_train", _DEFAULT.max_train, "Subsample the training set (0: all).")
    flags.DEFINE_list("widths", [str(w) for w in _DEFAULT.widths], "MLP hidden widths.")
    flags.DEFINE_integer("train_epochs", _DEFAULT.train_epochs, "Epochs of (re)training.")
    flags.DEFINE_float("train_lr", _DEFAULT.train_lr, "Adam learning rate of (re)training.")
    flags.DEFINE_integer("batch_size", _DEFAULT.batch_size, "Training batch size.")
    flags.DEFINE_list("modes", list(_DEFAULT.modes), "Forget modes: class, random.")
    flags.DEFINE_integer("forget_class", _DEFAULT.forget_class, "Class to forget (mode class).")
    flags.DEFINE_float("random_fraction", _DEFAULT.random_fraction,
                       "Fraction of the training set to forget (mode random).")
    flags.DEFINE_list("variants", list(_DEFAULT.variants),
                      "Variants: <ga|npo>[+<rt|gu|gu_k>].")
    flags.DEFINE_float("unlearn_lr", _DEFAULT.unlearn_lr, "Unlearning learning rate (Adam β1=0).")
    flags.DEFINE_integer("unlearn_batch", _DEFAULT.unlearn_batch, "Forget and retain batch size.")
    flags.DEFINE_integer("max_steps", _DEFAULT.max_steps, "Maximum unlearning steps.")
    flags.DEFINE_integer("eval_every", _DEFAULT.eval_every, "Steps between stop checks.")
    flags.DEFINE_float("stop_margin", _DEFAULT.stop_margin,
                       "Stop at forget-train acc <= retrained's + this.")
    flags.DEFINE_float("gamma", _DEFAULT.gamma, "Weight of the (projected) forget gradient.")
    flags.DEFINE_float("alpha", _DEFAULT.alpha, "Weight of the retain gradient (rt, gu, gu_k).")
    flags.DEFINE_integer("gu_k", _DEFAULT.gu_k, "Per-example retain gradients (gu_k).")
    flags.DEFINE_float("npo_beta", _DEFAULT.npo_beta, "NPO's β.")
    flags.DEFINE_integer("seed", _DEFAULT.seed, "Seed.")
    flags.DEFINE_string("out_dir", "benchmarks/results", "Where the .md and .json go ('' = none).")
    flags.DEFINE_string("name", "unlearn_gu", "File stem of the outputs.")


def main(argv):
    del argv
    cfg = Config(
        dataset=FLAGS.dataset, data_root=FLAGS.data_root, max_train=FLAGS.max_train,
        widths=tuple(int(w) for w in FLAGS.widths), train_epochs=FLAGS.train_epochs,
        train_lr=FLAGS.train_lr, batch_size=FLAGS.batch_size, modes=tuple(FLAGS.modes),
        forget_class=FLAGS.forget_class, random_fraction=FLAGS.random_fraction,
        variants=tuple(FLAGS.variants), unlearn_lr=FLAGS.unlearn_lr,
        unlearn_batch=FLAGS.unlearn_batch, max_steps=FLAGS.max_steps,
        eval_every=FLAGS.eval_every, stop_margin=FLAGS.stop_margin, gamma=FLAGS.gamma,
        alpha=FLAGS.alpha, gu_k=FLAGS.gu_k, npo_beta=FLAGS.npo_beta, seed=FLAGS.seed,
    )
    from experiments.bench.common import device_description

    result = run(cfg)
    command = " ".join(["python -m experiments.unlearn_gu", *sys.argv[1:]])
    device = device_description()
    table = markdown(result, command, device)
    print("\n" + table)
    if FLAGS.out_dir:
        os.makedirs(FLAGS.out_dir, exist_ok=True)
        stem = os.path.join(FLAGS.out_dir, FLAGS.name)
        with open(stem + ".md", "w") as f:
            f.write(table)
        with open(stem + ".json", "w") as f:
            json.dump({"command": command, "device": device, "jax": jax.__version__, **result},
                      f, indent=2)
        print(f"wrote {stem}.md and {stem}.json")


if __name__ == "__main__":
    define_flags()
    app.run(main)
