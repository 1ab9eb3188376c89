"""Device meshes for data-parallel training."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh


def data_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D mesh with axis ``"data"`` over the first `num_devices` local devices.

    Batches are sharded along ``"data"``; parameters and method memory are replicated.
    `None` uses every local device.
    """
    devices = jax.local_devices()
    n = len(devices) if num_devices is None else int(num_devices)
    if not 1 <= n <= len(devices):
        raise ValueError(
            f"num_devices={num_devices} but only {len(devices)} local device(s) are available"
        )
    return Mesh(np.asarray(devices[:n]), ("data",))
