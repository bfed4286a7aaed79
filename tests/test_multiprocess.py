"""Two processes on localhost, 4 fake CPU devices each, train and evaluate as one 8-device run does.

Checks, for an MLCD run and for a LiT run on the MLCD run's (locked) image tower: per-step losses and the
evaluation during training equal those of one process with 8 devices; both processes checkpoint, and a
second launch resumes both; the evaluation after training (baselines, the trained model's kNN / linear /
zero-shot / retrieval, the pictures) writes the same ``results.json`` rows, once, from process 0. (That each
process reads a disjoint part of every global batch is in tests/test_order.py.)
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import portpicker
import pytest

from mlcd_jax import experiment
from mlcd_jax.config_lib import ConfigError

ROOT = Path(__file__).resolve().parents[1]
STEPS = 6
# Small eval splits, kNN also during training (at steps 3 and 6), the baselines that need no second training.
EVAL = ("--config.eval.train_limit=600", "--config.eval.test_limit=200", "--config.evals.knn.every=3")
MLCD = ("demo.py:digits", "--config.eval.baselines=pixels,teacher,random_init")
LIT = ("lit_demo.py:digits", "--config.evals.retrieval.every=0", "--config.evals.retrieval.limit=100")


def _cmd(config: str, workdir: Path, cache: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "mlcd_jax.main", f"--config={ROOT / 'configs' / config}",
        f"--workdir={workdir}", f"--config.data.cache_dir={cache}", f"--config.num_train_steps={STEPS}",
        "--config.batch_size=32", "--config.log_every_steps=1", "--config.checkpoint_every_steps=3",
        "--config.loss.num_classes=64", "--config.data.cluster.num_clusters=64",
        "--config.loss.top_l=4", "--config.data.cluster.top_l=4", *EVAL, *extra,
    ]


def _env(devices: int) -> dict[str, str]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def _one_process(config: str, workdir: Path, cache: Path, *extra: str) -> str:
    out = subprocess.run(_cmd(config, workdir, cache, *extra), env=_env(8), capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    return out.stdout


def _two_processes(config: str, workdir: Path, cache: Path, *extra: str) -> list[str]:
    port = portpicker.pick_unused_port()
    procs = [
        subprocess.Popen(
            _cmd(config, workdir, cache, f"--coordinator_address=localhost:{port}", "--num_processes=2",
                 f"--process_id={i}", *extra),
            env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]
    return outs


def _metrics(workdir: Path) -> dict[int, dict]:
    rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines() if x]
    merged: dict[int, dict] = {}
    for row in rows:  # a step's training scalars and its evaluation's are separate lines
        merged.setdefault(row["step"], {}).update(row)
    return merged


def _assert_same_training(multi: Path, single: Path) -> None:
    """Losses per step and the evaluation during training (kNN at steps 3 and 6) as one process's."""
    want, got = _metrics(single), _metrics(multi)
    assert sorted(got) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([got[s]["loss"] for s in sorted(want)], [want[s]["loss"] for s in sorted(want)],
                               rtol=1e-4)
    for step in (3, STEPS):
        assert "heldout/knn_top1" in want[step]
        np.testing.assert_allclose(got[step]["heldout/knn_top1"], want[step]["heldout/knn_top1"], atol=1e-3)


def _assert_same_evaluation(config: str, multi: Path, tmp_path: Path, cache: Path, *extra: str) -> list[dict]:
    """The two-process evaluation's results.json equals, within 1e-3, one 8-device process's evaluation
    of the same checkpoint (the two trainings differ in the last float bits, from the order of the
    cross-process sums, and a 6-step model's linear probe moves by a few test images with them)."""
    again = tmp_path / f"{multi.name}_evaluated_by_one"
    shutil.copytree(multi, again)
    _one_process(config, again, cache, *extra, "--config.mode=eval")
    want, got = (json.loads((w / "results.json").read_text()) for w in (again, multi))
    assert [r["model"] for r in got] == [r["model"] for r in want]
    for row_got, row_want in zip(got, want):
        assert set(row_got) == set(row_want), (row_got, row_want)
        for key in set(row_want) - {"model"}:
            assert abs(row_got[key] - row_want[key]) <= 1e-3, (row_want["model"], key, row_got[key], row_want[key])
    return got


@pytest.mark.slow  # ~5 min on 2 cores: MLCD and LiT runs of 6 steps, each evaluated; run by .ci/run
def test_two_processes_train_resume_and_evaluate_as_one(tmp_path):
    cache = tmp_path / "cache"
    single = tmp_path / "single"
    _one_process(*MLCD[:1], single, cache, *MLCD[1:])

    multi = tmp_path / "multi"
    _two_processes(*MLCD[:1], multi, cache, *MLCD[1:], f"--config.stop_after_steps={STEPS // 2}")  # stops at 3
    assert (multi / "checkpoints" / str(STEPS // 2)).exists()
    iter_states = list((multi / "checkpoints" / str(STEPS // 2) / "iter").glob("process_*-of-2.json"))
    assert len(iter_states) == 2, "each process saves its own data-iterator state"
    outs = _two_processes(*MLCD[:1], multi, cache, *MLCD[1:])  # second launch resumes both, then evaluates
    _assert_same_training(multi, single)
    rows = _assert_same_evaluation(MLCD[0], multi, tmp_path, cache, *MLCD[1:])
    assert [r["model"] for r in rows] == ["raw pixels", "teacher (clustering)", "random-init ViT", "MLCD ViT"]
    assert {"knn_top1", "linear_top1"} <= set(rows[-1])
    assert (multi / "patch_pca.png").read_bytes() == (tmp_path / "multi_evaluated_by_one" / "patch_pca.png").read_bytes()
    assert all("MLCD ViT: knn_top1" in out for out in outs), "every process evaluates"
    assert sum("pictures:" in out for out in outs) == 1, "the pictures are written once, by process 0"

    tower = f"--config.loss.image_tower=workdir:{single}"  # the locked tower, restored over both processes
    _one_process(*LIT[:1], tmp_path / "lit_single", cache, *LIT[1:], tower)
    _two_processes(*LIT[:1], tmp_path / "lit_multi", cache, *LIT[1:], tower)
    _assert_same_training(tmp_path / "lit_multi", tmp_path / "lit_single")
    rows = _assert_same_evaluation(LIT[0], tmp_path / "lit_multi", tmp_path, cache, *LIT[1:], tower)
    assert {"knn_top1", "linear_top1", "zero_shot_top1", "i2t_r@1", "t2i_r@1"} <= set(rows[-1]), rows


def test_a_checkpoint_teacher_is_not_read_by_process_zero_alone(tmp_path, monkeypatch):
    """The clustering job runs on process 0 only: with a checkpoint teacher that is one line, not a hang."""
    spec = importlib.util.spec_from_file_location("demo_config", ROOT / "configs" / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    config = demo.get_config("digits")
    config.data.cache_dir = str(tmp_path / "cache")
    config.data.cluster.teacher = f"checkpoint:{tmp_path / 'run'}"
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    with pytest.raises(ConfigError, match=r"cannot be read by process 0 alone; run `python -m mlcd_jax.cluster`"):
        experiment.with_shards(config)
