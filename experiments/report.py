r"""A markdown report of one or more runs: task-end and stability-gap tables, figures.

    python -m experiments.report RUN_OR_COMPARE_DIR [MORE_DIRS ...] [--out=PATH] [--title=...]
        [--methods=m1,m2,...] [--figure_methods=all|none|m1,m2,...] [--intro=MARKDOWN]

Each argument is a run workdir (it holds ``metrics.json``) or any folder above run workdirs,
e.g. an ``experiments.run`` comparison workdir (``WORKDIR/<benchmark>/<method>``); every run
directory below it is found (in the order of the comparison's ``results.json`` when there is
one, else sorted by path). The report (default: ``report.md`` in the given folder, or in
the folders' common parent) holds

* the task-end metrics of every run (ACC, BWT, FWT, forgetting, training time),
* the stability-gap metrics of runs with continual evaluation (min-ACC, WC-ACC, WF^w, WP^w;
  ``clax.metrics.stability``) and what the evaluation cost (time, share of training time),
* per benchmark, the per-iteration curves of every method side by side (first task, mean
  over seen tasks, WC-ACC; task boundaries dashed), and each run's accuracy-matrix heatmap
  and per-task curves.

Figures are redrawn from the runs' files into ``<report stem>_figures/`` beside the report,
so the report stays valid when the run folders (with their checkpoints) are deleted, and a
machine-readable ``<report stem>.json`` holds every row.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import app, flags

from clax.metrics import plots, report, stability

FLAGS = flags.FLAGS
flags.DEFINE_string("out", None, "Report path (default: report.md next to the runs).")
flags.DEFINE_string("title", None, "Report title (default: from the folder names).")
flags.DEFINE_string("intro", None, "Markdown put under the title (e.g. how the runs were made).")
flags.DEFINE_list("methods", None, "Only these methods, in this order within each benchmark "
                  "(default: every run found).")
flags.DEFINE_string("figure_methods", "all", "Methods drawn in the figures (tables always list "
                    "every run): 'all', 'none' or a comma-separated list.")


def find_runs(paths: Sequence[str]) -> list[str]:
    """Run directories (holding ``metrics.json``) at or below each path, in order, unique.

    Raises:
      FileNotFoundError: a path does not exist, or holds no run.
    """
    if not paths:
        raise ValueError("give at least one run or comparison directory")
    runs: list[str] = []
    for path in paths:
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{path!r} is not a directory")
        found = []
        for root, dirs, files in os.walk(path):
            dirs[:] = sorted(d for d in dirs if d != "checkpoints")
            if report.METRICS_JSON in files:
                found.append(os.path.normpath(root))
        if not found:
            raise FileNotFoundError(
                f"no run under {path!r}: no {report.METRICS_JSON} (a finished run writes it last)"
            )
        runs += [r for r in _comparison_order(path, found) if r not in runs]
    return runs


def _comparison_order(path: str, found: list[str]) -> list[str]:
    """Runs of a comparison workdir in its results table's order (others after, sorted)."""
    try:
        with open(os.path.join(path, "results.json")) as f:
            rows = json.load(f)
        order = [os.path.normpath(os.path.join(path, r["benchmark"], r["method"])) for r in rows]
    except (OSError, ValueError, KeyError, TypeError):
        return found
    return sorted(found, key=lambda r: (order.index(r) if r in order else len(order), r))


def load_run(run_dir: str) -> dict[str, Any]:
    """One report row: identity, summary metrics, cost, and the arrays for figures."""
    data = report.read_run_results(run_dir)
    extra = data["extra"]
    name = data["name"]
    benchmark = name.rsplit("/", 1)[0] if "/" in name else name
    curves = report.read_run_curves(run_dir)
    row = {
        "benchmark": benchmark,
        "method": extra.get("method") or name.rsplit("/", 1)[-1],
        "run": run_dir,
        **data["summary"],
        "train_time_s": extra.get("train_time_s"),
        "eval_time_s": extra.get("eval_time_s") if curves else None,
        "eval_overhead": extra.get("eval_overhead") if curves else None,
        "eval_every_steps": extra.get("eval_every_steps") if curves else None,
        "eval_subsample": extra.get("eval_subsample") if curves else None,
        "num_evaluations": extra.get("num_evaluations") if curves else None,
    }
    if curves and "min_acc" not in row:  # written before stability metrics existed
        row.update(stability.stability_summary(curves["points"]))
    if curves:
        curves["total_steps"] = extra.get("total_steps") or max(p[0] for p in curves["points"])
    return {"row": row, "R": np.asarray(data["metric_matrix"]), "curves": curves}


def task_progress(steps: np.ndarray, boundaries: Sequence[int], total_steps: int) -> np.ndarray:
    """Steps rescaled so task k spans [k, k + 1] (methods with different task lengths align).

    An evaluation at the last step of task k maps to k + 1.
    """
    starts = np.asarray([0, *boundaries], np.float64)
    ends = np.asarray([*boundaries, total_steps], np.float64)
    k = np.clip(np.searchsorted(np.asarray(boundaries), steps, side="left"), 0, len(starts) - 1)
    return k + (steps - starts[k]) / np.maximum(ends[k] - starts[k], 1)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "run"


