"""One run per workdir (issue 31): the lock, ``config.json`` as the run's identity, evaluation that trusts the
run, studies that survive a bad point, and the entry points' one-line errors. Each test failed on main
ecad886 (two trainers both exited 0, re-runs mixed settings in, evaluation trusted ``--config``, a
diverging point aborted the study, tracebacks)."""

import errno
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mlcd_jax import workdir_lock
from mlcd_jax.config_lib import ConfigError
from test_train import _env  # the tests' compilation cache (conftest.py)

ROOT = Path(__file__).resolve().parents[1]
TINY = ("--config.num_train_steps=4", "--config.batch_size=16", "--config.log_every_steps=2",
        "--config.checkpoint_every_steps=2", "--config.eval.source=digits", "--config.eval.train_limit=200",
        "--config.eval.test_limit=100", "--config.evals.linear.every=-1", "--config.evals.pictures.every=-1",
        "--config.loss.num_classes=32", "--config.data.cluster.num_clusters=32", "--config.loss.top_l=2",
        "--config.data.cluster.top_l=2", "--config.eval.baselines=")


def _run(module: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], env=_env(), capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def _train_args(workdir: Path, cache: Path, *extra: str) -> list[str]:
    return [f"--config={ROOT / 'configs' / 'demo.py'}:digits", f"--workdir={workdir}",
            f"--config.data.cache_dir={cache}", *TINY, *extra]


def _last_line(out: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    return out.stderr.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny finished MLCD run (4 steps, kNN on digits): (base dir, workdir, cache)."""
    base = tmp_path_factory.mktemp("run")
    out = _run("mlcd_jax.main", *_train_args(base / "w", base / "cache"), timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return base, base / "w", base / "cache"


def _copy(trained, tmp_path) -> Path:
    workdir = tmp_path / "w"
    shutil.copytree(trained[1], workdir)
    return workdir


# -- the lock ---------------------------------------------------------------------------------------------

def test_a_second_trainer_refuses_in_one_line_naming_the_holder(trained, tmp_path):
    """Issue case 1: the second trainer replaced the first run's config, metrics and weights, both exit 0."""
    workdir = _copy(trained, tmp_path)
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "command": "train", "started": time.time(),
              "heartbeat": time.time(), "token": "other"}
    (workdir / "lock.json").write_text(json.dumps(holder))
    before = (workdir / "metrics.jsonl").read_bytes()
    for module in ("mlcd_jax.main", "mlcd_jax.evaluate", "mlcd_jax.study"):  # two studies failed the same way
        out = _run(module, *_train_args(workdir, trained[2]))
        assert out.returncode == 2, out.stderr[-2000:]
        assert _last_line(out).startswith(f"config error: {workdir} is in use by train pid {os.getpid()} on host ")
    assert (workdir / "metrics.jsonl").read_bytes() == before
    assert json.loads((workdir / "lock.json").read_text())["token"] == "other"  # the holder's lock is kept


def test_a_stale_lock_is_taken_over_with_a_notice_and_released(tmp_path, capsys):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    now = time.time()
    for stale in ({"host": socket.gethostname(), "pid": int(dead.stdout), "heartbeat": now},  # dead pid here
                  {"host": "elsewhere", "pid": 1, "heartbeat": now - 2 * workdir_lock.STALE_AFTER_S}):  # silent host
        (tmp_path / "lock.json").write_text(json.dumps({**stale, "command": "train", "started": now}))
        with workdir_lock.hold(str(tmp_path), "train"):
            assert json.loads((tmp_path / "lock.json").read_text())["pid"] == os.getpid()
            with pytest.raises(ConfigError, match=f"is in use by train pid {os.getpid()}"):
                with workdir_lock.hold(str(tmp_path), "evaluate"):
                    pass
        assert "notice: taking over the stale lock of train pid" in capsys.readouterr().err
        assert not (tmp_path / "lock.json").exists()


def test_the_lock_works_on_gcs(gcs_bucket):
    workdir = f"{gcs_bucket}/locked"
    with workdir_lock.hold(workdir, "study"):
        with pytest.raises(ConfigError, match="is in use by study pid"):
            workdir_lock.WorkdirLock(workdir, "train").acquire()
    from etils import epath

    assert not epath.Path(workdir, "lock.json").exists()


# -- config.json is the run's identity --------------------------------------------------------------------

def test_a_rerun_with_other_training_settings_is_refused_listing_the_keys(trained, tmp_path):
    """Issue case 5: steps 6-8 ran at a new learning rate while config.json still said the old one."""
    workdir = _copy(trained, tmp_path)
    out = _run("mlcd_jax.main", *_train_args(workdir, trained[2], "--config.learning_rate=1e-3",
                                             "--config.num_train_steps=6", "--config.eval.test_limit=50"))
    assert out.returncode == 2, out.stderr[-2000:]
    line = _last_line(out)
    assert "holds a run trained with other settings: learning_rate (0.002 -> 0.001), num_train_steps (4 -> 6)" in line
    assert "--config.allow_changes=learning_rate,num_train_steps" in line and "eval." not in line
    assert "clustering" not in out.stdout and (workdir / "checkpoints" / "4").is_dir()


