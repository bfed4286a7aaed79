"""The offline clustering job on images: digits, a generated Fashion-MNIST (IDX files, conftest.py), a folder of PNGs."""

import functools
import glob
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordReader

from mlcd_jax import cluster
from mlcd_jax.cluster import kmeans, stages
from mlcd_jax.data import augment, records
from mlcd_jax.data.sources import load_arrays


def _config(output_dir, source, **kw):
    c = ml_collections.ConfigDict(dict(
        source=source, limit=3000, output_dir=str(output_dir), num_clusters=32, top_l=4,
        kmeans_iters=6, shard_size=700, progress=False, pixels_dim=32, teacher_fit_samples=1000,
    ))
    c.update(kw)
    return c


def _read_shard(path):
    reader = ArrayRecordReader(path)
    out = [records.decode(r) for r in reader.read_all()]
    reader.close()
    return out


def _records(output_dir):
    return [r for p in sorted(glob.glob(os.path.join(output_dir, "shards", "*.array_record"))) for r in _read_shard(p)]


def _bytes(output_dir, pattern):
    return {os.path.relpath(p, output_dir): open(p, "rb").read()
            for p in sorted(glob.glob(os.path.join(output_dir, pattern), recursive=True))}


@pytest.fixture(scope="module")
def fm_config(fashion_mnist):
    """``_config`` on the generated Fashion-MNIST's training split."""
    return functools.partial(_config, source=f"{fashion_mnist.spec}:train")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, fm_config):
    """One uninterrupted 1-worker run on the first 3,000 generated Fashion-MNIST training images."""
    out = tmp_path_factory.mktemp("reference")
    manifest = cluster.run(fm_config(out))
    return out, manifest


def test_job_outputs(reference, fashion_mnist):
    out, m = reference
    assert m["num_images"] == 3000 and m["num_skipped"] == 0 and m["num_clusters"] == 32 and m["top_l"] == 4
    assert [s["num_records"] for s in m["shards"]] == [700, 700, 700, 700, 200]
    centroids = np.load(out / "centroids.npy")
    assert centroids.shape == (32, 32)
    np.testing.assert_allclose(np.linalg.norm(centroids, axis=1), 1, atol=1e-5)
    sizes = m["cluster_sizes_top1"]
    assert sizes["largest"] >= 3000 / 32 >= sizes["smallest_nonempty"] > 0
    assert 0 < m["mean_topl_cosine"] < m["mean_top1_cosine"] <= 1
    assert set(m["seconds"]) >= {"embed", "kmeans", "assign", "write", "teacher_fit"}

    recs = _records(out)
    images, _ = load_arrays(fashion_mnist.spec, split="train", limit=3000)
    np.testing.assert_array_equal(images[..., 0], fashion_mnist.images["train"][:3000])
    assert [r["key"] for r in recs] == [f"fashion_mnist/train/{i:08d}" for i in range(3000)]
    for i in (0, 1234, 2999):
        np.testing.assert_array_equal(augment.decode_image(recs[i]["image"]), images[i])  # lossless
    # labels are the nearest centroids of the teacher's embedding, best first
    teacher = cluster.load_teacher(str(out))
    emb = kmeans.l2_normalize(teacher(images[:50]))
    cos = emb @ centroids.T
    for i in range(50):
        assert recs[i]["labels"][0] == np.argmax(cos[i])
        np.testing.assert_allclose(recs[i]["scores"], np.sort(cos[i])[::-1][:4], atol=2e-2)  # fp16 storage
        assert np.all(np.diff(recs[i]["scores"]) <= 0)


def test_finished_job_rerun_is_a_noop(reference, fm_config):
    out, m = reference
    before = {p: (os.stat(p).st_mtime_ns, open(p, "rb").read()) for p in glob.glob(f"{out}/**", recursive=True)
              if os.path.isfile(p)}
    assert cluster.run(fm_config(out)) == m
    after = {p: (os.stat(p).st_mtime_ns, open(p, "rb").read()) for p in glob.glob(f"{out}/**", recursive=True)
             if os.path.isfile(p)}
    assert after == before


