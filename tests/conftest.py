"""Test setup shared by every test module.

Eight simulated CPU devices must be requested before jax is first imported, so this runs
first (pytest imports conftest.py before any test module). Single-device code still runs
on device 0; sharding tests build meshes over all eight.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# tfds must never reach the network in tests (an offline lookup hangs ~200 s).
os.environ.setdefault("TFDS_DATA_DIR", os.path.join(os.path.dirname(__file__), "_no_tfds_data"))

import jax  # noqa: E402  (after XLA_FLAGS on purpose)

assert jax.device_count() == 8, (
    "tests expect 8 simulated devices; jax was imported before tests/conftest.py set XLA_FLAGS"
)
