r"""Launches a continual-learning run, or a comparison, from a config file.

    python -m experiments.run --config=experiments/configs/digits_compare.py \
        --workdir=/tmp/clax_digits [--config.train.epochs_per_task=3]

A config with a ``compare`` section runs every listed method on every listed benchmark
and prints a markdown results table; otherwise one run is trained. Rerunning with the
same ``--workdir`` resumes from the last checkpoint.
"""

import importlib.util
import logging
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and plots.")
flags.DEFINE_bool("traceback", False, "Show the full traceback of an error, not one line.")
flags.mark_flags_as_required(["config", "workdir"])


def _config_key_error(argv: list[str]) -> str | None:
    """Explains a bad ``--config.a.b=...`` override: the valid keys where the path breaks."""
    path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if path is None:
        return None
    spec = importlib.util.spec_from_file_location("_clax_config", path.split(":", 1)[0])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    for arg in argv:
        if not arg.startswith("--config."):
            continue
        keys = arg[len("--config."):].split("=", 1)[0].split(".")
        node, seen = config, "config"
        for key in keys:
            if not hasattr(node, "keys"):
                break
            if key not in node:
                return (f"unknown config key {seen}.{key} (from {arg!r}); valid keys of "
                        f"{seen}: {', '.join(sorted(node.keys()))}")
            node, seen = node[key], f"{seen}.{key}"
    return None


def _parse_flags(argv: list[str]) -> list[str]:
    try:
        return FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
        msg = None
        try:
            msg = _config_key_error(argv)
        except Exception:  # noqa: BLE001  (fall back to the original message)
            pass
        sys.exit(f"error: {msg or e}")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    # Library chatter (orbax logs every checkpoint at INFO) stays out of the progress output.
    absl_logging.set_verbosity(absl_logging.WARNING)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    clax_log = logging.getLogger("clax")
    clax_log.addHandler(handler)
    clax_log.setLevel(logging.INFO)
    clax_log.propagate = False

    from clax import metrics as clax_metrics
    from clax.training import NonFiniteLossError, train_continual
    from experiments.compare import run_comparison

    config = FLAGS.config
    try:
        if "compare" in config:
            run_comparison(config, FLAGS.workdir)
            return
        result = train_continual(config, FLAGS.workdir)
    except (ValueError, FileNotFoundError, NonFiniteLossError) as e:
        if FLAGS.traceback:
            raise
        sys.exit(f"error: {e}\n(rerun with --traceback for the full stack)")
    row = {"benchmark": config.name, "method": config.method.name, "metric": result.metric,
           **result.summary,
           "train_time_s": result.train_time_s}
    print()
    print(clax_metrics.results_table([row]))


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