def test_an_allowed_change_is_kept_in_the_history_with_its_step(trained, tmp_path):
    workdir = _copy(trained, tmp_path)
    out = _run("mlcd_jax.main", *_train_args(workdir, trained[2], "--config.learning_rate=1e-3",
                                             "--config.allow_changes=learning_rate"))
    assert out.returncode == 0, out.stderr[-3000:]
    record = json.loads((workdir / "config.json").read_text())
    assert record["learning_rate"] == 1e-3
    assert record["history"] == [{"step": 4, "changes": {"learning_rate": [0.002, 0.001]}}]


# -- evaluation trusts the run ----------------------------------------------------------------------------

def test_evaluate_needs_only_the_workdir_and_labels_the_row_by_the_run(trained, tmp_path):
    workdir = _copy(trained, tmp_path)
    (workdir / "results.json").unlink()
    out = _run("mlcd_jax.evaluate", f"--workdir={workdir}")
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads((workdir / "results.json").read_text())
    assert [r["model"] for r in rows] == ["MLCD ViT"] and 0 < rows[0]["knn_top1"] <= 1


def test_evaluate_refuses_a_config_that_changes_the_run_and_writes_nothing(trained, tmp_path):
    """Issue cases 3 and 4: depth=1 restored part of a depth-2 run and overwrote results.json."""
    workdir = _copy(trained, tmp_path)
    before = (workdir / "results.json").read_bytes()
    out = _run("mlcd_jax.evaluate", *_train_args(workdir, trained[2], "--config.model.overrides.depth=1",
                                                 "--config.loss.kind=clip"))
    assert out.returncode == 2
    assert "--config differs from the run" in _last_line(out) and "model.overrides.depth (2 -> 1)" in _last_line(out)
    assert "loss.kind" in _last_line(out) and (workdir / "results.json").read_bytes() == before


def test_a_restore_into_another_model_names_the_first_mismatch(trained):
    """Even past the config check, a restore is strict: block 1 of the checkpoint was silently skipped."""
    from mlcd_jax import runs

    config = runs.load_run_config(str(trained[1]))
    config.model.overrides.depth = 1
    with pytest.raises(ConfigError, match="has parameter blocks.1.* that this run's model lacks"):
        runs.load_model(str(trained[1]), config)


@pytest.mark.parametrize("state", ["empty_checkpoints", "orbax_tmp_only", "no_eval_source"])
def test_evaluate_on_a_half_written_or_unlabelled_workdir_is_one_line(trained, tmp_path, state):
    workdir = tmp_path / "w"
    workdir.mkdir()
    record = json.loads((trained[1] / "config.json").read_text())
    if state == "no_eval_source":
        shutil.copytree(trained[1] / "checkpoints", workdir / "checkpoints")
        record["eval"]["source"] = ""
    else:
        (workdir / "checkpoints").mkdir()
        if state == "orbax_tmp_only":
            (workdir / "checkpoints" / "2.orbax-checkpoint-tmp-1765000000").mkdir()
    (workdir / "config.json").write_text(json.dumps(record))
    out = _run("mlcd_jax.evaluate", f"--workdir={workdir}")
    assert out.returncode == 2, out.stderr[-2000:]
    want = "eval.source is empty" if state == "no_eval_source" else "holds no checkpoints: nothing to evaluate"
    assert want in _last_line(out) and not (workdir / "results.json").exists()


# -- studies that survive ---------------------------------------------------------------------------------

def _study(workdir: Path, cache: Path, sweep: str, *extra: str) -> subprocess.CompletedProcess:
    return _run("mlcd_jax.study", f"--config={ROOT / 'configs' / 'demo.py'}:digits", f"--workdir={workdir}",
                f"--config.data.cache_dir={cache}", *TINY, f"--sweep={sweep}", "--seeds=0", *extra, timeout=600)


@pytest.mark.parametrize("sweep,extra,message", [
    ("loss.kind=mlcd,bogus", (), "sweep point loss.kind=bogus seed 0: loss.kind='bogus': choose one of"),
    ("learning_rate=0.002,0.001", ("--config.loss.kind=lit", "--config.loss.image_tower=workdir:/nowhere/seed{seed}"),
     "loss.image_tower=workdir:/nowhere/seed{seed}: /nowhere/seed0 holds no trained run"),
    ("seed=0,1", (), "--sweep cannot hold seed"),
])
def test_a_study_mistake_is_found_before_any_point_trains(trained, tmp_path, sweep, extra, message):
    out = _study(tmp_path / "s", trained[2], sweep, *extra)
    assert out.returncode == 2 and message in _last_line(out), out.stderr[-2000:]
    assert not (tmp_path / "s" / "runs").exists()


