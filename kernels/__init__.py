"""Pallas kernels for the hot gradient-subspace operations (installed with clax).

Empty for now: the first kernels (projection onto / away from a protected subspace) come
with the gradient-subspace methods. Each kernel module will hold the kernel, a jitted
wrapper with ``interpret`` as a static argument, a ``jax.custom_vjp`` and a plain-``jnp``
reference, tested against each other on CPU in interpret mode.
"""
