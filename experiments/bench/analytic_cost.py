r"""Cost of analytic learning (ACIL) and exact unlearning (ACU) versus refitting.

    python -m experiments.bench.analytic_cost [--feature_dim=256] [--buffer_sizes=512,2048] \
        [--num_examples=20000] [--forget=1000] [--batch_size=1024] \
        [--dtypes=float32,float64] [--repeats=3] [--out=benchmarks/results/analytic_cost]

Work: synthetic features (standard normal, ``--feature_dim`` wide, 10 classes), expanded by
a random ReLU buffer layer of each width ``d`` in ``--buffer_sizes`` (ACIL's layout). For
each width and dtype:

* **learn**: :func:`clax.analytic.rls.learn` of ``--num_examples`` rows in RLS batches of
  ``--batch_size``, reported as seconds per 10,000 examples;
* **unlearn**: :func:`clax.analytic.rls.unlearn` of ``--forget`` of the learned rows (the
  public function, with its checks);
* **refit**: :func:`clax.analytic.rls.fit` from scratch on the remaining rows (the
  alternative to exact unlearning), and the max difference of its weights to the
  unlearned ones.

Every timed call is compiled by a warm-up call first and waited for; medians over
``--repeats``. Writes ``<out>.json`` and ``<out>.md`` ('' writes nothing).
"""

from __future__ import annotations

import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from clax.analytic import rls
from experiments.bench.common import device_description, write_json

FLAGS = flags.FLAGS
flags.DEFINE_integer("feature_dim", 256, "Width of the frozen features (e.g. a backbone's).")
flags.DEFINE_list("buffer_sizes", ["512", "2048"], "Widths d of the random ReLU expansion.")
flags.DEFINE_integer("num_examples", 20000, "Examples learned.")
flags.DEFINE_integer("forget", 1000, "Learned examples then unlearned.")
flags.DEFINE_integer("batch_size", 1024, "Rows per RLS update.")
flags.DEFINE_list("dtypes", ["float32", "float64"], "Precisions to time.")
flags.DEFINE_integer("repeats", 3, "Timed repeats (after a warm-up call).")
flags.DEFINE_string("out", "benchmarks/results/analytic_cost",
                    "Output path without extension ('' = write nothing).")

NUM_CLASSES = 10


def _median_time(fn, repeats: int):
    out = jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return out, statistics.median(times)


def measure(*, feature_dim: int, buffer_size: int, num_examples: int, forget: int,
            batch_size: int, dtype: str, repeats: int) -> dict:
    """One row of the table (see the module docstring)."""
    if not 0 < forget < num_examples:
        raise ValueError(f"forget must be in (0, num_examples={num_examples}), got {forget}")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(num_examples, feature_dim)).astype(np.float32)
    y = rng.integers(0, NUM_CLASSES, num_examples).astype(np.int32)
    with jax.enable_x64(dtype == "float64"):
        state = rls.init(feature_dim, NUM_CLASSES, buffer_size=buffer_size,
                         key=jax.random.key(0), dtype=jnp.dtype(dtype))
        learned, learn_s = _median_time(
            lambda: rls.learn(state, x, y, batch_size=batch_size), repeats)
        unlearned, unlearn_s = _median_time(
            lambda: rls.unlearn(learned, x[:forget], y[:forget], batch_size=batch_size),
            repeats)
        refit, refit_s = _median_time(lambda: rls.fit(state, x[forget:], y[forget:]), repeats)
        diff = float(np.abs(np.asarray(unlearned.weights, np.float64)
                            - np.asarray(refit.weights, np.float64)).max())
        scale = float(np.abs(np.asarray(refit.weights, np.float64)).max())
    return {
        "buffer_size": buffer_size, "dtype": dtype,
        "learn_s_per_10k": learn_s * 1e4 / num_examples,
        "unlearn_s": unlearn_s, "refit_s": refit_s, "refit_over_unlearn": refit_s / unlearn_s,
        "max_abs_weight_diff_unlearn_vs_refit": diff, "max_abs_weight": scale,
    }


def main(argv):
    del argv
    rows = []
    for size in [int(s) for s in FLAGS.buffer_sizes]:
        for dtype in FLAGS.dtypes:
            row = measure(feature_dim=FLAGS.feature_dim, buffer_size=size,
                          num_examples=FLAGS.num_examples, forget=FLAGS.forget,
                          batch_size=FLAGS.batch_size, dtype=dtype, repeats=FLAGS.repeats)
            rows.append(row)
            print(f"d={size} {dtype}: learn {row['learn_s_per_10k']:.3f} s / 10k, unlearn "
                  f"{FLAGS.forget}: {row['unlearn_s']:.3f} s, refit {row['refit_s']:.3f} s "
                  f"({row['refit_over_unlearn']:.2f}x), max |ΔW| "
                  f"{row['max_abs_weight_diff_unlearn_vs_refit']:.2g}", flush=True)
    command = ("python -m experiments.bench.analytic_cost " + " ".join(sys.argv[1:])).strip()
    summary = {
        "command": command,
        "work": (f"synthetic N(0,1) features of width {FLAGS.feature_dim}, {NUM_CLASSES} "
                 f"classes, random ReLU buffer of width d, learn {FLAGS.num_examples} rows in "
                 f"RLS batches of {FLAGS.batch_size}; unlearn {FLAGS.forget} of them vs refit "
                 f"from scratch on the other {FLAGS.num_examples - FLAGS.forget}"),
        "device": device_description(),
        "jax": jax.__version__,
        "note": "measured on a shared machine under load from other jobs: ratios indicative",
        "rows": rows,
    }
    lines = [f"`{command}`", "", summary["work"] + ".", (f"Device: {summary['device']}. "
             "Measured under load from other jobs on a shared 2-core machine: timings and "
             "ratios are indicative only."), "",
             ("| d | dtype | learn (s / 10k examples) | exact unlearn (s) | refit (s) | "
             "refit / unlearn | max abs ΔW (max abs W) |"),
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['buffer_size']} | {r['dtype']} | {r['learn_s_per_10k']:.3f} | "
                     f"{r['unlearn_s']:.3f} | {r['refit_s']:.3f} | "
                     f"{r['refit_over_unlearn']:.2f}x | "
                     f"{r['max_abs_weight_diff_unlearn_vs_refit']:.2g} "
                     f"({r['max_abs_weight']:.2g}) |")
    report = "\n".join(lines) + "\n"
    print(report)
    if FLAGS.out:
        write_json(FLAGS.out + ".json", summary)
        with open(FLAGS.out + ".md", "w") as f:
            f.write(report)
        print(f"wrote {FLAGS.out}.md")


if __name__ == "__main__":
    app.run(main)
