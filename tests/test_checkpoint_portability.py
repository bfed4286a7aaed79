"""Checkpoints do not depend on the device count: with k = 12 prototypes, 8 devices hold 16 rows (4 of
padding) and 4 devices hold 12. A run trained on 8 devices resumes on 4, its prototypes and their
optimizer moments come back row for row in either direction, and ``load_model`` on 4 devices gives
the 8-device features."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from test_train import _checkpoint_steps, _cmd, _env

K, STOP, STEPS = 12, 10, 20

# Run in a subprocess with N fake devices: the prototype-row leaves of checkpoints STOP (8 devices) and
# STEPS (4 devices) restored for N devices, and load_model's features of checkpoint STOP, into OUT.
_INSPECT = """
import sys
import jax, numpy as np
from mlcd_jax import checkpointing, runs, sharding, train
workdir, out = sys.argv[1:3]
config = runs.load_run_config(workdir)
setup = train.TrainSetup.create(config, sharding.make_mesh(dict(config.mesh)), config.num_train_steps)
manager = checkpointing.create_manager(workdir, keep=10, async_save=False)
arrays = {}
for step in (%(stop)d, %(steps)d):
    state, _ = checkpointing.restore(manager, setup.abstract_state, step=step, num_classes=setup.num_classes)
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
        if "proto" in jax.tree_util.keystr(path) and leaf.ndim == 2:
            arrays[f"{step}{jax.tree_util.keystr(path)}"] = np.asarray(leaf)
size = config.data.image_size
images = np.random.default_rng(0).normal(size=(8, size, size, 3)).astype(np.float32)
arrays["features"] = np.asarray(runs.load_model(workdir, step=%(stop)d)(images, deterministic=True)[0])
np.savez(out, **arrays)
""" % {"stop": STOP, "steps": STEPS}


def _devices(n: int) -> dict[str, str]:
    return {**_env(), "XLA_FLAGS": f"--xla_force_host_platform_device_count={n}"}


def _run(args: list[str], devices: int, cwd: Path) -> str:
    out = subprocess.run(args, env=_devices(devices), cwd=cwd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


@pytest.fixture(scope="module")
def run_8_then_4(tmp_path_factory):
    """A workdir trained to STOP on 8 devices, then resumed to STEPS on 4."""
    base = tmp_path_factory.mktemp("portable")
    workdir = base / "run"
    train = _cmd(workdir, base / "cache", f"--config.num_train_steps={STEPS}", f"--config.checkpoint_every_steps={STOP}",
                 f"--config.loss.num_classes={K}", f"--config.data.cluster.num_clusters={K}")
    first = _run([*train, f"--config.stop_after_steps={STOP}"], 8, base)
    assert "prototypes 16 x" in first  # padded for 8 devices
    second = _run(train, 4, base)
    assert f"prototypes {K} x" in second
    return base, workdir


def test_a_run_trained_on_8_devices_resumes_on_4(run_8_then_4):
    _, workdir = run_8_then_4
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines() if line]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert all(np.isfinite(r["loss"]) and np.isfinite(r["grad_norm"]) for r in rows)
    assert _checkpoint_steps(workdir) == [STOP, STEPS]


def test_prototypes_and_features_are_the_same_on_8_and_4_devices(run_8_then_4):
    base, workdir = run_8_then_4
    got = {}
    for n in (8, 4):
        _run([sys.executable, "-c", _INSPECT, str(workdir), str(base / f"inspect{n}.npz")], n, base)
        got[n] = dict(np.load(base / f"inspect{n}.npz"))
    assert sorted(got[8]) == sorted(got[4]) and len(got[8]) >= 2 * 3 + 1  # matrix and 2 moments per step
    for name, on_4 in got[4].items():
        on_8 = got[8][name]
        if name == "features":
            np.testing.assert_allclose(on_4, on_8, rtol=1e-5, atol=1e-5)
            continue
        assert on_4.shape[0] == K and on_8.shape[0] == 16, name
        np.testing.assert_array_equal(on_4, on_8[:K], err_msg=name)
        if name.startswith(str(STEPS)):  # saved with 12 rows, read on 8 devices: zero padding
            assert not on_8[K:].any(), name
