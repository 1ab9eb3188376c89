"""One process of a multi-process run, for tests/training/multiprocess_test.py.

    python -m tests.training._multiprocess_worker PROCESS_ID NUM_PROCESSES PORT OUT CASES

Every process builds the same configs (`case_config`, also used by the test's
one-process reference runs) and the same tiny scenario, joins ``jax.distributed`` at
``localhost:PORT`` (CPU devices, gloo collectives) and trains each comma-separated case of
`CASES` into ``OUT/<case>`` (a workdir shared by the processes). Each process writes
``OUT/<case>.p<ID>.npz``: the metric matrices, the final parameters (gathered to the host)
and how many times it wrote the run's result files. A case ending in ``_preempt`` sends
SIGTERM to process 1 after its first checkpoint, records the checkpoint each process
stopped at (`Preempted`), then reruns the case in the same workdir (a resume).

The parent sets ``XLA_FLAGS=--xla_force_host_platform_device_count=K`` and
``JAX_PLATFORMS=cpu``: each process sees only its own K virtual devices.
"""

from __future__ import annotations

import os
import signal
import sys

import numpy as np

CASES = {
    # name: (method, device_resident, mesh_fsdp, fsdp_min_size, eval_every_steps)
    # ER device-resident on 2 data x 4 fsdp (parameters and replay buffer split), with
    # continual evaluation.
    "er_fsdp": ("er", True, 4, 1, 5),
    # ER on 2 data x 4 fsdp with a checkpoint every step: killed (-9) mid-save, resumed.
    "er_kill": ("er", True, 4, 1, 0),
    # EWC on 1 data x 8 fsdp: every parameter split across both processes, so the
    # task-end Fisher reads state that spans the other process's devices.
    "ewc_fsdp8": ("ewc", True, 8, 1, 0),
    # EWC host-fed, each process feeding its half of every batch; SIGTERM to process 1
    # after its first checkpoint, then a resume.
    "ewc_host_preempt": ("ewc", False, 1, 1024, 0),
}


def case_config(name: str):
    """The config of case `name` (every process, and the reference, build the same)."""
    from tests.training.helpers import tiny_config

    method, device_resident, fsdp, fsdp_min_size, rho = CASES[name]
    c = tiny_config(num_devices=0, device_resident=device_resident, mesh_fsdp=fsdp,
                    fsdp_min_size=fsdp_min_size,
                    checkpoint_every_steps=1 if name.endswith("_kill") else 4,
                    eval_every_steps=rho, eval_subsample=32)
    c.name = f"mp_{name}"
    c.method.name = method
    return c


def scenario():
    from tests.training.helpers import tiny_scenario

    # Equal task sizes: one compilation of each step for both tasks.
    return tiny_scenario(max_train_per_task=224, max_test_per_task=56)


def flat_params(params) -> dict[str, np.ndarray]:
    import jax

    return {jax.tree_util.keystr(path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(params)}


def main(argv: list[str]) -> None:
    pid, nproc, port, out, cases = (int(argv[1]), int(argv[2]), argv[3], argv[4],
                                    argv[5].split(","))
    from clax.training import distributed

    distributed.initialize(f"localhost:{port}", nproc, pid)
    distributed.initialize(f"localhost:{port}", nproc, pid)  # a second call does nothing

    import jax

    import clax.metrics
    from clax.training import checkpoint, train_continual
    from clax.training.loop import Preempted

    assert jax.process_count() == nproc and jax.process_index() == pid
    import logging
    logging.basicConfig(stream=sys.stdout, level=logging.WARNING)
    logging.getLogger("clax").setLevel(logging.INFO)  # "resumed from checkpoint N"
    writes = {"n": 0}
    real_write = clax.metrics.write_run_results

    def counting_write(*args, **kwargs):
        writes["n"] += 1
        return real_write(*args, **kwargs)

    clax.metrics.write_run_results = counting_write
    for name in cases:
        writes["n"] = 0
        workdir = os.path.join(out, name)
        config = case_config(name)
        extra = {}
        if name.endswith("_preempt"):
            real_save = checkpoint.Checkpointer.save
            sent = {"n": 0}

            def save_then_sigterm(self, state, meta, real_save=real_save, sent=sent):
                number = real_save(self, state, meta)
                if pid == 1 and not sent["n"]:
                    sent["n"] = 1
                    os.kill(os.getpid(), signal.SIGTERM)  # a preemption notice to process 1
                return number

            checkpoint.Checkpointer.save = save_then_sigterm
            try:
                train_continual(config, workdir, scenario=scenario())
                raise AssertionError("SIGTERM did not stop the run")
            except Preempted as e:
                extra["preempted_at"] = e.checkpoint
                extra["preempted_message"] = str(e)
            finally:
                checkpoint.Checkpointer.save = real_save
        result = train_continual(config, workdir, scenario=scenario(), keep_state=True)
        params = flat_params(distributed.to_host(result.state.params))
        np.savez(os.path.join(out, f"{name}.p{pid}.npz"),
                 **{f"matrix:{k}": v for k, v in result.matrices.items()},
                 **{f"param:{k}": v for k, v in params.items()},
                 writes=writes["n"], **extra)
    print(f"process {pid}: done {','.join(cases)}", flush=True)


if __name__ == "__main__":
    main(sys.argv)