def _pct(value: Any, fmt: str = ".1f") -> str | None:
    return None if value is None else f"{100 * value:z{fmt}}"


def _cost_table(rows: list[dict[str, Any]]) -> str:
    table = []
    for r in rows:
        table.append({
            "benchmark": r["benchmark"],
            "method": r["method"],
            "protocol": (f"every {r['eval_every_steps']} steps, "
                         f"{r['eval_subsample'] if (r['eval_subsample'] or 0) > 0 else 'all'} "
                         "test examples per task") if r["eval_every_steps"] else None,
            "evals": r["num_evaluations"],
            "train": None if r["train_time_s"] is None else f"{r['train_time_s']:.1f}",
            "eval": None if r["eval_time_s"] is None else f"{r['eval_time_s']:.1f}",
            "share": _pct(r["eval_overhead"], ".0f"),
        })
    return report.markdown_table(table, [
        ("benchmark", "benchmark"), ("method", "method"),
        ("protocol", "continual evaluation"), ("evals", "evaluations"),
        ("train", "train time (s)"), ("eval", "eval time (s)"),
        ("share", "eval / train time (%)"),
    ])


def _comparison_panels(runs: list[dict[str, Any]], rescale: bool
                       ) -> dict[str, dict[str, tuple]]:
    panels: dict[str, dict[str, tuple]] = {"first task": {}, "mean over seen tasks": {},
                                           "WC-ACC": {}}
    labels = [r["row"]["method"] for r in runs]
    for run, label in zip(runs, labels, strict=False):
        if labels.count(label) > 1:
            label = f"{label} ({os.path.basename(run['row']['run'])})"
        grid = stability.evaluation_grid(run["curves"]["points"])
        tracked = stability.tracking_metrics(grid)
        acc = grid.accuracy
        seen = ~np.isnan(acc)
        mean_seen = np.where(seen, acc, 0.0).sum(1) / np.maximum(seen.sum(1), 1)
        x = grid.steps.astype(np.float64)
        if rescale:
            c = run["curves"]
            x = task_progress(x, c["task_boundaries"], c["total_steps"])
        panels["first task"][label] = (x, acc[:, 0])
        panels["mean over seen tasks"][label] = (x, mean_seen)
        panels["WC-ACC"][label] = (x, tracked["wc_acc"])
    return panels


