"""``python -m mlcd_jax.study`` end to end on digits: a 2-point × 2-seed sweep writes study.json (runs,
summary mean ± std, baselines once), study.png and the table; a re-run skips every finished run and the
cached baselines; a bad sweep is one ``config error:`` line with exit status 2."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from test_train import _env  # its jobs share the run's compilation cache (conftest.py)

ROOT = Path(__file__).resolve().parents[1]
SEEDS = (0, 1)
KINDS = ("mlcd", "softmax")


def _cmd(workdir: Path, cache: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "mlcd_jax.study", f"--config={ROOT / 'configs' / 'demo.py'}:digits",
        f"--workdir={workdir}", f"--sweep=loss.kind={','.join(KINDS)}", f"--seeds={','.join(map(str, SEEDS))}",
        f"--config.data.cache_dir={cache}", "--config.num_train_steps=6", "--config.batch_size=32",
        "--config.loss.num_classes=32", "--config.data.cluster.num_clusters=32", "--config.loss.top_l=2",
        "--config.data.cluster.top_l=2", "--config.eval.train_limit=300", "--config.eval.test_limit=100",
        "--config.log_every_steps=3", "--config.checkpoint_every_steps=6", "--config.evals.knn.every=6", *extra,
    ]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """The study run twice: (workdir, first stdout, second stdout, results.json bytes after the first)."""
    base = tmp_path_factory.mktemp("study")
    workdir, cmd, env = base / "study", _cmd(base / "study", base / "cache"), _env()
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    results = {p: p.read_bytes() for p in (workdir / "runs").glob("*/*/results.json")}
    baselines_mtime = (workdir / "baselines.json").stat().st_mtime_ns
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert (workdir / "baselines.json").stat().st_mtime_ns == baselines_mtime
    return workdir, first.stdout, second.stdout, results


def test_study_json_holds_runs_summary_and_baselines_once(study):
    workdir, _, _, _ = study
    record = json.loads((workdir / "study.json").read_text())
    assert sorted(record) == ["baselines", "code", "command", "date", "runs", "summary"]
    assert record["command"].startswith("python -m mlcd_jax.study --config=") and "--sweep=loss.kind=" in record["command"]
    assert re.fullmatch(r"([0-9a-f]{7,}(-dirty)?|unknown) \(\d+-core .+\)", record["code"]), record["code"]
    runs = record["runs"]
    assert [(r["overrides"], r["seed"]) for r in runs] == [({"loss.kind": k}, s) for k in KINDS for s in SEEDS]
    for run in runs:
        kind = run["overrides"]["loss.kind"]
        assert run["workdir"] == str(workdir / "runs" / f"loss.kind={kind}" / f"seed{run['seed']}")
        rows = json.loads((Path(run["workdir"]) / "results.json").read_text())
        # Only the trained model: no per-run pixel / teacher / random-init rows, no single-label run.
        assert [r["model"] for r in rows] == [f"{kind.upper()} ViT"]
        assert rows[0]["knn_top1"] == run["knn_top1"] and rows[0]["linear_top1"] == run["linear_top1"]
        logged = [json.loads(line) for line in (Path(run["workdir"]) / "metrics.jsonl").read_text().splitlines()]
        last = [r for r in logged if "heldout/knn_top1" in r][-1]  # the training-time kNN at step 6
        assert run["heldout"] == {"step": 6, "heldout/knn_top1": last["heldout/knn_top1"]}
        assert 0.0 <= run["knn_top1"] <= 1.0 and 0.0 <= run["linear_top1"] <= 1.0
        assert not (Path(run["workdir"]) / "single_label").exists()

    assert [s["overrides"] for s in record["summary"]] == [{"loss.kind": k} for k in KINDS]
    for summary in record["summary"]:
        mine = [r for r in runs if r["overrides"] == summary["overrides"]]
        assert summary["n"] == len(mine) == len(SEEDS)
        for metric in ("knn_top1", "linear_top1"):
            values = [r[metric] for r in mine]
            assert summary[f"{metric}_mean"] == pytest.approx(np.mean(values))
            assert summary[f"{metric}_std"] == pytest.approx(np.std(values, ddof=1))

    baselines = {b["model"]: b for b in record["baselines"]}
    assert list(baselines) == ["raw pixels", "teacher (clustering)", "random-init ViT"]
    assert baselines["raw pixels"]["knn_top1"] > 0.8 and baselines["raw pixels"]["n"] == 1
    random_init = baselines["random-init ViT"]
    assert [p["seed"] for p in random_init["per_seed"]] == list(SEEDS) and random_init["n"] == len(SEEDS)
    for metric in ("knn_top1", "linear_top1"):
        values = [p[metric] for p in random_init["per_seed"]]
        assert random_init[metric] == pytest.approx(np.mean(values))
        assert random_init[f"{metric}_std"] == pytest.approx(np.std(values, ddof=1))

    with Image.open(workdir / "study.png") as img:
        assert img.format == "PNG" and img.width >= 900 and img.height >= 400
        assert np.asarray(img.convert("L")).std() > 10  # not a blank canvas


def _progress(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.startswith("[")]


def _expected_progress(status: str) -> list[str]:
    """One progress line per run, in sweep order: ``[i/total] loss.kind=K seed S: status``."""
    runs = [(k, s) for k in KINDS for s in SEEDS]
    return [f"[{i}/{len(runs)}] loss.kind={k} seed {s}: {status}" for i, (k, s) in enumerate(runs, 1)]


def test_study_prints_progress_and_the_mean_std_table(study):
    workdir, first, _, _ = study
    assert _progress(first) == _expected_progress("training")
    assert "sample std, ddof=1" in first
    record = json.loads((workdir / "study.json").read_text())
    lines = first.splitlines()
    for summary in record["summary"]:
        cell = f"{100 * summary['knn_top1_mean']:.1f} ± {100 * summary['knn_top1_std']:.1f}"
        assert any(line.startswith(f"loss.kind={summary['overrides']['loss.kind']} ") and cell in line
                   for line in lines), (cell, first[-2000:])
    for model in ("raw pixels", "teacher (clustering)", "random-init ViT"):
        assert any(line.startswith(model) for line in lines[-8:]), first[-2000:]


def test_rerun_skips_finished_runs_and_cached_baselines(study):
    workdir, _, second, results = study
    assert _progress(second) == _expected_progress("done (cached)")
    assert "baselines: computing" not in second
    assert len(results) == len(KINDS) * len(SEEDS)
    for path, content in results.items():
        assert path.read_bytes() == content, path


@pytest.mark.parametrize(
    "sweep,message",
    [
        ("loss.nope=1,2", "--sweep key loss.nope is not in the config"),
        ("loss.top_l=2,two", "--sweep value 'two' for loss.top_l is not a valid int"),
    ],
)
def test_bad_sweep_is_one_config_error_line(tmp_path, sweep, message):
    cmd = [c if not c.startswith("--sweep=") else f"--sweep={sweep}" for c in _cmd(tmp_path / "w", tmp_path / "c")]
    out = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("config error:")]
    assert len(errors) == 1 and message in errors[0], out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "w").exists(), "nothing runs before the sweep is checked"


def test_parse_sweep_types_values_by_the_config_and_names_points():
    from mlcd_jax import study
    from mlcd_jax.config_lib import base_config

    config = base_config()
    points = study.parse_sweep(config, "loss.kind=mlcd,softmax; loss.sample_ratio=1,0.5 ;model.scan_layers=true")
    assert [p.overrides for p in points] == [
        {"loss.kind": k, "loss.sample_ratio": r, "model.scan_layers": True}
        for k in ("mlcd", "softmax") for r in (1.0, 0.5)
    ]
    assert type(points[0].overrides["loss.sample_ratio"]) is float
    assert points[0].name == "loss.kind=mlcd__loss.sample_ratio=1.0__model.scan_layers=True"
    assert points[0].label == "loss.kind=mlcd loss.sample_ratio=1.0 model.scan_layers=True"
    assert [p.overrides for p in study.parse_sweep(config, "")] == [{}]
    assert study.parse_seeds("0, 1,7") == [0, 1, 7]
    for sweep, message in [("loss=1", "holds a ConfigDict"), ("num_train_steps=1,1", "repeats a value"),
                           ("seed", "is not KEY=V1,V2"), ("eval.source=a/b,a_b", "clashing folder names"),
                           ("num_train_steps=1;num_train_steps=2", "names num_train_steps twice"),
                           ("seed=0,1", "cannot hold seed.*use --seeds")]:  # the seed loop overwrote it
        with pytest.raises(ValueError, match=message):
            study.parse_sweep(config, sweep)
    with pytest.raises(ValueError, match="comma-separated integers"):
        study.parse_seeds("0,x")


def test_probe_noise_benchmark_reproduces_each_runs_linear_probe(study, tmp_path):
    """benchmarks/probe_noise.py refits the probe of every run (and of the random-init ViT per seed) over
    split seeds; at the run's own seed it gives the study's figure."""
    workdir, _, _, _ = study
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "probe_noise.py"), f"--study={workdir}", "--split-seeds=2",
         f"--json={tmp_path / 'noise.json'}"],
        env=_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    record = json.loads((tmp_path / "noise.json").read_text())
    assert sorted(record) == sorted([f"loss.kind={k}/seed{s}" for k in KINDS for s in SEEDS]
                                    + [f"random-init/seed{s}" for s in SEEDS])
    for run in json.loads((workdir / "study.json").read_text())["runs"]:
        row = record[f"loss.kind={run['overrides']['loss.kind']}/seed{run['seed']}"]
        assert row["linear_top1"][run["seed"]] == run["linear_top1"] and row["knn_top1"] == run["knn_top1"]
    assert sum(" | linear " in line and "at the run's seed" in line for line in out.stdout.splitlines()) == len(record)


def test_probe_noise_heldout_scores_on_train_images_only(study, tmp_path):
    """--heldout 0.25 fits on 75 % of the study's 300 train images and scores on the other 25 %: the
    test split's 100 images take no part (a recipe can be chosen on these figures)."""
    workdir, _, _, _ = study
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "probe_noise.py"), f"--study={workdir}", "--split-seeds=2",
         "--heldout=0.25", f"--json={tmp_path / 'heldout.json'}"],
        env=_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "probe on 225 train / 75 held-out train images" in out.stdout
    record = json.loads((tmp_path / "heldout.json").read_text())
    assert len(record) == len(KINDS) * len(SEEDS) + len(SEEDS)
    for row in record.values():  # figures on 75 images: multiples of 1/75
        assert all(abs(75 * x - round(75 * x)) < 1e-9 for x in (row["knn_top1"], *row["linear_top1"]))
