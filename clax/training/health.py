"""The run's numerical health: no checkpoint with a non-finite state, a warning on blow-up.

The loop checks the losses of every chunk of steps (`check_losses`) and the whole train
state (parameters, optimizer state, method memory) before every checkpoint and at every
task end (`check_state`): a non-finite leaf stops the run *before* the save, so the last
checkpoint on disk is always a finite one. The message names the first bad leaf, the
settings most likely responsible (the learning rate and the method's hyperparameters that
differ from their defaults) and how to resume from the last good checkpoint with changed
settings (``--allow_config_change``, recorded with the results).

Parameters that grow by orders of magnitude without overflowing (a learning rate far too
large: weights of 1e35, chance accuracy) do not stop the run but give one warning, kept
with the results (`growth_warning`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from clax import _host
from clax.core import TrainState
from clax.training import config as config_lib

# Parameters this many times larger (in max |θ|) than at the start are "exploding".
GROWTH_FACTOR = 1e4
# ... and a checkpoint within this factor is offered as the one to go back to.
CALM_FACTOR = 10.0
_PARTS = ("params", "opt_state", "memory", "model_state")


class NonFiniteLossError(FloatingPointError):
    """The training loss or the train state became NaN or infinite; nothing bad was saved."""


class NonFiniteStateError(NonFiniteLossError):
    """A leaf of the train state (parameters, optimizer state, memory) became non-finite."""


def _is_float(x: Any) -> bool:
    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)


@jax.jit
def _leaf_health(leaves: list) -> tuple[jax.Array, jax.Array]:
    if not leaves:
        return jnp.zeros((0,), bool), jnp.zeros((0,), jnp.float32)
    finite = jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])
    peak = jnp.stack([jnp.max(jnp.where(jnp.isfinite(x), jnp.abs(x), 0), initial=0)
                      .astype(jnp.float32) for x in leaves])
    return finite, peak


def health(state: TrainState) -> list[tuple[str, bool, float]]:
    """``[(leaf name, all finite, max finite |x|), ...]`` of every float leaf of the state
    (computed where the leaves live; one small transfer)."""
    named = []
    for part in _PARTS:
        for path, x in jax.tree_util.tree_leaves_with_path(getattr(state, part)):
            if _is_float(x):
                named.append((f"state.{part}{jax.tree_util.keystr(path)}", x))
    finite, peak = _host.to_host(_leaf_health([x for _, x in named]))
    return [(name, bool(f), float(p)) for (name, _), f, p in zip(named, finite, peak,
                                                                 strict=True)]


def params_peak(report: list[tuple[str, bool, float]]) -> float:
    """max |θ| over the parameters in a `health` report (finite values)."""
    return max([p for name, _, p in report if name.startswith("state.params")], default=0.0)


def suspects(config: ml_collections.ConfigDict) -> list[str]:
    """The settings to look at first: the learning rate and changed method settings."""
    out = [f"config.optimizer.learning_rate={config.optimizer.learning_rate:g}"]
    name = config.method.name
    defaults = config_lib.default_config().method.get(name)
    section = config.method.get(name)
    if defaults is not None and section is not None:
        for key in sorted(section.keys()):
            value, default = section[key], defaults.get(key)
            if value != default and isinstance(value, (int, float)) \
                    and not isinstance(value, bool):
                out.append(f"config.method.{name}.{key}={value:g} (default {default})")
    return out


def _recovery(config: ml_collections.ConfigDict, ckpt, exploded: dict | None) -> str:
    """Which checkpoint to go back to, and the command-line way to do it."""
    said = f"Suspect settings: {', '.join(suspects(config))}."
    latest = None if ckpt is None else ckpt.latest()
    if latest is None:
        where = "no workdir" if ckpt is None else "no checkpoint was written yet"
        return f"{said} Nothing to resume ({where}): rerun with changed settings."
    good = f"Checkpoint {latest} in {ckpt.directory} is the last finite state"
    if exploded is not None:
        before = exploded.get("checkpoint_before")
        good += (f", but the parameters had exploded by step {exploded['step']}; "
                 + (f"checkpoint {before} is the last with max |θ| within {CALM_FACTOR:g}x "
                    f"of the initial (--resume_from_checkpoint={before} goes back to it)"
                    if before is not None else "no checkpoint predates the growth"))
    keys = ["optimizer.learning_rate"] + [s.split("=")[0][len("config."):]
                                          for s in suspects(config)[1:]]
    return (f"{said} {good}. To resume from the newest checkpoint with changed settings, "
            f"rerun with the new values and --allow_config_change={','.join(keys)} (the "
            "change is recorded in the workdir's config_changes.json and metrics.json); "
            "or use a new --workdir.")


def check_losses(losses: np.ndarray, state: TrainState, config: ml_collections.ConfigDict,
                 task: int, epoch: int, ckpt, exploded: dict | None = None) -> None:
    """Raises `NonFiniteLossError` if any loss of a chunk of steps is NaN or infinite."""
    bad = ~np.isfinite(losses)
    if not bad.any():
        return
    at = int(state.step) - len(losses) + int(np.argmax(bad))
    raise NonFiniteLossError(
        f"{config.name}: loss became {losses[bad][0]} at step {at} (task {task}, epoch "
        f"{epoch}); stopped without saving. " + _recovery(config, ckpt, exploded)
        + " Or check the data.")


def check_state(state: TrainState, config: ml_collections.ConfigDict, where: str, ckpt,
                exploded: dict | None = None) -> list[tuple[str, bool, float]]:
    """Raises `NonFiniteStateError` naming the first non-finite leaf; returns the health.

    `where` says when (e.g. ``"at step 40 (task 1, epoch 0)"``); `exploded` is the
    run's first growth warning (``{"step", "checkpoint_before"}``), if any.
    """
    report = health(state)
    bad = [name for name, finite, _ in report if not finite]
    if bad:
        parts = sorted({name.split("[")[0] for name in bad})
        raise NonFiniteStateError(
            f"{config.name}: {bad[0]} became NaN/inf {where} ({len(bad)} non-finite "
            f"leaves, in {', '.join(parts)}); stopped before saving it. "
            + _recovery(config, ckpt, exploded))
    return report


def calm_before(param_peaks: list[list[float]], initial_peak: float) -> int | None:
    """The newest checkpoint whose max |θ| was within `CALM_FACTOR` of the initial one
    (``param_peaks``: ``[checkpoint, step, max |θ|]`` per save), or None."""
    limit = CALM_FACTOR * max(initial_peak, 1e-2)
    calm = [int(n) for n, _, peak in param_peaks if peak <= limit]
    return calm[-1] if calm else None


def growth_warning(report: list[tuple[str, bool, float]], initial_peak: float,
                   config: ml_collections.ConfigDict, where: str) -> str | None:
    """A warning if the parameters grew `GROWTH_FACTOR` times past their initial size."""
    params = [(name, p) for name, _, p in report if name.startswith("state.params")]
    if not params:
        return None
    name, peak = max(params, key=lambda item: item[1])
    limit = GROWTH_FACTOR * max(initial_peak, 1e-2)
    if peak <= limit:
        return None
    return (f"{config.name}: parameters exploded {where}: max |θ| = {peak:.3g} in {name}, "
            f"{peak / max(initial_peak, 1e-30):.2g} times the initial {initial_peak:.3g}; the "
            f"results are likely meaningless. Suspect settings: {', '.join(suspects(config))}")
