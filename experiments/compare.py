"""Compare mode: several methods on several benchmarks, one results table.

A config with a ``compare`` section (``methods`` and ``benchmarks``, comma-separated) and
a ``benchmarks`` section (name -> ``{data, scenario}``) runs every method on every
benchmark into ``WORKDIR/<benchmark>/<method>`` (each resumable on its own), then writes
``WORKDIR/results.md``, ``WORKDIR/results.json`` and ``WORKDIR/comparison.png``.
Method hyperparameters come from ``config.method.<method>`` as in single runs; data and
scenario come only from ``config.benchmarks.<name>``.
"""

from __future__ import annotations

import json
import os
import time

import ml_collections

from clax import metrics as clax_metrics
from clax.core import registered_methods
from clax.training import default_config, distributed, train_continual


def _names(value: str, what: str, valid) -> list[str]:
    names = [n.strip() for n in str(value).split(",") if n.strip()]
    if not names:
        raise ValueError(f"config.compare.{what} is empty; give a comma-separated list")
    unknown = [n for n in names if valid is not None and n not in valid]
    if unknown:
        raise ValueError(
            f"config.compare.{what} names unknown {what} {unknown}; valid choices: "
            f"{', '.join(sorted(valid))}"
        )
    return names


def run_config(config: ml_collections.ConfigDict, benchmark: str, method: str):
    """The single-run config for one (benchmark, method) cell of a comparison."""
    c = ml_collections.ConfigDict(config.to_dict())  # an unlocked deep copy
    del c["compare"], c["benchmarks"]
    c.name = f"{benchmark}/{method}"
    c.data = ml_collections.ConfigDict(config.benchmarks[benchmark].data.to_dict())
    c.scenario = ml_collections.ConfigDict(config.benchmarks[benchmark].scenario.to_dict())
    c.method.name = method
    return c


def _check_no_top_level_data(config: ml_collections.ConfigDict) -> None:
    """Compare mode ignores config.data/config.scenario: refuse edits that would be lost."""
    ref = default_config()
    for section in ("data", "scenario"):
        if config[section].to_dict() != ref[section].to_dict():
            raise ValueError(
                f"in compare mode config.{section} is not used; set it per benchmark under "
                f"config.benchmarks.<name>.{section} (benchmarks: "
                f"{', '.join(sorted(config.benchmarks))})"
            )


def run_comparison(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
    """Runs every (benchmark, method) pair; returns the rows of the results table."""
    _check_no_top_level_data(config)
    benchmarks = _names(config.compare.benchmarks, "benchmarks", set(config.benchmarks))
    methods = _names(config.compare.methods, "methods", set(registered_methods()))
    rows = []
    start = time.perf_counter()
    for bench in benchmarks:
        for method in methods:
            result = train_continual(run_config(config, bench, method),
                                     os.path.join(workdir, bench, method))
            rows.append({"benchmark": bench, "method": method, "metric": result.metric,
                         **result.summary,
                         "train_time_s": result.train_time_s})
    table = clax_metrics.results_table(rows)
    if not distributed.is_main_process():  # every process ran every run; one writes
        return rows
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "results.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(rows, f, indent=2)
    clax_metrics.plot_comparison(rows, os.path.join(workdir, "comparison.png"))
    print(f"\n{config.name}: {len(rows)} runs in {time.perf_counter() - start:.1f}s "
          f"(results in {workdir})\n")
    print(table)
    return rows
