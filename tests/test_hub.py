"""``hf-hub:ORG/NAME[@REV]`` ids resolve offline from a pre-populated hub cache (nothing is downloaded):
the snapshot holds a checkpoint that loads, a revision picks another snapshot, and an id that is not
cached is one clear line."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from flax import nnx

from mlcd_jax.interop import hub
from mlcd_jax.interop.hf import save_vision
from mlcd_jax.models import VisionTransformer, get_preset

ROOT = Path(__file__).resolve().parents[1]
COMMITS = {"main": "a" * 40, "v1": "b" * 40}


def _cache(tmp_path: Path) -> Path:
    """A hub cache as huggingface_hub lays it out, holding two revisions of ``test-org/tiny-mlcd``."""
    cache = tmp_path / "hub"
    repo = cache / "models--test-org--tiny-mlcd"
    (repo / "refs").mkdir(parents=True)
    for depth, (ref, commit) in enumerate(COMMITS.items(), start=1):
        model = VisionTransformer(get_preset("tiny", depth=depth, image_size=32, patch_size=8), rngs=nnx.Rngs(depth))
        save_vision(model, str(tmp_path / ref))
        shutil.copytree(tmp_path / ref, repo / "snapshots" / commit)
        (repo / "refs" / ref).write_text(commit)
    return cache


def _resolve(cache: Path, spec: str) -> subprocess.CompletedProcess:
    """Resolves and loads ``spec`` in a fresh process that sees only the cache, offline."""
    code = ("import sys; from mlcd_jax.interop import hub, hf; d = hub.snapshot_dir(sys.argv[1]); "
            "m, cfg = hf.load_vision(d); print(d); print(m.config.depth)")
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", code, spec], env=env, capture_output=True, text=True, cwd=ROOT)


def test_hub_ids_resolve_offline_from_the_cache(tmp_path):
    cache = _cache(tmp_path)
    out = _resolve(cache, "hf-hub:test-org/tiny-mlcd")
    assert out.returncode == 0, out.stderr[-2000:]
    path, depth = out.stdout.split()
    assert Path(path) == cache / "models--test-org--tiny-mlcd" / "snapshots" / COMMITS["main"] and depth == "1"
    out = _resolve(cache, "hf-hub:test-org/tiny-mlcd@v1")
    assert out.returncode == 0 and out.stdout.split()[1] == "2", out.stderr[-2000:]
    missing = _resolve(cache, "hf-hub:test-org/other")
    assert missing.returncode == 1
    assert "hf-hub:test-org/other: not in the hub cache" in missing.stderr.splitlines()[-1]


def test_hf_dirs_pass_through_and_malformed_ids_are_one_line():
    assert hub.snapshot_dir("hf:/models/clip") == "/models/clip"
    for bad in ("hf-hub:tiny-mlcd", "hf-hub:/x", "hf-hub:a/b/c"):
        with pytest.raises(ValueError, match="name a hub model as hf-hub:ORG/NAME"):
            hub.snapshot_dir(bad)


def test_a_hub_id_is_a_lit_tower_and_a_clustering_teacher(tmp_path):
    """The same id in ``loss.image_tower`` (loaded and checked against the config) and as the clustering
    job's teacher (embedding images), offline from the cache."""
    cache = tmp_path / "hub"
    snapshot = cache / "models--test-org--demo-vit" / "snapshots" / COMMITS["main"]
    (snapshot.parent.parent / "refs").mkdir(parents=True)
    (snapshot.parent.parent / "refs" / "main").write_text(COMMITS["main"])
    code = f"""
import numpy as np, importlib.util
from mlcd_jax import runs
from mlcd_jax.cluster import default_config
from mlcd_jax.cluster.teachers import build_teacher
from mlcd_jax.interop.hf import save_vision
spec = importlib.util.spec_from_file_location("demo", {str(ROOT / "configs" / "demo.py")!r})
demo = importlib.util.module_from_spec(spec); spec.loader.exec_module(demo)
config = demo.get_config("digits")
save_vision(runs.build_model(config, 0), {str(snapshot)!r})
tower = runs.load_tower("hf-hub:test-org/demo-vit", config)
assert tower.config == runs.vit_config(config)
teacher = build_teacher("hf-hub:test-org/demo-vit", default_config(), {str(tmp_path)!r})
print(teacher(np.zeros((3, 16, 16, 3), np.uint8)).shape)
"""
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.splitlines()[-1].startswith("(3, ")  # three embeddings


def test_a_released_model_is_evaluated_by_name_offline(tmp_path):
    """``python -m mlcd_jax eval --model=hf-hub:ORG/NAME``: a cached CLIPModel (both towers) is evaluated
    at its own image size with kNN, the on-device linear probe and zero-shot (it has a text tower),
    results.json written to --workdir; an id that is not cached is one config error line, status 2."""
    from mlcd_jax.interop import clip
    from mlcd_jax.models import TextTransformer, get_text_preset

    cache = tmp_path / "hub"
    snapshot = cache / "models--test-org--tiny-clip" / "snapshots" / COMMITS["main"]
    (snapshot.parent.parent / "refs").mkdir(parents=True)
    (snapshot.parent.parent / "refs" / "main").write_text(COMMITS["main"])
    image = VisionTransformer(get_preset("tiny", image_size=16, patch_size=4, proj_dim=32), rngs=nnx.Rngs(1))
    text = TextTransformer(get_text_preset("tiny", context_length=16), rngs=nnx.Rngs(2))
    clip.save_clip(image, text, 4.0, str(snapshot))
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}

    def evaluate(spec: str, workdir: Path) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "mlcd_jax", "eval", f"--model={spec}", f"--workdir={workdir}",
                   "--config=configs/released.py:digits", "--config.eval.train_limit=300",
                   "--config.eval.test_limit=100", "--config.evals.zero_shot.templates=simple"]
        return subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT)

    out = evaluate("hf-hub:test-org/tiny-clip", tmp_path / "released")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "evaluating hf-hub:test-org/tiny-clip (16 px, width 64, with a text tower) on digits" in out.stdout
    (row,) = json.loads((tmp_path / "released" / "results.json").read_text())
    assert row["model"] == "hf-hub:test-org/tiny-clip"
    assert all(0.0 < row[key] <= 1.0 for key in ("knn_top1", "linear_top1", "zero_shot_top1")), row
    missing = evaluate("hf-hub:test-org/other", tmp_path / "missing")
    assert missing.returncode == 2 and missing.stderr.strip().splitlines()[-1].startswith(
        "config error: --model=hf-hub:test-org/other: cannot load it"), missing.stderr[-2000:]
