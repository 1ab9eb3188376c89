r"""Fault injection: kill -9 runs at random points (also mid-save), corrupt checkpoints,
resume, and check the final metrics are bit-identical to an uninterrupted run.

    python -m experiments.faults --trials=8 --out=benchmarks/results/faults

Each trial starts ``experiments.run`` on a fresh workdir (Split-Digits, EWC, a checkpoint
every step) and, until the run exits 0: waits a random time or until a checkpoint write is
in progress (orbax's temporary folder appears), sends SIGKILL, and with probability
``--corrupt_probability`` damages the newest committed checkpoint (truncated, random or
flipped bytes, a deleted ``state/``), then starts the same command again. A trial is
*identical* when its metrics.json matrices equal the reference run's exactly, and *lost*
otherwise (a failed resume, a different result). Writes ``faults.json`` and ``faults.md``.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORRUPTIONS = ("truncate", "random", "flip", "delete_state")

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command's flags, defined when it runs (no clash with other commands' flags
    when tests import several experiments modules in one process)."""
    flags.DEFINE_integer("trials", 8, "Trials (fresh workdirs).")
    flags.DEFINE_integer("max_kills", 3, "SIGKILLs per trial at most (then it runs to the end).")
    flags.DEFINE_float("corrupt_probability", 0.5, "Chance to corrupt the newest checkpoint "
                       "after a kill.")
    flags.DEFINE_float("mid_save_probability", 0.5, "Chance that a kill waits for a checkpoint "
                       "write in progress (else: a random time).")
    flags.DEFINE_integer("seed", 0, "Seed of the kill times and corruptions.")
    flags.DEFINE_string("out", None, "Folder for faults.json / faults.md (default: print only).")
    flags.DEFINE_integer("epochs_per_task", 2, "Epochs per task of the run under test.")


