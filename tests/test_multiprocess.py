"""Two processes on localhost, 4 fake CPU devices each, train as one 8-device run does.

Checks: per-step losses equal those of one process with 8 devices; both processes checkpoint, and a
second launch resumes both. (That each process reads a disjoint part of every global batch is in
tests/test_order.py.)
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import portpicker
import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = 6


def _cmd(workdir: Path, cache: Path, steps: int, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "mlcd_jax.main", f"--config={ROOT / 'configs' / 'demo.py'}:digits",
        f"--workdir={workdir}", f"--config.data.cache_dir={cache}", f"--config.num_train_steps={steps}",
        "--config.batch_size=32", "--config.log_every_steps=1", "--config.checkpoint_every_steps=3",
        "--config.eval.source=", "--config.loss.num_classes=64", "--config.data.cluster.num_clusters=64",
        "--config.loss.top_l=4", "--config.data.cluster.top_l=4", *extra,
    ]


def _env(devices: int) -> dict[str, str]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def _two_processes(workdir: Path, cache: Path, steps: int, *extra: str) -> None:
    port = portpicker.pick_unused_port()
    procs = [
        subprocess.Popen(
            _cmd(workdir, cache, steps, f"--coordinator_address=localhost:{port}", "--num_processes=2",
                 f"--process_id={i}", *extra),
            env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]


def _losses(workdir: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines() if x]
    return {r["step"]: r["loss"] for r in rows}


@pytest.mark.slow
def test_two_processes_match_one_and_resume_together(tmp_path):
    cache = tmp_path / "cache"
    single = tmp_path / "single"
    out = subprocess.run(_cmd(single, cache, STEPS), env=_env(8), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]

    multi = tmp_path / "multi"
    _two_processes(multi, cache, STEPS, f"--config.stop_after_steps={STEPS // 2}")  # stops at step 3
    assert (multi / "checkpoints" / str(STEPS // 2)).exists()
    iter_states = list((multi / "checkpoints" / str(STEPS // 2) / "iter").glob("process_*-of-2.json"))
    assert len(iter_states) == 2, "each process saves its own data-iterator state"
    _two_processes(multi, cache, STEPS)  # second launch resumes both processes from step 3
    want, got = _losses(single), _losses(multi)
    assert sorted(got) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([got[s] for s in sorted(want)], [want[s] for s in sorted(want)], rtol=1e-4)
