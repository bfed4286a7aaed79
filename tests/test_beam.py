"""The clustering job on Apache Beam's DirectRunner (``runner=beam``) against the local job, on real images
(scikit-learn's digits): same shards, same manifest, failed chunks re-done exactly once, corrupt files
reported alike, the dry run, and a gs:// output_dir on the GCS emulator."""

import json
import os
import subprocess
import sys

import ml_collections
import pytest
from etils import epath

from mlcd_jax import cluster
from mlcd_jax.cluster import runners, stages
from test_cluster import _bytes, _png_folder, _records

ROOT = os.path.join(os.path.dirname(__file__), "..")
# One in-process worker: reliable on a 2-core box, and DoFns see this process's monkeypatches.
DIRECT = "--runner=DirectRunner --direct_num_workers=1 --direct_running_mode=in_memory"
SHARDS = 5  # 1,797 digits in chunks of 400


def _config(output_dir, **kw):
    c = ml_collections.ConfigDict(dict(
        source="digits:all", output_dir=str(output_dir), num_clusters=16, top_l=4, kmeans_iters=5,
        shard_size=400, progress=False, pixels_dim=32, teacher_fit_samples=500,
    ))
    c.update(kw)
    return c


def _beam(output_dir, **kw):
    return _config(output_dir, **{"runner": "beam", "beam_options": DIRECT, **kw})


def _no_seconds(manifest):
    return {k: v for k, v in manifest.items() if k != "seconds"}


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    out = tmp_path_factory.mktemp("local")
    return out, cluster.run(_config(out))


def _assert_same_output(out, manifest, local):
    """Byte-identical shards, centroids and fitted teacher; the same manifest but for timings."""
    ref, ref_manifest = local
    for pattern in ("shards/*", "centroids.npy", "teacher.npz"):
        assert _bytes(out, pattern) == _bytes(ref, pattern), pattern
    assert len(_bytes(out, "shards/*")) == SHARDS
    assert _no_seconds(manifest) == _no_seconds(ref_manifest)


def test_beam_equals_local(local, tmp_path, capsys):
    out = tmp_path / "beam"
    manifest = cluster.run(_beam(out, progress=True))
    _assert_same_output(out, manifest, local)
    assert manifest["num_images"] == 1797 and manifest["num_skipped"] == 0
    printed = capsys.readouterr().out
    assert "beam embed: 5 of 5 chunks on DirectRunner" in printed and "'images_embedded': 1797" in printed
    assert "'records_written': 1797" in printed
    assert cluster.run(_beam(out)) == manifest  # a finished job returns its manifest


def test_failed_chunks_are_redone_exactly_once(local, tmp_path, monkeypatch):
    """A worker dies before writing chunk 2's embeddings, another after writing chunk 3's shard; the re-run
    (what a runner's bundle retry amounts to) re-does what is missing and skips what is complete."""
    out = tmp_path / "retried"
    real_embed, real_assign = stages.Embed.run_chunk, stages.Assign.run_chunk
    attempts = {"embed": [], "assign": []}

    def embed_dies_once(self, chunk, *args, **kwargs):
        attempts["embed"].append(chunk)
        if chunk == 2 and attempts["embed"].count(2) == 1:
            raise RuntimeError("worker died (embed, chunk 2)")
        return real_embed(self, chunk, *args, **kwargs)

    def assign_dies_once_after_writing(self, chunk, *args, **kwargs):
        attempts["assign"].append(chunk)
        written = real_assign(self, chunk, *args, **kwargs)
        if chunk == 3 and attempts["assign"].count(3) == 1:
            raise RuntimeError("worker died (assign, chunk 3, after its output was complete)")
        return written

    monkeypatch.setattr(stages.Embed, "run_chunk", embed_dies_once)
    monkeypatch.setattr(stages.Assign, "run_chunk", assign_dies_once_after_writing)
    with pytest.raises(Exception, match="worker died \\(embed, chunk 2\\)"):
        cluster.run(_beam(out))
    assert not (out / "embeddings" / "00002.npz").exists() and not (out / "centroids.npy").exists()
    with pytest.raises(Exception, match="worker died \\(assign, chunk 3"):
        cluster.run(_beam(out))
    assert (out / "shards" / f"shard-00003-of-0000{SHARDS}.array_record").exists()
    assert not (out / "manifest.json").exists()

    attempts["assign"].clear()
    manifest = cluster.run(_beam(out))
    assert 3 not in attempts["assign"], "a complete chunk is not re-done"
    assert attempts["embed"].count(2) == 2 and all(attempts["embed"].count(c) == 1 for c in (0, 1, 3, 4))
    _assert_same_output(out, manifest, local)
    keys = [r["key"] for r in _records(out)]
    assert keys == [f"digits/all/{i:08d}" for i in range(1797)]  # each record once, in source order
    want = {r["key"]: r["labels"].tolist() for r in _records(local[0])}
    assert {r["key"]: r["labels"].tolist() for r in _records(out)} == want
    assert not list(out.glob("**/.*.tmp"))


