"""Pallas kernels for the hot gradient-subspace operations (installed with clax).

Each kernel module holds the kernel, a jitted wrapper with ``interpret`` as a static
argument, a ``jax.custom_vjp`` and a plain-``jnp`` reference, tested against each other on
CPU in interpret mode.

- :mod:`kernels.projection`: fused ``G − V (Vᵀ G)`` (GPM's gradient projection).
"""

from kernels.projection import project_out_fused, projection_reference

__all__ = ["project_out_fused", "projection_reference"]