def build_report(paths: Sequence[str], out: str | None = None, title: str | None = None,
                 command: str | None = None, intro: str | None = None,
                 figure_methods: Sequence[str] | None = None,
                 methods: Sequence[str] | None = None) -> str:
    """Writes the report for the runs under `paths`; returns the report's path.

    Args:
      paths: run directories or folders above them.
      out: the markdown file (default ``report.md`` in the single path, or in the paths'
        common parent); its figures go to ``<stem>_figures/`` and its rows to ``<stem>.json``.
      title: the report's title.
      intro: markdown put under the title.
      figure_methods: methods drawn in the figures (None: all); the tables list every run.
      methods: only these methods, in this order within each benchmark (None: all runs, in
        the order found).
      command: the command line to quote at the top (default: rebuilt from the arguments).
    """
    run_dirs = find_runs(paths)
    if out is None:
        base = paths[0] if len(paths) == 1 else os.path.commonpath(
            [os.path.abspath(p) for p in paths])
        out = os.path.join(base, "report.md")
    out_dir = os.path.dirname(os.path.abspath(out))
    stem = os.path.splitext(os.path.basename(out))[0]
    fig_dir = os.path.join(out_dir, f"{stem}_figures")
    runs = [load_run(d) for d in run_dirs]
    if methods is not None:
        missing = [m for m in methods if m not in {r["row"]["method"] for r in runs}]
        if missing:
            raise ValueError(f"no run of method(s) {missing} under {list(paths)}")
        benches = list(dict.fromkeys(r["row"]["benchmark"] for r in runs))
        runs = sorted((r for r in runs if r["row"]["method"] in methods),
                      key=lambda r: (benches.index(r["row"]["benchmark"]),
                                     list(methods).index(r["row"]["method"])))
    rows = [r["row"] for r in runs]
    title = title or "Results: " + ", ".join(os.path.basename(os.path.normpath(p)) or p
                                             for p in paths)
    command = command or "python -m experiments.report " + " ".join(paths) + f" --out={out}"

    def link(path: str) -> str:
        return os.path.relpath(path, out_dir).replace(os.sep, "/")

    lines = [
        f"# {title}", "",
        *([intro, ""] if intro else []),
        f"Generated by `{command}` from {len(runs)} run(s).", "",
        "## Task-end metrics", "",
        ("ACC is the mean accuracy over all tasks after the last one (full test sets); BWT, "
         "FWT and forgetting are in percentage points."), "",
        report.results_table(rows), "",
    ]
    with_curves = [r for r in runs if r["curves"]]
    if with_curves:
        lines += [
            "## Stability gap (continual evaluation)", "",
            ("Every seen task is evaluated every ρ training steps on a fixed subsample of its "
             "test set (De Lange et al., ICLR 2023). min-ACC: the mean over earlier tasks of "
             "their lowest accuracy after they were learned; WC-ACC: 1/k of the current task's "
             "accuracy plus (1 - 1/k) of min-ACC; WF^w / WP^w: the largest drop / gain within "
             "w consecutive evaluations, task-averaged (– when the run has fewer than w "
             "evaluations). min-ACC far below ACC is the stability gap. All in percent."), "",
            report.stability_table([r["row"] for r in with_curves]), "",
            "Cost of continual evaluation (times include compilation):", "",
            _cost_table([r["row"] for r in with_curves]), "",
        ]
    lines += ["## Figures", ""]
    benchmarks = list(dict.fromkeys(r["benchmark"] for r in rows))
    for bench in benchmarks:
        members = [r for r in runs if r["row"]["benchmark"] == bench and (
            figure_methods is None or r["row"]["method"] in figure_methods)]
        if not members:
            continue
        lines += [f"### {bench}", ""]
        curved = [r for r in members if r["curves"]]
        if curved:
            path = os.path.join(fig_dir, f"{_slug(bench)}__curves.png")
            # Methods whose tasks have different lengths (joint trains on all seen data) are
            # compared on a per-task rescaled axis.
            rescale = len({(tuple(r["curves"]["task_boundaries"]), r["curves"]["total_steps"])
                           for r in curved}) > 1
            num_tasks = max(len(r["R"]) for r in curved)
            plots.plot_curve_comparison(
                _comparison_panels(curved, rescale), path,
                task_boundaries=(range(1, num_tasks) if rescale
                                 else curved[0]["curves"]["task_boundaries"]),
                title=bench,
                xlabel="tasks trained (steps rescaled per task)" if rescale else "training step")
            lines += [f"![{bench}: per-iteration curves]({link(path)})", ""]
        cells_m, cells_c = [], []
        for run in members:
            row = run["row"]
            base = f"{_slug(bench)}__{_slug(row['method'])}"
            if [r["row"]["method"] for r in members].count(row["method"]) > 1:
                base += "__" + _slug(os.path.basename(row["run"]))
            m_path = os.path.join(fig_dir, base + "__matrix.png")
            plots.plot_accuracy_matrix(run["R"], m_path, title=f"{bench} / {row['method']}")
            cells_m.append(f"![{row['method']} accuracy matrix]({link(m_path)})")
            if run["curves"]:
                c_path = os.path.join(fig_dir, base + "__tasks.png")
                plots.plot_accuracy_curves(run["curves"]["points"], c_path,
                                           task_boundaries=run["curves"]["task_boundaries"],
                                           title=f"{bench} / {row['method']}")
                cells_c.append(f"![{row['method']} per-task curves]({link(c_path)})")
            else:
                cells_c.append("(no continual evaluation)")
        lines += [
            "| " + " | ".join(r["row"]["method"] for r in members) + " |",
            "| " + " | ".join("---" for _ in members) + " |",
            "| " + " | ".join(cells_m) + " |",
            "| " + " | ".join(cells_c) + " |", "",
        ]
    text = "\n".join(lines).rstrip("\n") + "\n"
    report.atomic_write_text(out, text)
    report.atomic_write_text(os.path.join(out_dir, f"{stem}.json"),
                             json.dumps(rows, indent=2) + "\n")
    return out


def main(argv):
    paths = argv[1:]
    if not paths:
        raise app.UsageError("give one or more run or comparison directories")
    command = shlex.join(["python", "-m", "experiments.report", *paths]
                         + [f"--{k}={v}" for k, v in (("out", FLAGS.out), ("title", FLAGS.title))
                            if v])
    if FLAGS.methods:
        command += " " + shlex.quote("--methods=" + ",".join(FLAGS.methods))
    if FLAGS.figure_methods != "all":
        command += " " + shlex.quote(f"--figure_methods={FLAGS.figure_methods}")
    if FLAGS.intro:
        command += " --intro=<the paragraph above>"
    figure_methods = (None if FLAGS.figure_methods == "all" else
                      [m.strip() for m in FLAGS.figure_methods.split(",")
                       if m.strip() and FLAGS.figure_methods != "none"])
    try:
        out = build_report(paths, FLAGS.out, FLAGS.title, command=command, intro=FLAGS.intro,
                           figure_methods=figure_methods, methods=FLAGS.methods or None)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    print(f"wrote {out}")
    with open(out) as f:
        text = f.read()
    print(text.split("## Figures")[0])


if __name__ == "__main__":
    app.run(main)
