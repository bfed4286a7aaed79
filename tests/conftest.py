"""Test setup: 8 fake CPU devices (set before JAX initialises), markers, and the GCS emulator fixtures
``gcs_server`` / ``gcs_bucket`` (tests/gcs_emulator.py) for every test module."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from gcs_emulator import gcs_bucket, gcs_server  # noqa: E402,F401  (fixtures, registered by import)
