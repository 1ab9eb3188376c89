r"""Launches a continual-learning run, or a comparison, from a config file.

    python -m experiments.run --config=experiments/configs/digits_compare.py \
        --workdir=/tmp/clax_digits [--config.train.epochs_per_task=3]

A config with a ``compare`` section runs every listed method on every listed benchmark
and prints a markdown results table; otherwise one run is trained. Rerunning with the
same ``--workdir`` resumes from the last checkpoint.

Multi-process (multi-host) runs start the same command on every process, with
``--distributed`` (the cluster is detected: Cloud TPU, SLURM, Open MPI, Kubernetes) or
``--coordinator_address=HOST:PORT --num_processes=N --process_id=I``; the mesh spans every
process's devices and the workdir (shared by all) is written by process 0. On SIGTERM
(preemption) a run finishes its chunk of steps, saves a checkpoint and exits with status
143 and the line ``preempted: saved checkpoint N; rerun the same command to resume``.
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
flags.DEFINE_bool("distributed", False, "Multi-process run; detect the cluster (Cloud TPU, "
                  "SLURM, Open MPI, Kubernetes) for the coordinator, process count and id.")
flags.DEFINE_string("coordinator_address", None, "Multi-process run: HOST:PORT of process "
                    "0's coordinator (the same on every process).")
flags.DEFINE_integer("num_processes", None, "Multi-process run: the number of processes.")
flags.DEFINE_list("allow_config_change", [], "Config keys (dotted, comma-separated, e.g. "
                  "optimizer.learning_rate) that may differ from the workdir's config when "
                  "resuming, to recover a diverged run from its last good checkpoint; each "
                  "change is recorded in the workdir (config_changes.json, metrics.json).")
flags.DEFINE_integer("resume_from_checkpoint", None, "Resume from this checkpoint number "
                     "instead of the newest (newer ones are moved to checkpoints.set_aside/, "
                     "kept), e.g. the last one before a divergence.")
flags.DEFINE_integer("process_id", None, "Multi-process run: this process's id, in "
                     "[0, num_processes).")

PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM: the run stopped early and can be resumed
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


def _initialize_distributed() -> None:
    """Starts jax.distributed from the flags, before anything touches a device."""
    explicit = (FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    if not FLAGS.distributed and all(v is None for v in explicit):
        return
    if not FLAGS.distributed and None in explicit:
        sys.exit("error: a multi-process run needs all of --coordinator_address, "
                 "--num_processes and --process_id (or --distributed to detect the cluster)")
    from clax.training import distributed
    try:
        distributed.initialize(*explicit)
    except (ValueError, RuntimeError) as e:
        sys.exit(f"error: {e}")


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
    _initialize_distributed()  # before anything touches a device

    import jax

    from clax import metrics as clax_metrics
    from clax.training import NonFiniteLossError, train_continual
    from clax.training.loop import Preempted
    from clax.training.workdir import WorkdirInUseError
    from experiments.compare import run_comparison

    main_process = jax.process_index() == 0
    if not main_process:  # the others print warnings and errors only
        clax_log.setLevel(logging.WARNING)
    config = FLAGS.config
    try:
        if "compare" in config:
            run_comparison(config, FLAGS.workdir)
            return
        result = train_continual(config, FLAGS.workdir,
                                 allow_config_change=FLAGS.allow_config_change,
                                 resume_from_checkpoint=FLAGS.resume_from_checkpoint)
    except Preempted as e:
        if main_process:
            print(e, flush=True)
        sys.exit(PREEMPTED_EXIT_CODE)
    except (ValueError, TypeError, FileNotFoundError, NonFiniteLossError,
            WorkdirInUseError) as e:
        if FLAGS.traceback:
            raise
        sys.exit(f"error: {e}\n(rerun with --traceback for the full stack)")
    if not main_process:
        return
    row = {"benchmark": config.name, "method": config.method.name, "metric": result.metric,
           **result.summary,
           "train_time_s": result.train_time_s}
    print()
    print(clax_metrics.results_table([row]))



if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
