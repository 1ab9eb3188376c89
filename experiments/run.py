r"""Launches a continual-learning run, or a comparison, from a config file.

    python -m experiments.run --config=experiments/configs/digits_compare.py \
        --workdir=/tmp/clax_digits [--config.train.epochs_per_task=3]

A config with a ``compare`` section runs every listed method on every listed benchmark
and prints a markdown results table; otherwise one run is trained. Rerunning with the
same ``--workdir`` resumes from the last checkpoint.
"""

import logging
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and plots.")
flags.mark_flags_as_required(["config", "workdir"])


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
    from clax.training import train_continual
    from experiments.compare import run_comparison

    config = FLAGS.config
    if "compare" in config:
        run_comparison(config, FLAGS.workdir)
        return
    result = train_continual(config, FLAGS.workdir)
    row = {"benchmark": config.scenario.name, "method": config.method.name, **result.summary,
           "train_time_s": result.train_time_s}
    print()
    print(clax_metrics.results_table([row]))


if __name__ == "__main__":
    app.run(main)
