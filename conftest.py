"""Pytest setup for the whole repository (tests/ and the doctests in clax/).

Eight simulated CPU devices must be requested before jax is first imported, and the
doctests import clax modules before tests/conftest.py would run, so this lives at the
root: pytest imports it before collecting anything.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# tfds must never reach the network in tests (an offline lookup hangs ~200 s).
os.environ.setdefault("TFDS_DATA_DIR",
                      os.path.join(os.path.dirname(__file__), "tests", "_no_tfds_data"))
