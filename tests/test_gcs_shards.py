"""Record shards on gs:// (the GCS emulator, tests/gcs_emulator.py): the clustering output dir's
manifest and a glob resolve through etils.epath, and the loader reads the shards there (ArrayRecord's
own GCS client) in the same order as a local copy."""

import json

import pytest
from etils import epath

from mlcd_jax.data.pipeline import make_train_loader, resolve_shards
from mlcd_jax.data.sources import load_arrays
from test_pipeline import _same, _take, _write


@pytest.fixture
def gs_shards(gcs_server, gcs_bucket, tmp_path, monkeypatch):
    """(local shard paths, gs:// output dir holding the same shards and a manifest)."""
    monkeypatch.setenv("CLOUD_STORAGE_EMULATOR_ENDPOINT", gcs_server)  # ArrayRecord's GCS client
    images, _ = load_arrays("digits", split="all", limit=200)
    local = _write(tmp_path, images)
    out = epath.Path(gcs_bucket) / "cluster"
    shards = []
    for path in local:
        name = f"shards/{epath.Path(path).name}"
        (out / name).write_bytes(epath.Path(path).read_bytes())
        shards.append({"path": name, "num_records": 100})
    (out / "manifest.json").write_text(json.dumps({"shards": shards, "top_l": 3, "num_images": 200}))
    return local, str(out)


def test_gs_output_dir_and_glob_resolve_and_load_like_local_shards(gs_shards):
    local, out = gs_shards
    want = [f"{out}/shards/a.array_record", f"{out}/shards/b.array_record"]
    paths, manifest = resolve_shards(out)
    assert paths == want and manifest["num_images"] == 200
    assert resolve_shards(f"{out}/shards/*.array_record") == (want, {})
    for kw in ({}, {"in_memory_bytes": 0}):  # decoded once / streamed per record
        kw = dict(global_batch_size=32, image_size=8, top_l=3, seed=0, **kw)
        for a, b in zip(_take(iter(make_train_loader(local, **kw)), 2), _take(iter(make_train_loader(out, **kw)), 2)):
            _same(a, b)


def test_missing_gs_shards_name_the_path(gcs_bucket):
    with pytest.raises(FileNotFoundError, match="no record shards at 'gs://.*/nothing/\\*.array_record'"):
        resolve_shards(f"{gcs_bucket}/nothing/*.array_record")