def test_a_diverging_point_is_recorded_and_the_study_goes_on(trained, tmp_path):
    """Issue case 6: one diverging point aborted the study (exit 3, no study.json) and every re-run."""
    workdir, once = tmp_path / "s", "--config.checkpoint_every_steps=4"  # 1e30 diverges at step 4, before it
    out = _study(workdir, trained[2], "learning_rate=1e30,0.002", once)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "1 of 2 runs failed" in out.stderr
    runs = json.loads((workdir / "study.json").read_text())["runs"]
    assert runs[0]["failed"].startswith("diverged: ")  # "step None" was the message without a checkpoint
    assert "at step 4; stopped, before its first checkpoint (nothing saved" in runs[0]["failed"]
    assert "failed" not in runs[1] and runs[1]["knn_top1"] > 0
    again = _study(workdir, trained[2], "learning_rate=1e30,0.002", once)
    assert "[1/2] learning_rate=1e+30 seed 0: training" in again.stdout
    assert "[2/2] learning_rate=0.002 seed 0: done (cached)" in again.stdout
    fewer = _study(workdir, trained[2], "learning_rate=1e30,0.002", once, "--config.num_train_steps=2")
    assert fewer.returncode == 2 and "num_train_steps (4 -> 2)" in _last_line(fewer)


# -- one line, exit 2, everywhere -------------------------------------------------------------------------

@pytest.mark.parametrize("module,args,message", [
    ("mlcd_jax.aot", ("--config=configs/nope.py", "--topology=cpu:8"), "No such file or directory"),
    ("mlcd_jax.aot", ("--config=configs/demo.py:digits", "--topology=cpu:8", "--config.bogus=1"), "unknown key 'bogus'"),
    ("mlcd_jax.aot", ("--config=configs/demo.py:digits", "--topology=cpu:8", "--json=/nonexistent/plan.json"),
     "--json=/nonexistent/plan.json: its folder does not exist (checked before compiling)"),
    ("mlcd_jax.cluster", ("--config=configs/nope.py",), "No such file or directory"),
    ("mlcd_jax.cluster", ("--config=configs/cluster/default.py", "--config.num_clustres=3"),
     "unknown key 'num_clustres'"),
    ("mlcd_jax.main", ("--config=configs/demo.py:digits", "--workdir=/tmp/unused", "--config.keep_checkpoints=0"),
     "keep_checkpoints=0 must be >= 1"),
    # every tower field is a key; the run gets as far as the next mistake (batch 12 on 8 devices)
    ("mlcd_jax.main", ("--config=configs/demo.py:digits", "--workdir=/tmp/unused", "--config.model.overrides.mlp_dim=64",
                       "--config.text.overrides.act=gelu", "--config.batch_size=12"), "batch_size=12 is not divisible"),
    ("mlcd_jax.main", ("--config=configs/demo.py:digits", "--workdir=/tmp/unused",
                       "--config.model.overrides.mlp_dim=wide"), "'wide' for model.overrides.mlp_dim is not a valid int"),
])
def test_entry_point_mistakes_are_one_line_with_exit_2(module, args, message):
    out = _run(module, *args)
    assert out.returncode == 2, out.stderr[-2000:]
    assert message in _last_line(out) and "compiling ViT" not in out.stderr and "lowered in" not in out.stderr


def test_a_full_disk_is_one_line_naming_the_path_and_the_free_space(tmp_path, capsys):
    """853 lines of tracebacks ended in 'Event loop is closed', the 'No space left' line buried."""
    from mlcd_jax import cli

    def save() -> None:
        try:
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "checkpoints" / "6"))
        except OSError as err:
            raise RuntimeError("Event loop is closed") from err

    with pytest.raises(SystemExit) as stop:
        cli.run_or_exit(save)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"no space left on device: {tmp_path / 'checkpoints' / '6'} (")
    assert "MiB free of" in err[0] and "last good checkpoint are kept" in err[0]


def test_tower_fields_and_placeholder_floats_can_be_swept():
    """'model.overrides.mlp_dim' was not in the config; a placeholder float 'holds a NoneType'."""
    from mlcd_jax import study
    from mlcd_jax.config_lib import base_config

    config = base_config()
    config.lock()
    points = study.parse_sweep(config, "model.overrides.mlp_dim=64,128;loss.proto_weight_decay=0.1,none")
    assert [p.overrides for p in points][:2] == [{"model.overrides.mlp_dim": 64, "loss.proto_weight_decay": 0.1},
                                                 {"model.overrides.mlp_dim": 64, "loss.proto_weight_decay": None}]
    config.eval.source = "digits"
    run = study.plan(config, points[:1], [0], "/tmp/study")[0]
    assert run.config.model.overrides.mlp_dim == 64 and run.config.loss.proto_weight_decay == 0.1
