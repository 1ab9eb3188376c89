"""Checks the test setup of the repository's root conftest.py.

Single-device code still runs on device 0; sharding tests build meshes over all eight
simulated CPU devices that ../conftest.py requests before jax is imported.
"""

import jax

assert jax.device_count() == 8, (
    "tests expect 8 simulated devices; jax was imported before conftest.py set XLA_FLAGS"
)
