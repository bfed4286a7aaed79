"""The trainer end to end on real images (digits): smoke run, exact resume after kill -9, SIGTERM / SIGINT,
config errors in one line, NaN stop, and the ahead-of-time ViT-L/14 + 1M-prototype memory plan."""

import json
import re
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = 30


def _cmd(workdir: Path, cache: Path, *overrides: str) -> list[str]:
    return [
        sys.executable, "-m", "mlcd_jax.main", f"--config={ROOT / 'configs' / 'demo.py'}:digits",
        f"--workdir={workdir}", f"--config.data.cache_dir={cache}", f"--config.num_train_steps={STEPS}",
        "--config.batch_size=32", "--config.log_every_steps=1", "--config.checkpoint_every_steps=5",
        "--config.eval.source=", "--config.loss.num_classes=64", "--config.data.cluster.num_clusters=64",
        "--config.loss.top_l=4", "--config.data.cluster.top_l=4", "--config.warmup_steps=5",
        *overrides,
    ]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _losses(workdir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines() if line]
    steps = [r["step"] for r in rows]
    assert steps == sorted(set(steps)), "metrics.jsonl must read as one run (no repeated steps)"
    return {r["step"]: r["loss"] for r in rows}


def _checkpoint_steps(workdir: Path) -> list[int]:
    d = workdir / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    base = tmp_path_factory.mktemp("train")
    workdir, cache = base / "straight", base / "cache"
    out = subprocess.run(_cmd(workdir, cache), env=_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return base, workdir, cache, out.stdout


def test_smoke_run_writes_metrics_tensorboard_and_checkpoints(uninterrupted):
    _, workdir, _, stdout = uninterrupted
    losses = _losses(workdir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    row = json.loads((workdir / "metrics.jsonl").read_text().splitlines()[-1])
    for key in ("loss", "loss_pos", "loss_neg", "mean_pos_cos", "mean_neg_cos", "lr", "grad_norm",
                "images_per_s", "data_wait_frac", "flops_per_s", "pos_cos_hist", "neg_cos_hist", "skipped_records"):
        assert key in row, key
    assert len(row["pos_cos_hist"]) == 40
    assert np.mean([losses[s] for s in range(STEPS - 4, STEPS + 1)]) < np.mean([losses[s] for s in range(1, 6)])
    assert any(p.name.startswith("events.out.tfevents") for p in (workdir / "tensorboard").iterdir())
    assert _checkpoint_steps(workdir)[-1] == STEPS
    assert f"step {STEPS}/{STEPS} loss" in stdout


def test_kill_9_then_resume_matches_uninterrupted_run(uninterrupted):
    """Killed, then resumed from a copy of the shards with 2 grain workers: the uninterrupted run's losses."""
    base, straight, cache, _ = uninterrupted
    workdir = base / "killed"
    proc = subprocess.Popen(_cmd(workdir, cache), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not [s for s in _checkpoint_steps(workdir) if s >= 10]:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = _checkpoint_steps(workdir)[-1]
    assert killed_at < STEPS
    # Resumed from the shards copied elsewhere and with grain worker processes: neither changes the data.
    moved = base / "cache_moved"
    shutil.copytree(cache, moved)
    out = subprocess.run(_cmd(workdir, moved, "--config.data.num_workers=2"), env=_env(), capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    want, got = _losses(straight), _losses(workdir)
    assert sorted(got) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([got[s] for s in range(1, STEPS + 1)], [want[s] for s in range(1, STEPS + 1)],
                               rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # ~60 s on 2 cores: three launches of the trainer
def test_relaunch_after_stop_after_steps_trains_nothing(uninterrupted, tmp_path):
    _, _, cache, _ = uninterrupted
    cmd = _cmd(tmp_path / "w", cache, "--config.stop_after_steps=10")
    first = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    assert _checkpoint_steps(tmp_path / "w")[-1] == 10 and max(_losses(tmp_path / "w")) == 10
    again = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already holds step 10 (>= 10): nothing to train" in again.stdout
    assert _checkpoint_steps(tmp_path / "w")[-1] == 10 and max(_losses(tmp_path / "w")) == 10
    other_model = subprocess.run(cmd + ["--config.model.overrides.depth=3"], env=_env(), capture_output=True,
                                 text=True, timeout=600)
    assert other_model.returncode == 2, other_model.stderr[-3000:]
    assert other_model.stderr.splitlines()[-1].startswith(
        f"config error: {tmp_path / 'w'} holds a run trained with other settings: model.overrides.depth (2 -> 3)")
    assert "Traceback" not in other_model.stderr
    assert _checkpoint_steps(tmp_path / "w")[-1] == 10  # nothing moved aside


def test_a_broken_newest_checkpoint_falls_back_to_the_previous_one(uninterrupted, tmp_path):
    """The newest checkpoint lost its array files (a crash mid-upload): the run warns in one line, moves it
    aside, resumes from the one before and trains exactly what the uninterrupted run trained."""
    _, straight, cache, _ = uninterrupted
    workdir = tmp_path / "w"
    shutil.copytree(straight, workdir)
    newest, previous = _checkpoint_steps(workdir)[-1], _checkpoint_steps(workdir)[-2]
    for lost in ("d", "ocdbt.process_0"):
        shutil.rmtree(workdir / "checkpoints" / str(newest) / "state" / lost)
    out = subprocess.run(_cmd(workdir, cache), env=_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    warnings = [line for line in out.stderr.splitlines() if line.startswith(f"warning: checkpoint {newest} ")]
    assert len(warnings) == 1 and f"using checkpoint {previous}" in warnings[0], out.stderr[-3000:]
    assert (workdir / "checkpoints_broken" / str(newest) / "state").is_dir()
    assert f"step {previous + 1}/{STEPS} loss" in out.stdout and f"step {previous}/{STEPS} loss" not in out.stdout
    want, got = _losses(straight), _losses(workdir)
    np.testing.assert_allclose([got[s] for s in range(1, STEPS + 1)], [want[s] for s in range(1, STEPS + 1)],
                               rtol=1e-5, atol=1e-6)
    assert _checkpoint_steps(workdir)[-1] == STEPS


def test_a_trained_run_is_a_clustering_teacher(uninterrupted, tmp_path):
    """The second clustering round (``teacher=checkpoint:WORKDIR``) embeds with the run's own backbone."""
    import ml_collections

    from mlcd_jax import cluster, runs
    from mlcd_jax.data.sources import load_arrays
    from mlcd_jax.models.features import FeatureExtractor

    _, straight, _, _ = uninterrupted
    config = ml_collections.ConfigDict(dict(
        source="digits:test", limit=0, output_dir=str(tmp_path / "round2"), num_clusters=8, top_l=2,
        kmeans_iters=4, progress=False, teacher=f"checkpoint:{straight}"))
    manifest = cluster.run(config)
    assert manifest["num_images"] == 360 and manifest["embedding_dim"] == 64
    images, _ = load_arrays("digits", split="test", limit=16)
    run_config = runs.load_run_config(str(straight))
    want = FeatureExtractor(runs.load_model(str(straight)), run_config.data.image_size)(images)
    np.testing.assert_allclose(cluster.load_teacher(str(tmp_path / "round2"))(images), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_or_ctrl_c_checkpoints_skips_evaluation_and_exits_75(uninterrupted, signum):
    base, _, cache, _ = uninterrupted
    workdir = base / f"stopped_{signum.name}"
    proc = subprocess.Popen(_cmd(workdir, cache, "--config.checkpoint_every_steps=1000", "--config.eval.source=digits",
                                 "--config.evals.linear.every=-1"),
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (workdir / "metrics.jsonl").exists():
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signum)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 75, output[-3000:]
    steps = _checkpoint_steps(workdir)
    assert steps and steps[-1] < STEPS, "a checkpoint is written at the step the signal arrived"
    assert f"stopped by {signum.name}: checkpoint of step {steps[-1]} written; evaluation skipped" in output
    assert "evaluating on" not in output and not (workdir / "results.json").exists()
    assert "Traceback" not in output


@pytest.mark.parametrize(
    "override,message",
    [
        ("--config.batch_size=30", "batch_size=30 is not divisible by the 8 data-parallel devices"),
        ("--config.data.image_size=18", "image_size 18 is not a multiple of patch_size 4"),
        ("--config.data.shards=/nonexistent/dir", "/nonexistent/dir"),
        ("--config.loss.top_l=8", "loss.top_l=8 but the shards carry only l=4"),
        ("--config.learning_rate=-1", "learning_rate=-1.0 must be positive"),
        ("--config.mesh.fsdp=3", "mesh: "),
    ],
)
def test_config_errors_are_one_clear_line(uninterrupted, override, message, tmp_path):
    _, _, cache, _ = uninterrupted
    out = subprocess.run(_cmd(tmp_path / "w", cache, override), env=_env(), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("config error:")]
    assert len(errors) == 1 and message in errors[0], out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    if "shards" not in override and "top_l" not in override:  # need no shards: checked before clustering
        assert "clustering" not in out.stdout


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(uninterrupted, tmp_path):
    _, _, cache, _ = uninterrupted
    workdir = tmp_path / "nan"
    out = subprocess.run(_cmd(workdir, cache, "--config.learning_rate=1e30"), env=_env(),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert re.search(r"(loss|grad_norm) is (nan|inf) at step \d+", out.stdout + out.stderr), out.stderr[-2000:]
    for step in _checkpoint_steps(workdir):
        assert step < STEPS


@pytest.mark.slow  # the default suite compiles the plan for TPU slices in test_aot.py and for CPU there too
def test_aot_compile_vitl14_with_1m_prototypes_memory_plan():
    """Compiles the ViT-L/14 + 1M-class step for 8 devices without allocating anything."""
    from mlcd_jax import aot
    from mlcd_jax.config_lib import model_config

    config = model_config("L/14", **{"batch_size": 256, "mesh.fsdp": 8, "mesh.data": 1})
    memory = aot.plan(config, aot.parse_topology("cpu:8"))["per_chip"]
    # W + AdamW for 1M x 768 over 8 devices alone is 12*k*d/8 = 1.15e9 bytes.
    assert memory["argument_bytes"] > 12 * 1_000_000 * 768 // 8
    assert memory["total_bytes"] < 80 * 2**30


def test_evaluate_cli_on_a_trained_run(uninterrupted):
    _, workdir, cache, _ = uninterrupted
    cmd = _cmd(workdir, cache, "--config.eval.source=digits", "--config.evals.linear.every=-1",
               "--config.eval.baselines=pixels")
    cmd[2] = "mlcd_jax.evaluate"
    out = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = {r["model"]: r for r in json.loads((workdir / "results.json").read_text())}
    assert sorted(rows) == ["MLCD ViT", "raw pixels"]
    assert 0.1 < rows["MLCD ViT"]["knn_top1"] <= 1.0 and rows["raw pixels"]["knn_top1"] > 0.9
    assert (workdir / "patch_pca.png").stat().st_size > 0 and (workdir / "cosine_curves.png").stat().st_size > 0
    assert "knn_top1" in out.stdout


def test_gradient_accumulation_equals_one_large_step():
    """Two accumulated micro-steps on the same batch = one step on it (r = 1: no sampling noise)."""
    import jax

    from mlcd_jax import sharding, train
    from mlcd_jax.config_lib import base_config

    def params_after(accum: int) -> dict:
        c = base_config()
        c.model.name, c.model.dtype, c.data.image_size = "tiny", "float32", 16
        c.model.overrides = {"patch_size": 8}
        c.batch_size, c.loss.num_classes, c.loss.top_l, c.loss.sample_ratio = 16, 64, 2, 1.0
        c.warmup_steps, c.grad_accum_steps = 0, accum
        mesh = sharding.make_mesh(dict(c.mesh))
        setup = train.TrainSetup.create(c, mesh, num_train_steps=10)
        state, step = setup.init_state(0), train.make_train_step(setup)
        rng = np.random.default_rng(0)
        batch = sharding.host_to_global({"image": rng.normal(size=(16, 16, 16, 3)).astype(np.float32),
                                         "labels": rng.integers(0, 64, (16, 2)).astype(np.int32)}, mesh)
        for _ in range(accum):
            state, _ = step(state, batch)
        return jax.device_get({"params": state["params"], "proto": state["proto"]})

    one, two = params_after(1), params_after(2)
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(two)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("proto_update", ["dense", "lazy"])
def test_a_batch_past_the_heads_positive_budget_runs_the_exact_step(proto_update):
    """GuardedStep counts each batch's positives per prototype shard first: a typical batch runs the
    budgeted step (nothing dropped), one with more distinct positives on a shard than the budget runs
    the step compiled with room for all of them, and trains exactly as that step does (with either
    prototype update: the lazy one samples its rows with the same budget)."""
    import jax

    from mlcd_jax import sharding, train
    from mlcd_jax.config_lib import base_config
    from mlcd_jax.train.step import GuardedStep

    c = base_config()
    c.model.name, c.model.dtype, c.data.image_size = "tiny", "float32", 16
    c.model.overrides = {"patch_size": 8}
    c.batch_size, c.loss.num_classes, c.loss.top_l, c.loss.sample_ratio = 64, 8 * 512, 8, 0.1
    c.loss.proto_update = proto_update
    mesh = sharding.make_mesh(dict(c.mesh))
    setup = train.TrainSetup.create(c, mesh, num_train_steps=10)
    head = setup.objective.head
    assert head.budgeted and head.capacity < head.exact_capacity == 512
    rng = np.random.default_rng(0)
    image = rng.normal(size=(64, 16, 16, 3)).astype(np.float32)

    def batch(labels):
        return sharding.host_to_global({"image": image, "labels": labels.astype(np.int32)}, mesh)

    guarded = GuardedStep(setup)
    _, metrics = guarded(setup.init_state(0), batch(rng.integers(0, 8 * 512, (64, 8))), 1)
    assert guarded.checked and guarded.exact_steps == 0 and int(metrics["positives_dropped"]) == 0
    crowded = batch(np.arange(64 * 8).reshape(64, 8))  # 512 distinct positives, all on shard 0
    state, metrics = guarded(setup.init_state(0), crowded, 2)
    assert guarded.exact_steps == 1 and "positives_dropped" not in metrics
    want, want_metrics = train.make_train_step(setup, exact=True)(setup.init_state(0), crowded)
    assert float(metrics["loss"]) == float(want_metrics["loss"])
    for a, b in zip(jax.tree.leaves(jax.device_get(state["proto"])), jax.tree.leaves(jax.device_get(want["proto"]))):
        np.testing.assert_array_equal(a, b)
    if proto_update == "lazy":  # its exact step scores the rows the dense one does
        c.loss.proto_update = "dense"
        dense = train.TrainSetup.create(c, mesh, num_train_steps=10)
        _, dense_metrics = train.make_train_step(dense, exact=True)(dense.init_state(0), crowded)
        assert float(dense_metrics["loss"]) == float(metrics["loss"])
        assert int(dense_metrics["num_sampled"]) == int(metrics["num_sampled"])
