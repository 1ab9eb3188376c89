"""Activation sharding hints: models name their activations' axes, the driver maps them.

A model calls ``constrain(x, ("batch", None, None))`` on an activation; outside a sharded
step (plain ``model(x)``, generation, one device) this returns ``x`` unchanged. The
training step (`clax.training.steps.StepFns`) traces under ``hints(resolve)``, where
`resolve(shape, names)` turns logical names into a ``NamedSharding`` of the run's mesh by
its `ShardingRules` (or None to leave the array alone). Without such hints XLA may keep the
embedding lookup's output in the embedding table's layout (split along ``embed``) and
re-layout every activation between blocks ("involuntary full rematerialization").
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Sequence

import jax

Resolver = Callable[[tuple[int, ...], Sequence[str | None]], jax.sharding.Sharding | None]
_RESOLVER: contextvars.ContextVar[Resolver | None] = contextvars.ContextVar(
    "clax_activation_resolver", default=None)


@contextlib.contextmanager
def hints(resolve: Resolver) -> Iterator[None]:
    """Within the block, `constrain` applies ``resolve(shape, names)``."""
    token = _RESOLVER.set(resolve)
    try:
        yield
    finally:
        _RESOLVER.reset(token)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """``x`` constrained to the sharding its logical axis `names` resolve to (or as is)."""
    resolve = _RESOLVER.get()
    if resolve is None:
        return x
    sharding = resolve(tuple(x.shape), tuple(names))
    return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)
