"""The TPU launcher's whole cycle against tests/fake_gcloud.py: a slice of 2 local workers x 4 CPU devices,
on the at-scale chain in miniature (launch/README.md, "At scale").

WebDataset tars of the digits images (img2dataset's layout) -> ``python -m mlcd_jax.cluster`` on
``wds:PATTERN`` -> ArrayRecord shards -> create (queued, then ACTIVE) -> install this checkout into each
worker's fresh venv -> run detached on ``--config.data.shards`` -> logs -> stop (SIGTERM: checkpoint, exit
75 on both workers) -> the spot slice is preempted -> run (deletes and recreates the slice, installs
again, resumes) -> the per-step losses equal an uninterrupted one-process run's -> evaluation (kNN and
linear probe; results.json written by process 0 only) -> delete. Once with a python3.11 on the workers'
PATH, once with only Ubuntu 22.04's python3 (3.10), where the launcher gets 3.11 through uv; the second
cycle skips the evaluation, which does not depend on the interpreter. The shards' path holds a space: the
override naming it must arrive as one argument.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from mlcd_jax.data import augment
from mlcd_jax.data.sources import load_arrays
from test_webdataset import _write_tars

ROOT = Path(__file__).resolve().parents[1]
STEPS = 24
TARS = 3
TRAIN = ["--config.num_train_steps=%d" % STEPS, "--config.batch_size=32", "--config.log_every_steps=1",
         "--config.checkpoint_every_steps=8", "--config.eval.source=", "--config.loss.num_classes=64",
         "--config.loss.top_l=4"]
# Evaluated after training: kNN and a linear probe on a few hundred digits, no baselines or pictures.
EVAL = ["--config.eval.source=digits", "--config.eval.train_limit=400", "--config.eval.test_limit=200",
        "--config.eval.baselines=", "--config.evals.pictures.every=-1"]
SLICE = ["--name", "rehearsal", "--zone", "fake-zone1-a", "--type", "v4-16", "--spot"]


def _losses(workdir: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines() if x]
    return {r["step"]: r["loss"] for r in rows}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """The digits training images as img2dataset's wds tars, clustered by ``python -m mlcd_jax.cluster``
    into ArrayRecord shards shared by the workers (as gs:// would be), in a path with a space."""
    shared = tmp_path_factory.mktemp("shared")
    images, labels = load_arrays("digits", split="train")
    per_tar = -(-len(images) // TARS)
    _write_tars(shared / "tars", [(f"{i // per_tar:05d}", f"{i:06d}", augment.encode_png(image), f"a digit {label}")
                                  for i, (image, label) in enumerate(zip(images, labels))])
    out_dir = shared / "mlcd shards"
    out = subprocess.run([sys.executable, "-m", "mlcd_jax.cluster", f"--config={ROOT}/configs/cluster/default.py",
                          f"--config.source=wds:{shared}/tars/{{00000..{TARS - 1:05d}}}.tar",
                          f"--config.output_dir={out_dir}", "--config.num_clusters=64", "--config.top_l=4",
                          "--config.progress=False"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    assert json.loads(out.stdout)["num_images"] == len(images), out.stdout
    return out_dir


@pytest.fixture(scope="module")
def reference(tmp_path_factory, shards) -> dict[int, float]:
    """Per-step losses of one uninterrupted process with all 8 devices."""
    workdir = tmp_path_factory.mktemp("reference")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    out = subprocess.run([sys.executable, "-m", "mlcd_jax.main", f"--config={ROOT}/configs/demo.py:digits",
                          f"--workdir={workdir}", f"--config.data.shards={shards}", *TRAIN],
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    return _losses(workdir)


class Launcher:
    """launch/tpu_pod.sh with $GCLOUD set to the fake, against one fake slice."""

    def __init__(self, tmp: Path, python: str) -> None:
        self.state = tmp / "gcloud"
        gcloud = tmp / "gcloud.sh"
        gcloud.write_text(f'#!/bin/sh\nexec {sys.executable} {ROOT / "tests" / "fake_gcloud.py"} "$@"\n')
        gcloud.chmod(0o755)
        self.env = {**os.environ, "GCLOUD": str(gcloud), "PYTHON": sys.executable, "MLCD_JAX_POLL_SECONDS": "0.1",
                    "FAKE_GCLOUD_DIR": str(self.state), "FAKE_GCLOUD_PYTHON": python, "FAKE_GCLOUD_WORKERS": "2"}

    def __call__(self, command: str, *args: str, ok: bool = True) -> str:
        out = subprocess.run(["bash", str(ROOT / "launch" / "tpu_pod.sh"), command, *SLICE, *args],
                             env=self.env, capture_output=True, text=True, timeout=600)
        assert (out.returncode == 0) == ok, f"{command}: {out.stdout[-3000:]}\n{out.stderr[-3000:]}"
        return out.stdout + out.stderr

    def gcloud(self, *args: str) -> None:
        subprocess.run([self.env["GCLOUD"], *args], env=self.env, check=True)

    def worker(self, i: int) -> Path:
        return self.state / "nodes" / "rehearsal" / f"worker-{i}"

    def wait(self, done, what: str, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{self('logs')}"
            time.sleep(1)


@pytest.mark.slow
@pytest.mark.parametrize("python", ["3.11", "3.10"])
def test_launcher_cycle_on_a_fake_slice(tmp_path, shards, reference, python):
    launch = Launcher(tmp_path, python)
    workdir = tmp_path / "run"
    evaluated = python == "3.11"
    run = ["--config", "configs/demo.py:digits", "--workdir", str(workdir), "--",
           f"--config.data.shards={shards}", *TRAIN, *(EVAL if evaluated else [])]
    try:
        out = launch("create")
        assert "WAITING_FOR_RESOURCES" in out  # it waited for the queued resource
        qr = json.loads((launch.state / "state.json").read_text())["queued_resources"]["rehearsal"]
        assert qr["args"][qr["args"].index("--runtime-version") + 1] == "tpu-ubuntu2204-base" and "--spot" in qr["args"]
        for i in range(2):
            home = launch.worker(i)
            assert f"rehearsal-w-{i}: mlcd_jax installed in ~/mlcd_jax_venv (Python 3.11" in out
            assert list(home.glob("mlcd_jax_venv/lib/python3.*/site-packages/mlcd_jax/main.py"))
            assert (home / ".local" / "bin" / "uv").exists() == (python == "3.10")
        with tarfile.open(launch.worker(0) / "mlcd_jax_package.tar.gz") as tar:
            shipped = {name.split("/")[1] for name in tar.getnames() if name.count("/")}
        assert shipped == {"setup.py", "README.md", "mlcd_jax", "configs"}, shipped

        launch("run", *run)  # returns at once; the trainers run on, detached
        assert launch("status").count(": training (pid") == 2
        assert launch("run", *run, ok=False).count("is training (pid") == 2  # nothing reinstalled under it
        launch.wait(lambda: (workdir / "metrics.jsonl").exists() and 2 in _losses(workdir), "step 2")
        logs = launch("logs")
        assert "rehearsal-w-0: step " in logs and "rehearsal-w-1: step " in logs

        out = launch("stop")
        assert out.count("trainer exited with status 75") == 2, out
        stopped = max(_losses(workdir))
        assert stopped < STEPS and (workdir / "checkpoints" / str(stopped)).exists()
        assert launch("status").count("stopped with a checkpoint (status 75)") == 2

        launch.gcloud("fake", "preempt", "rehearsal")
        out = launch("run", *run)
        assert "is SUSPENDED (preempted or failed): deleting and recreating it" in out
        launch.wait(lambda: launch("status").count("exited with status 0") == 2, "the resumed run's end")
        got = _losses(workdir)
        assert sorted(got) == list(range(1, STEPS + 1))
        np.testing.assert_allclose([got[s] for s in sorted(reference)], [reference[s] for s in sorted(reference)],
                                   rtol=1e-4)
        resumed = (workdir / "logs" / "rehearsal-w-0.log").read_text().split("stopped by SIGTERM", 1)[1]
        assert f"\nstep {stopped + 1}/{STEPS} " in resumed and f"\nstep {stopped}/" not in resumed
        if evaluated:
            rows = {r["model"]: r for r in json.loads((workdir / "results.json").read_text())}
            assert list(rows) == ["MLCD ViT"] and {"knn_top1", "linear_top1"} <= set(rows["MLCD ViT"]), rows
            logs = [(workdir / "logs" / f"rehearsal-w-{i}.log").read_text() for i in range(2)]
            scores = [re.findall(r"\n  MLCD ViT: knn_top1 .*\n", log) for log in logs]
            assert len(scores[0]) == 1 and scores[0] == scores[1], scores  # both processes evaluated, alike
            assert "evaluating on digits: 400 train / 200 test images" in logs[0]
            assert "\nMLCD ViT  " in logs[0] and "\nMLCD ViT  " not in logs[1]  # process 0 alone wrote results
        else:
            assert not (workdir / "results.json").exists()
    finally:
        launch("delete")
    assert json.loads((launch.state / "state.json").read_text()) == {"queued_resources": {}, "nodes": {}}
    assert not (launch.state / "nodes" / "rehearsal").exists()
