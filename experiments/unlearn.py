r"""Launches an unlearning run from a config file: original model, unlearner, metrics.

    python -m experiments.unlearn --config=experiments/configs/unlearn_digits.py \
        --workdir=/tmp/clax_unlearn [--config.unlearn.name=npo --config.unlearn.npo.gu=True]

The driver is `clax.training.unlearn.unlearn`: it trains (or restores) the original model
under ``<workdir>/original``, builds the forget / retain sets, the reference and the
unlearned model, and writes ``unlearn_metrics.json`` and ``unlearn_metrics.md`` to the
workdir. Rerunning with the same ``--workdir`` resumes. Same flags and one-line errors as
``experiments.run`` (``--traceback`` for the stack).
"""

import logging
import sys

from absl import app
from absl import logging as absl_logging

# The launcher conventions of experiments.run: --config (locked), --workdir, --traceback,
# and flag errors explained in one line (a bad --config.a.b lists the valid keys).
from experiments.run import FLAGS, _parse_flags


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    absl_logging.set_verbosity(absl_logging.WARNING)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    clax_log = logging.getLogger("clax")
    clax_log.addHandler(handler)
    clax_log.setLevel(logging.INFO)
    clax_log.propagate = False

    from clax.training import NonFiniteLossError
    from clax.training.unlearn import TABLE_FILE, unlearn

    try:
        unlearn(FLAGS.config, FLAGS.workdir)
    except (ValueError, TypeError, FileNotFoundError, NonFiniteLossError) as e:
        if FLAGS.traceback:
            raise
        sys.exit(f"error: {e}\n(rerun with --traceback for the full stack)")
    with open(f"{FLAGS.workdir}/{TABLE_FILE}") as f:
        print()
        print(f.read())


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