def test_other_settings_in_the_same_dir_are_refused(reference, fm_config):
    out, _ = reference
    with pytest.raises(cluster.ClusterError, match="other settings.*num_clusters"):
        cluster.run(fm_config(out, num_clusters=16))


def test_killed_job_resumes_to_identical_output(reference, fm_config, tmp_path, monkeypatch):
    ref, _ = reference
    out = tmp_path / "killed"

    real_step, calls = kmeans.lloyd_step, []

    def dying_step(*args, **kwargs):  # the job dies during k-means iteration 4
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt("killed")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(kmeans, "lloyd_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        cluster.run(fm_config(out))
    assert len(glob.glob(f"{out}/embeddings/*.npz")) == 5 and not (out / "centroids.npy").exists()
    with np.load(out / "kmeans" / "state.npz") as z:
        assert int(z["iteration"]) == 3

    real_write, writes = stages.write_shard, []

    def dying_write(path, encoded):  # then dies while writing the third shard
        writes.append(path)
        if len(writes) == 3:
            next(iter(encoded))
            raise KeyboardInterrupt("killed")
        return real_write(path, encoded)

    calls.clear()
    monkeypatch.setattr(stages, "write_shard", dying_write)
    with pytest.raises(KeyboardInterrupt):
        cluster.run(fm_config(out))
    assert len(calls) == 6 - 3, "k-means resumed from its checkpoint"
    assert len(glob.glob(f"{out}/shards/*.array_record")) == 2 and not (out / "manifest.json").exists()

    monkeypatch.setattr(stages, "write_shard", real_write)
    m = cluster.run(fm_config(out))
    assert m["num_images"] == 3000
    assert _bytes(out, "shards/*") == _bytes(ref, "shards/*")
    assert _bytes(out, "centroids.npy") == _bytes(ref, "centroids.npy")
    assert not glob.glob(f"{out}/**/.*.tmp", recursive=True)


def test_workers_union_equals_one_worker(reference, fm_config, tmp_path):
    ref, ref_manifest = reference
    out = tmp_path / "two"
    for stages, worker in [("embed", 0), ("embed", 1), ("kmeans", 0), ("assign", 1), ("assign", 0)]:
        status = cluster.run(fm_config(out, num_workers=2, worker_index=worker, stages=stages))
        assert status["chunks"] == ([0, 1] if worker == 0 else [2, 3, 4])
    with pytest.raises(cluster.ClusterError, match="kmeans stage|worker 0"):
        cluster.run(fm_config(tmp_path / "other", stages="assign", wait_timeout_s=0.1, num_workers=2, worker_index=1))
    m = cluster.run(fm_config(out, num_workers=2, worker_index=0, stages="finalize"))
    assert _bytes(out, "shards/*") == _bytes(ref, "shards/*")
    assert _bytes(out, "centroids.npy") == _bytes(ref, "centroids.npy")
    drop = ("seconds",)
    assert {k: v for k, v in m.items() if k not in drop} == {k: v for k, v in ref_manifest.items() if k not in drop}


def test_threshold_assignment_pads_with_minus_one(tmp_path):
    m = cluster.run(_config(tmp_path, source="digits:all", limit=0, num_clusters=16, top_l=5, assign="threshold",
                            threshold=0.8, shard_size=2000))
    assert m["label_padding"] == "label -1, score -inf" and 1 <= m["mean_positives"] < 5
    recs = _records(tmp_path)
    assert len(recs) == 1797
    counts = [(r["labels"] >= 0).sum() for r in recs]
    assert min(counts) >= 1 and max(counts) <= 5 and min(counts) < max(counts)
    for r in recs:
        n = (r["labels"] >= 0).sum()
        assert (r["labels"][n:] == -1).all() and np.isneginf(r["scores"][n:]).all()
        assert (r["scores"][1:n] >= 0.8).all()


def _png_folder(root, images, labels, names):
    for image, label, name in zip(images, labels, names):
        os.makedirs(root / f"class{label}", exist_ok=True)
        (root / f"class{label}" / name).write_bytes(augment.encode_png(image))


def test_corrupt_files_are_skipped_listed_and_shift_no_label(tmp_path):
    images, labels = load_arrays("digits", split="all", limit=400)
    names = [f"img{i:04d}.png" for i in range(400)]
    clean, dirty = tmp_path / "clean", tmp_path / "dirty"
    _png_folder(clean, images, labels, names)
    _png_folder(dirty, images, labels, names)
    good_png = augment.encode_png(images[0])
    (dirty / "class0" / "img0000a.png").write_bytes(good_png[: len(good_png) // 2])  # truncated
    (dirty / "class3" / "img0100a.jpg").write_bytes(b"not a jpeg at all" * 10)
    (dirty / "class7" / "img0200a.png").write_bytes(b"")
    kw = dict(limit=0, num_clusters=10, top_l=3, shard_size=150)
    want = cluster.run(_config(tmp_path / "out_clean", source=f"folder:{clean}", **kw))
    got = cluster.run(_config(tmp_path / "out_dirty", source=f"folder:{dirty}", **kw))
    assert got["num_source_images"] == 403 and got["num_images"] == 400 and got["num_skipped"] == 3
    assert sorted(s["key"] for s in got["skipped"]) == [
        "class0/img0000a.png", "class3/img0100a.jpg", "class7/img0200a.png"]
    assert all(s["error"] for s in got["skipped"])
    by_key = {r["key"]: r for r in _records(tmp_path / "out_clean")}
    dirty_recs = _records(tmp_path / "out_dirty")
    assert sorted(r["key"] for r in dirty_recs) == sorted(by_key)
    for r in dirty_recs:
        np.testing.assert_array_equal(r["labels"], by_key[r["key"]]["labels"])
    assert want["num_skipped"] == 0


def _cli(tmp_path, *flags):
    cmd = [sys.executable, "-m", "mlcd_jax.cluster",
           f"--config={os.path.join(os.path.dirname(__file__), '..', 'configs', 'cluster', 'default.py')}",
           f"--config.output_dir={tmp_path / 'out'}", "--config.progress=False", *flags]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("flags, message", [
    (["--config.source=folder:EMPTY"], "has no images"),
    (["--config.source=digits:test", "--config.num_clusters=1000"], "num_clusters=1000 is more than the 360"),
    (["--config.source=digits:test", "--config.num_clusters=8", "--config.teacher=dino:/x"],
     "unknown teacher 'dino:/x'"),
    (["--config.source=digits:test", "--config.num_clusters=8", "--config.teacher=checkpoint:/x"],
     "is not a mlcd_jax training workdir"),
    (["--config.source=nosuch"], "unknown source 'nosuch'"),
])
def test_bad_input_exits_nonzero_with_a_clear_error(tmp_path, flags, message):
    (tmp_path / "empty").mkdir()
    flags = [f.replace("EMPTY", str(tmp_path / "empty")) for f in flags]
    out = _cli(tmp_path, *flags)
    assert out.returncode != 0
    assert message in out.stderr and "Traceback" not in out.stderr, out.stderr[-2000:]


def test_cli_runs_digits(tmp_path):
    out = _cli(tmp_path, "--config.source=digits:test", "--config.num_clusters=8", "--config.top_l=2")
    assert out.returncode == 0, out.stderr[-2000:]
    assert '"num_images": 360' in out.stdout
    assert (tmp_path / "out" / "manifest.json").exists()


def test_hf_teacher_clusters_with_the_checkpoints_pooled_features(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from mlcd_jax.data.pipeline import preprocess_eval

    torch.manual_seed(0)
    cfg = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, image_size=32, patch_size=8)
    transformers.CLIPVisionModel(cfg).save_pretrained(tmp_path / "tiny")
    m = cluster.run(_config(tmp_path / "out", source="digits:test", limit=0, teacher=f"hf:{tmp_path / 'tiny'}",
                            num_clusters=8, top_l=2))
    assert m["num_images"] == 360 and m["embedding_dim"] == 32
    images, _ = load_arrays("digits", split="test", limit=4)
    ours = cluster.load_teacher(str(tmp_path / "out"))(images)
    pixels = torch.from_numpy(preprocess_eval(images, 32)).permute(0, 3, 1, 2)
    with torch.no_grad():
        want = transformers.CLIPVisionModel.from_pretrained(tmp_path / "tiny")(pixel_values=pixels).pooler_output
    np.testing.assert_allclose(ours, want.numpy(), atol=1e-4)
