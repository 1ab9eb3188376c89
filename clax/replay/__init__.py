"""Rehearsal: device-resident replay buffers and Reptile-style gradient alignment.

Buffers are `BufferState` pytrees updated inside jit (`reservoir_insert`: Vitter's
algorithm R; `balanced_insert`: class- or task-balanced CBRS) and sampled with a JAX key
(`sample`). `reptile` wraps an optimizer with periodic interpolation towards an anchor
(Abbes et al., 2025). The registered methods that use them (``er``, ``derpp``, ``agem``,
``replay_reptile``) live in `clax.methods.replay`.
"""

from clax.replay.buffer import (
    BufferState,
    ReplaySample,
    balanced_insert,
    capacity_of,
    init_buffer,
    last_writer,
    reservoir_draws,
    reservoir_insert,
    row_keys,
    sample,
    stored,
)
from clax.replay.reptile import ReptileState, reptile

__all__ = [
    "BufferState",
    "ReplaySample",
    "ReptileState",
    "balanced_insert",
    "capacity_of",
    "init_buffer",
    "last_writer",
    "reptile",
    "reservoir_draws",
    "reservoir_insert",
    "row_keys",
    "sample",
    "stored",
]
