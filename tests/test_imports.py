"""Importing a library module starts no JAX backend. A backend started at import time fixes the device set
before a program can ask for another (``XLA_FLAGS``' fake devices, ``jax.distributed.initialize``), so a
module-level ``jnp.asarray`` silently changes how a run shards and what it computes (2026-12-07: the demo's
losses moved when ``data/augment.py`` held a jnp constant)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import importlib, pkgutil, sys
from absl import flags
import mlcd_jax
skipped = []
for info in pkgutil.walk_packages(mlcd_jax.__path__, "mlcd_jax."):
    if info.name.endswith("__main__"):
        continue
    try:
        importlib.import_module(info.name)
    except flags.DuplicateFlagError:  # two entry points define the same absl flag: both imported is enough
        pass
    except ImportError as err:  # an optional dependency
        skipped.append(f"{info.name}: {err}")
from jax._src import xla_bridge
print("backends:", sorted(xla_bridge._backends), "skipped:", skipped)
"""


def test_importing_every_module_starts_no_jax_backend():
    done = subprocess.run([sys.executable, "-c", CHILD], cwd=ROOT, capture_output=True, text=True, check=True)
    line = done.stdout.strip().splitlines()[-1]
    assert line.startswith("backends: []"), line
