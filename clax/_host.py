"""Host copies of device arrays that may span several processes (the one place for it).

Boundary hooks (EWC's Fisher, closed-form heads) and the driver read state back to the
host. On one process ``jax.device_get`` does; on a multi-process run an array split over
other processes' devices is not addressable here, so it is all-gathered first.
"""

from __future__ import annotations

import jax
import numpy as np

from clax.typing import PyTree


def _spans_processes(x) -> bool:
    return isinstance(x, jax.Array) and not x.is_fully_addressable


def to_host(tree: PyTree) -> PyTree:
    """Numpy copies of `tree`'s leaves (PRNG keys stay jax arrays, on one device).

    Fully replicated and process-local arrays are read locally; an array split over other
    processes' devices is all-gathered (``multihost_utils.process_allgather``: a
    collective, so every process must call this with the same tree, as the loop's hooks
    do).
    """
    leaves, treedef = jax.tree.flatten(tree)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        leaves = [multihost_utils.process_allgather(x, tiled=True)
                  if _spans_processes(x) and not x.is_fully_replicated else x
                  for x in leaves]

    def host(x):
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.device_put(x, jax.local_devices()[0])
        return np.asarray(jax.device_get(x))

    return jax.tree.unflatten(treedef, [host(x) for x in leaves])
