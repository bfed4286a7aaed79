"""``hf-hub:ORG/NAME[@REV]`` ids resolve offline from a pre-populated hub cache (nothing is downloaded):
the snapshot holds a checkpoint that loads, a revision picks another snapshot, and an id that is not
cached is one clear line."""

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