def corrupt(step_dir: str, kind: str, rng: np.random.Generator | None = None) -> None:
    """Damages checkpoint folder `step_dir` as a disk, a copy or a crash can."""
    rng = rng or np.random.default_rng(0)
    if kind == "delete_state":
        shutil.rmtree(os.path.join(step_dir, "state"))
        return
    if kind == "delete_meta":
        shutil.rmtree(os.path.join(step_dir, "meta"))
        return
    files = [f for f in glob.glob(f"{step_dir}/state/**", recursive=True) if os.path.isfile(f)]
    path = max(files, key=os.path.getsize)  # the array data
    data = bytearray(open(path, "rb").read())
    if kind == "truncate":
        data = data[: len(data) // 2]
    elif kind == "random":
        data = bytearray(rng.integers(0, 256, len(data), np.uint8).tobytes())
    elif kind == "flip":
        data[int(rng.integers(len(data)))] ^= 1 << int(rng.integers(8))
    else:
        raise ValueError(f"unknown corruption {kind!r}; valid: {CORRUPTIONS + ('delete_meta',)}")
    with open(path, "wb") as f:
        f.write(bytes(data))


def _command(workdir: str, epochs: int) -> list[str]:
    return [sys.executable, "-m", "experiments.run",
            "--config=experiments/configs/split_digits.py", f"--workdir={workdir}",
            "--config.method.name=ewc", f"--config.train.epochs_per_task={epochs}",
            "--config.train.checkpoint_every_steps=1"]


def _start(workdir: str, epochs: int, log) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    return subprocess.Popen(_command(workdir, epochs), cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT)


def _committed(ckpts: str) -> list[int]:
    return sorted(int(d) for d in os.listdir(ckpts) if d.isdigit()) if os.path.isdir(
        ckpts) else []


def _saving(ckpts: str) -> bool:
    return os.path.isdir(ckpts) and any("tmp" in d for d in os.listdir(ckpts))


def _matrices(workdir: str):
    with open(os.path.join(workdir, "metrics.json")) as f:
        doc = json.load(f)
    return doc["extra"]["matrices"]


def _kill_during(proc: subprocess.Popen, ckpts: str, rng, mid_save: bool) -> str | None:
    """Waits, then SIGKILLs `proc`; returns when ("mid-save", "random") or None (it ended)."""
    deadline = time.monotonic() + float(rng.uniform(2.5, 8.0))
    while proc.poll() is None:
        if (mid_save and _saving(ckpts) and _committed(ckpts)) or (
                not mid_save and time.monotonic() > deadline):
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return "mid-save" if mid_save else "random"
        if mid_save and time.monotonic() > deadline + 30:
            mid_save = False  # no save seen: fall back to a random time
        time.sleep(0.002 if mid_save else 0.05)
    return None


def run_trials(trials: int, max_kills: int, corrupt_probability: float,
               mid_save_probability: float, seed: int, epochs: int) -> dict:
    rng = np.random.default_rng(seed)
    root = tempfile.mkdtemp(prefix="clax_faults_")
    log_path = os.path.join(root, "runs.log")
    with open(log_path, "w") as log:
        reference = os.path.join(root, "reference")
        start = time.perf_counter()
        proc = _start(reference, epochs, log)
        if proc.wait() != 0:
            raise RuntimeError(f"the reference run failed; see {log_path}")
        ref_s = time.perf_counter() - start
        expected = _matrices(reference)
        rows = []
        for trial in range(trials):
            workdir = os.path.join(root, f"trial{trial}")
            ckpts = os.path.join(workdir, "checkpoints")
            kills, mid_save, corruptions, fallbacks, starts = 0, 0, [], 0, 0
            rc = None
            while rc != 0:
                proc = _start(workdir, epochs, log)
                starts += 1
                if kills < max_kills:
                    how = _kill_during(proc, ckpts, rng, rng.random() < mid_save_probability)
                    if how is not None:
                        kills += 1
                        mid_save += how == "mid-save"
                        committed = _committed(ckpts)
                        if len(committed) > 1 and rng.random() < corrupt_probability:
                            kind = str(rng.choice(CORRUPTIONS))
                            try:
                                corrupt(os.path.join(ckpts, str(committed[-1])), kind, rng)
                                corruptions.append(kind)
                            except FileNotFoundError:  # being deleted (max_to_keep) at the kill
                                pass
                        continue
                rc = proc.wait()
                if rc != 0 and starts > max_kills + 3:
                    break
            identical = rc == 0 and _matrices(workdir) == expected
            if rc == 0:
                with open(os.path.join(workdir, "metrics.json")) as f:
                    fallbacks = len(json.load(f)["extra"].get("recovered", []))
            rows.append({"trial": trial, "kills": kills, "mid_save_kills": mid_save,
                         "corruptions": corruptions, "fallbacks": fallbacks, "rc": rc,
                         "identical": identical})
            print(f"trial {trial}: {kills} kills ({mid_save} mid-save), corrupted "
                  f"{corruptions or 'none'}, {fallbacks} fallbacks -> "
                  f"{'identical' if identical else 'LOST'}", flush=True)
    shutil.rmtree(root)
    return {"trials": trials, "kills": sum(r["kills"] for r in rows),
            "mid_save_kills": sum(r["mid_save_kills"] for r in rows),
            "corruptions": sum(len(r["corruptions"]) for r in rows),
            "fallbacks": sum(r["fallbacks"] for r in rows),
            "identical": sum(r["identical"] for r in rows),
            "lost": sum(not r["identical"] for r in rows),
            "reference_run_s": round(ref_s, 1), "rows": rows,
            "command": " ".join(_command("WORKDIR", epochs)[1:])}


def _markdown(s: dict) -> str:
    lines = ["| trials | kills | of them mid-save | corrupted checkpoints | fallbacks | "
             "identical | lost |", "|---|---|---|---|---|---|---|",
             f"| {s['trials']} | {s['kills']} | {s['mid_save_kills']} | {s['corruptions']} | "
             f"{s['fallbacks']} | {s['identical']} | {s['lost']} |", "",
             "| trial | kills | mid-save | corruptions | fallbacks | result |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['trial']} | {r['kills']} | {r['mid_save_kills']} | "
              f"{', '.join(r['corruptions']) or '-'} | {r['fallbacks']} | "
              f"{'identical' if r['identical'] else 'lost'} |" for r in s["rows"]]
    return "\n".join(lines) + f"\n\nRun under test: `python {s['command']}`\n"


def main(argv):
    del argv
    summary = run_trials(FLAGS.trials, FLAGS.max_kills, FLAGS.corrupt_probability,
                         FLAGS.mid_save_probability, FLAGS.seed, FLAGS.epochs_per_task)
    table = _markdown(summary)
    print(table)
    if FLAGS.out:
        os.makedirs(FLAGS.out, exist_ok=True)
        with open(os.path.join(FLAGS.out, "faults.json"), "w") as f:
            json.dump(summary, f, indent=2)
        with open(os.path.join(FLAGS.out, "faults.md"), "w") as f:
            f.write(table)
    if summary["lost"]:
        sys.exit(1)


if __name__ == "__main__":
    define_flags()
    app.run(main)
