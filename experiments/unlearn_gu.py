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
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

from clax.data import load_source
from clax.metrics.unlearning import UnlearningSplit, reference_gap, unlearning_metrics
from clax.models import make_model
from clax.training import ModelFns
from clax.transforms.disentangle import geometric_unlearning_adam
from clax.unlearning import gradient_ascent_loss, npo_loss, retain_loss

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
LOSSES = ("ga", "npo")
RULES = ("plain", "rt", "gu", "gu_k")


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


# ----------------------------------------------------------------------------- data


def load_data(cfg: Config):
    if cfg.dataset == "digits":
        ds = load_source("digits", seed=cfg.seed)
    elif cfg.dataset == "fashion_mnist":
        ds = load_source("idx", root=cfg.data_root, name="fashion_mnist")
    else:
        raise ValueError(f"dataset must be 'fashion_mnist' or 'digits', got {cfg.dataset!r}")
    x, y = ds.x_train, ds.y_train.astype(np.int32)
    if cfg.max_train and cfg.max_train < len(y):
        keep = np.random.default_rng(cfg.seed).permutation(len(y))[: cfg.max_train]
        x, y = x[keep], y[keep]
    return (x, y), (ds.x_test, ds.y_test.astype(np.int32)), ds.num_classes


def make_split(mode: str, train, test, cfg: Config) -> UnlearningSplit:
    """The four sets of an unlearning evaluation for one forget mode."""
    (x, y), (xt, yt) = train, test
    if mode == "class":
        f, ft = y == cfg.forget_class, yt == cfg.forget_class
    elif mode == "random":
        rng = np.random.default_rng(cfg.seed + 1)
        f = np.zeros(len(y), bool)
        f[rng.permutation(len(y))[: max(1, round(cfg.random_fraction * len(y)))]] = True
        ft = np.zeros(len(yt), bool)
        ft[rng.permutation(len(yt))[: len(yt) // 2]] = True
    else:
        raise ValueError(f"mode must be 'class' or 'random', got {mode!r}")
    return UnlearningSplit(forget_train=(x[f], y[f]), retain_train=(x[~f], y[~f]),
                           forget_test=(xt[ft], yt[ft]), retain_test=(xt[~ft], yt[~ft]))


# ----------------------------------------------------------------------------- model


class Classifier:
    """An MLP as pure functions of its parameters (clax ``ModelFns``)."""

    def __init__(self, input_shape, num_classes, widths, seed):
        model = make_model("mlp", input_shape=input_shape, num_classes=num_classes,
                           widths=tuple(widths), seed=seed)
        self.fns, self.init_params, self.model_state = ModelFns.split(model)
        self.logits = jax.jit(self._logits)

    def _logits(self, params, x):
        return self.fns.apply(params, self.model_state, x, None, train=False)[0]

    def predict(self, params, x: np.ndarray, batch: int = 1024) -> np.ndarray:
        """Logits of ``x`` in fixed-size (zero-padded) batches: one compilation."""
        out = []
        for i in range(0, len(x), batch):
            part = np.asarray(x[i:i + batch])
            padded = np.zeros((batch, *part.shape[1:]), part.dtype)
            padded[: len(part)] = part
            out.append(np.asarray(self.logits(params, jnp.asarray(padded)))[: len(part)])
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)

    def predictor(self, params):
        return lambda x: self.predict(params, x)


def train(clf: Classifier, x: np.ndarray, y: np.ndarray, cfg: Config, seed: int):
    """Adam on cross-entropy; returns (params, seconds)."""
    tx = optax.adam(cfg.train_lr)
    params = clf.init_params
    state = tx.init(params)
    n = len(y) // cfg.batch_size * cfg.batch_size
    xd, yd = jnp.asarray(x), jnp.asarray(y)

    @jax.jit
    def epoch(params, state, perm, xd, yd):
        def step(carry, idx):
            params, state = carry
            g = jax.grad(lambda p: retain_loss(clf._logits(p, xd[idx]), yd[idx]))(params)
            u, state = tx.update(g, state, params)
            return (optax.apply_updates(params, u), state), None

        (params, state), _ = jax.lax.scan(step, (params, state),
                                          perm[:n].reshape(-1, cfg.batch_size))
        return params, state

    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    for _ in range(cfg.train_epochs):
        params, state = epoch(params, state, jnp.asarray(rng.permutation(len(y))), xd, yd)
    jax.block_until_ready(params)
    return params, time.perf_counter() - start


# ----------------------------------------------------------------------------- unlearning


def _accuracy(clf, params, x, y):
    return float(np.mean(clf.predict(params, x).argmax(1) == y)) if len(y) else 0.0


def unlearn(clf: Classifier, params, split: UnlearningSplit, variant: str, cfg: Config,
            target: float) -> dict[str, Any]:
    """Runs one variant until forget-train accuracy <= target (or max_steps)."""
    loss_name, _, rule = variant.partition("+")
    rule = rule or "plain"
    if loss_name not in LOSSES or rule not in RULES:
        raise ValueError(f"unknown variant {variant!r}: <{'|'.join(LOSSES)}>[+<rt|gu|gu_k>]")
    data = tuple(jnp.asarray(a) for a in (*split.forget_train, *split.retain_train))

    def forget_loss(p, ref, x, y):
        logits = clf._logits(p, x)
        if loss_name == "ga":
            return gradient_ascent_loss(logits, y)
        return npo_loss(logits, clf._logits(ref, x), y, beta=cfg.npo_beta)

    if rule in ("gu", "gu_k"):
        tx = geometric_unlearning_adam(cfg.unlearn_lr, gamma=cfg.gamma, alpha=cfg.alpha,
                                       subspace="span" if rule == "gu_k" else "mean")
    else:
        tx = optax.chain(optax.scale_by_adam(b1=0.0), optax.scale_by_learning_rate(cfg.unlearn_lr))

    def step(p, state, key, ref, xf, yf, xr, yr):
        kf, kr = jax.random.split(key)
        fi = jax.random.randint(kf, (cfg.unlearn_batch,), 0, xf.shape[0])
        ri = jax.random.randint(kr, (cfg.unlearn_batch,), 0, xr.shape[0])
        g_f = jax.grad(forget_loss)(p, ref, xf[fi], yf[fi])
        g_r = jax.grad(lambda q: retain_loss(clf._logits(q, xr[ri]), yr[ri]))(p)
        if rule == "plain":
            u, state = tx.update(g_f, state, p)
        elif rule == "rt":
            g = jax.tree.map(lambda a, b: cfg.gamma * a + cfg.alpha * b, g_f, g_r)
            u, state = tx.update(g, state, p)
        elif rule == "gu":
            u, state = tx.update(g_f, state, p, retain_grads=g_r)
        else:
            idx = ri[: cfg.gu_k]

            def one(x, y):
                return jax.grad(lambda q: retain_loss(clf._logits(q, x[None]), y[None]))(p)

            per_example = jax.vmap(one)(xr[idx], yr[idx])
            u, state = tx.update(g_f, state, p, retain_grads=per_example)
        return optax.apply_updates(p, u), state

    def chunk(p, state, key, ref, data):
        def body(carry, k):
            return step(*carry, k, ref, *data), None

        (p, state), _ = jax.lax.scan(body, (p, state), jax.random.split(key, cfg.eval_every))
        return p, state

    state = tx.init(params)
    key = jax.random.key(cfg.seed + 7)
    compiled = jax.jit(chunk).lower(params, state, key, params, data).compile()
    p, steps, seconds = params, 0, 0.0
    acc = _accuracy(clf, p, *split.forget_train)
    while acc > target and steps < cfg.max_steps:
        key, sub = jax.random.split(key)
        start = time.perf_counter()
        p, state = compiled(p, state, sub, params, data)
        jax.block_until_ready(p)
        seconds += time.perf_counter() - start
        steps += cfg.eval_every
        acc = _accuracy(clf, p, *split.forget_train)
    return {"params": p, "steps": steps, "reached_target": bool(acc <= target),
            "unlearn_time_s": seconds}


# ----------------------------------------------------------------------------- driver


def run(cfg: Config, log=print) -> dict[str, Any]:
    """Trains, retrains the references and unlearns with every variant; returns the rows."""
    train_set, test_set, num_classes = load_data(cfg)
    clf = Classifier(train_set[0].shape[1:], num_classes, cfg.widths, cfg.seed)
    original, train_s = train(clf, *train_set, cfg, cfg.seed)
    log(f"original model trained in {train_s:.1f}s")
    out: dict[str, Any] = {"config": dataclasses.asdict(cfg), "train_time_s": train_s,
                           "modes": {}}
    for mode in cfg.modes:
        split = make_split(mode, train_set, test_set, cfg)
        before = unlearning_metrics(clf.predictor(original), split, batch_size=1024)
        retrained, retrain_s = train(clf, *split.retain_train, cfg, cfg.seed + 100)
        reference = unlearning_metrics(clf.predictor(retrained), split, batch_size=1024)
        target = reference["forget_train_acc"] + cfg.stop_margin
        log(f"[{mode}] original: {_fmt(before)}")
        log(f"[{mode}] retrained ({retrain_s:.1f}s): {_fmt(reference)}; stop at forget-train "
            f"acc <= {target:.3f}")
        rows = []
        for variant in cfg.variants:
            res = unlearn(clf, original, split, variant, cfg, target)
            m = unlearning_metrics(clf.predictor(res.pop("params")), split, batch_size=1024)
            row = {"variant": variant, **m, **res, **reference_gap(m, reference)}
            rows.append(row)
            log(f"[{mode}] {variant}: {_fmt(m)} steps {res['steps']}"
                f"{'' if res['reached_target'] else ' (target not reached)'} "
                f"{res['unlearn_time_s']:.2f}s")
        out["modes"][mode] = {"original": before, "retrained": reference,
                              "retrain_time_s": retrain_s, "target_forget_train_acc": target,
                              "sizes": {k: len(getattr(split, k)[1])
                                        for k in UnlearningSplit._fields},
                              "rows": rows}
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
