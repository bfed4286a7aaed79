"""A gs:// workdir, on the GCS emulator (tests/gcs_emulator.py): training, resume, evaluation outputs,
TensorBoard events and loading all go to the bucket, and metrics.jsonl reads as the same run as a
local workdir's."""

import json
import subprocess
from pathlib import Path

import jax
import numpy as np
import pytest
from etils import epath

from test_train import _checkpoint_steps, _cmd, _env

STEPS, STOP = 8, 4  # the gs:// run stops at STOP (with a checkpoint), then a second launch resumes to STEPS
TIMING_KEYS = {"step_time_s", "images_per_s", "data_wait_frac", "flops_per_s", "mfu"}  # differ run to run


def _train(workdir: str | Path, cache: Path, cwd: Path, *overrides: str) -> None:
    cmd = _cmd(workdir, cache, f"--config.num_train_steps={STEPS}", f"--config.checkpoint_every_steps={STOP}",
               *overrides)
    # The three launches compile the same programs once: the run's compilation cache (conftest.py).
    out = subprocess.run(cmd, env=_env(), cwd=cwd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]


def _rows(path: epath.Path) -> dict[int, dict]:
    """metrics.jsonl by step, without the timing keys; it must read as one run."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line]
    steps = [r["step"] for r in rows]
    assert steps == sorted(set(steps)), f"{path} has repeated or unordered steps {steps}"
    return {r["step"]: {k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows}


@pytest.mark.slow  # ~90 s on 2 cores: a training stopped, resumed and evaluated on the GCS emulator
def test_gs_workdir_trains_resumes_evaluates_and_loads(gcs_bucket, tmp_path):
    from mlcd_jax import runs

    cache, local = tmp_path / "cache", tmp_path / "local"
    _train(local, cache, tmp_path)  # the reference run (and the clustering cache both runs share)

    workdir = f"{gcs_bucket}/run"
    run = epath.Path(workdir)
    _train(workdir, cache, tmp_path, f"--config.stop_after_steps={STOP}")
    assert _checkpoint_steps(run) == [STOP]
    assert sorted(_rows(run / "metrics.jsonl")) == list(range(1, STOP + 1))

    _train(workdir, cache, tmp_path, "--config.eval.source=digits", "--config.evals.linear.every=-1",
           "--config.eval.baselines=pixels", "--config.eval.train_limit=500", "--config.eval.test_limit=200")
    assert _checkpoint_steps(run) == [STOP, STEPS]
    want, got = _rows(local / "metrics.jsonl"), _rows(run / "metrics.jsonl")
    assert sorted(got) == list(range(1, STEPS + 1)) and sorted(want) == sorted(got)
    for step in want:
        assert sorted(got[step]) == sorted(want[step]), step
        for key in want[step]:
            np.testing.assert_allclose(got[step][key], want[step][key], rtol=1e-5, atol=1e-6,
                                       err_msg=f"step {step} {key}")
    events = [p for p in (run / "tensorboard").iterdir() if p.name.startswith("events.out.tfevents")]
    assert len(events) == 2 and all(p.stat().length > 0 for p in events), events  # one file per launch
    results = json.loads((run / "results.json").read_text())
    assert sorted(r["model"] for r in results) == ["MLCD ViT", "raw pixels"]
    for picture in ("patch_pca.png", "cosine_curves.png"):
        assert (run / picture).read_bytes().startswith(b"\x89PNG"), picture
    assert not (tmp_path / "gs:").exists(), "a gs:// path was written as a local folder"

    # config.json records the latest launch: its evaluation keys (free to change), no history of training changes
    want_config, got_config = runs.load_run_config(str(local)).to_dict(), runs.load_run_config(workdir).to_dict()
    assert {k: v for k, v in got_config.items() if k not in ("eval", "evals")} == {
        k: v for k, v in want_config.items() if k not in ("eval", "evals")}
    assert got_config["eval"]["baselines"] == "pixels" and "history" not in json.loads((run / "config.json").read_text())
    from flax import nnx

    got_params, want_params = (nnx.state(runs.load_model(str(w))) for w in (workdir, local))
    for a, b in zip(jax.tree.leaves(got_params), jax.tree.leaves(want_params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_metrics_writer_on_gcs_rewrites_at_flush_and_truncates_on_resume(gcs_bucket):
    from mlcd_jax.metrics import create_writer

    workdir = epath.Path(gcs_bucket) / "w"
    writer = create_writer(str(workdir))
    for step in range(1, 7):
        writer.write_scalars(step, {"loss": float(step), "hist": np.arange(3)})
        if step == 3:
            writer.flush()
            assert sorted(_rows(workdir / "metrics.jsonl")) == [1, 2, 3]
    writer.close()
    assert sorted(_rows(workdir / "metrics.jsonl")) == list(range(1, 7))

    resumed = create_writer(str(workdir), resume_step=4)  # rows 5 and 6 came after the checkpoint
    assert sorted(_rows(workdir / "metrics.jsonl")) == [1, 2, 3, 4]
    resumed.write_scalars(5, {"loss": 50.0, "hist": np.arange(3)})
    resumed.close()
    rows = _rows(workdir / "metrics.jsonl")
    assert [rows[s]["loss"] for s in sorted(rows)] == [1.0, 2.0, 3.0, 4.0, 50.0]
    assert rows[5]["hist"] == [0, 1, 2]
    events = list((workdir / "tensorboard").iterdir())
    assert events and all(p.stat().length > 0 for p in events), events


def test_load_run_config_names_a_missing_gs_workdir(gcs_bucket):
    from mlcd_jax import runs

    with pytest.raises(FileNotFoundError, match="is not a mlcd_jax training workdir"):
        runs.load_run_config(f"{gcs_bucket}/nothing")