def test_corrupt_files_are_counted_like_the_local_job(tmp_path):
    from mlcd_jax.data.sources import load_arrays

    images, labels = load_arrays("digits", split="all", limit=150)
    folder = tmp_path / "images"
    _png_folder(folder, images, labels, [f"img{i:04d}.png" for i in range(150)])
    good_png = (folder / "class0" / "img0000.png").read_bytes()
    (folder / "class0" / "img0000a.png").write_bytes(good_png[: len(good_png) // 2])  # truncated
    (folder / "class3" / "img0100a.jpg").write_bytes(b"not a jpeg at all" * 10)
    kw = dict(source=f"folder:{folder}", num_clusters=8, top_l=2, shard_size=50, teacher_fit_samples=100)
    want = cluster.run(_config(tmp_path / "local", **kw))
    got = cluster.run(_beam(tmp_path / "beam", **kw))
    assert got["num_source_images"] == 152 and got["num_images"] == 150 and got["num_skipped"] == 2
    assert sorted(s["key"] for s in got["skipped"]) == ["class0/img0000a.png", "class3/img0100a.jpg"]
    assert _no_seconds(got) == _no_seconds(want)
    assert _bytes(tmp_path / "beam", "shards/*") == _bytes(tmp_path / "local", "shards/*")


def test_dry_run_prints_the_pipeline_options_and_writes_nothing(tmp_path):
    config = os.path.join(ROOT, "configs", "cluster", "beam_dataflow.py")
    out = subprocess.run(
        [sys.executable, "-m", "mlcd_jax.cluster", f"--config={config}:project=proj,bucket=bkt,gpu=nvidia-l4",
         f"--config.output_dir={tmp_path / 'out'}", "--config.source=digits:test", "--config.num_clusters=8",
         "--dry-run"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    plan = json.loads(out.stdout)
    assert plan["runner"] == "beam" and plan["beam_runner"] == "DataflowRunner" and plan["unknown_options"] == []
    assert plan["num_images"] == 360 and plan["num_chunks"] == 1 and plan["stages"][0] == "embed"
    options = plan["pipeline_options"]
    assert options["project"] == "proj" and options["temp_location"] == "gs://bkt/beam_tmp"
    assert options["machine_type"] == "g2-standard-8" and options["setup_file"] == "./setup.py"
    assert options["dataflow_service_options"] == ["worker_accelerator=type:nvidia-l4;count:1;install-nvidia-driver"]
    assert options["experiments"] == ["no_use_multiple_sdk_containers"]
    assert not (tmp_path / "out").exists()

    typo = cluster.run(_beam(tmp_path / "typo", dry_run=True, beam_options="--runner=FlinkRunner --flink_mastr=h:8081"))
    assert typo["beam_runner"] == "FlinkRunner" and typo["unknown_options"] == ["flink_mastr"]
    assert not (tmp_path / "typo").exists()


def test_bad_runner_settings_are_one_line_errors(tmp_path, monkeypatch):
    with pytest.raises(cluster.ClusterError, match="runner='spark': choose local or beam"):
        cluster.run(_config(tmp_path, runner="spark"))
    with pytest.raises(cluster.ClusterError, match="runner=beam spreads the chunks .* num_workers=1"):
        cluster.run(_beam(tmp_path, num_workers=2))
    monkeypatch.setitem(sys.modules, "apache_beam", None)  # as if apache-beam were not installed
    monkeypatch.delitem(sys.modules, "mlcd_jax.cluster.runners.beam", raising=False)
    monkeypatch.delattr(runners, "beam", raising=False)
    with pytest.raises(cluster.ClusterError, match=r"pip install 'mlcd_jax\[beam\]'"):
        cluster.run(_beam(tmp_path))


def test_gcs_output_dir_equals_local(local, gcs_bucket):
    out = f"{gcs_bucket}/run"
    manifest = cluster.run(_beam(out))
    ref, ref_manifest = local
    assert _no_seconds(manifest) == _no_seconds(ref_manifest)
    for name in [os.path.relpath(p, ref) for p in sorted(ref.glob("shards/*"))] + ["centroids.npy"]:
        assert epath.Path(out, name).read_bytes() == (ref / name).read_bytes(), name
    assert cluster.run(_beam(out)) == manifest
