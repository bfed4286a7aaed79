"""WebDataset tar shards (``wds:PATTERN``) as the clustering job's source: brace patterns, streamed tars
with captions and metadata, the same shards as the same images given as a folder (local runner with one
or two workers, Beam's DirectRunner, a ``gs://`` pattern on the GCS emulator), broken samples and a
truncated tar skipped and listed, each worker opening only its own tars, one-line errors."""

import io
import json
import os
import tarfile

import ml_collections
import pytest
from etils import epath

from mlcd_jax import cluster
from mlcd_jax.cluster.config import ClusterError
from mlcd_jax.data import augment, webdataset
from mlcd_jax.data.source_base import SourceError
from mlcd_jax.data.sources import load_arrays, open_source
from test_cluster import _bytes, _cli, _records

TARS, PER_TAR = 4, 60
DIRECT = "--runner=DirectRunner --direct_num_workers=1 --direct_running_mode=in_memory"


def _samples():
    """(tar stem, sample stem, PNG bytes, caption) of TARS x PER_TAR real digit images, in tar order."""
    images, labels = load_arrays("digits", split="all", limit=TARS * PER_TAR)
    out = []
    for i, (image, label) in enumerate(zip(images, labels)):
        out.append((f"{i // PER_TAR:03d}", f"{i:06d}", augment.encode_png(image), f"a photo of the digit {label}"))
    return out


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _write_tars(root, samples, extra=None):
    """img2dataset's layout: ``<stem>.png``, ``<stem>.txt``, ``<stem>.json`` per sample; ``extra[tar]``:
    more (name, bytes) members appended to that tar."""
    os.makedirs(root, exist_ok=True)
    by_tar = {}
    for tar_stem, stem, png, caption in samples:
        by_tar.setdefault(tar_stem, []).append((stem, png, caption))
    for tar_stem, items in by_tar.items():
        with tarfile.open(os.path.join(root, f"{tar_stem}.tar"), "w") as tar:
            for stem, png, caption in items:
                _add(tar, f"{stem}.png", png)
                _add(tar, f"{stem}.txt", caption.encode())
                _add(tar, f"{stem}.json", json.dumps({"key": stem, "status": "success"}).encode())
            for name, data in (extra or {}).get(tar_stem, []):
                _add(tar, name, data)


def _write_folder(root, samples):
    """The same images unpacked one folder per tar, captions as sibling .txt files."""
    for tar_stem, stem, png, caption in samples:
        os.makedirs(os.path.join(root, tar_stem), exist_ok=True)
        with open(os.path.join(root, tar_stem, f"{stem}.png"), "wb") as f:
            f.write(png)
        with open(os.path.join(root, tar_stem, f"{stem}.txt"), "w") as f:
            f.write(caption)


def _config(output_dir, source, **kw):
    c = ml_collections.ConfigDict(dict(
        source=source, output_dir=str(output_dir), num_clusters=12, top_l=3, kmeans_iters=4, shard_size=PER_TAR,
        progress=False, pixels_dim=16, teacher_fit_samples=10_000, decode_threads=2,
    ))
    c.update(kw)
    return c


def _same_job(a, b, manifest_a, manifest_b):
    """Byte-identical shards, centroids and teacher; the same manifest but for the source and timings."""
    for pattern in ("shards/*", "centroids.npy", "teacher.npz"):
        assert _bytes(a, pattern) == _bytes(b, pattern), pattern
    drop = ("seconds", "source", "settings")
    assert {k: v for k, v in manifest_a.items() if k not in drop} == {k: v for k, v in manifest_b.items() if k not in drop}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("wds")
    samples = _samples()
    _write_tars(root / "tars", samples)
    _write_folder(root / "folder", samples)
    folder_out = root / "folder_out"
    return root, samples, folder_out, cluster.run(_config(folder_out, f"folder:{root / 'folder'}"))


def test_expand_braces():
    assert webdataset.expand_braces("d/{000..002}.tar") == ["d/000.tar", "d/001.tar", "d/002.tar"]
    assert webdataset.expand_braces("{a,b}/{8..10}.tar") == ["a/8.tar", "a/9.tar", "a/10.tar", "b/8.tar", "b/9.tar",
                                                             "b/10.tar"]
    assert webdataset.expand_braces("gs://b/x.tar") == ["gs://b/x.tar"]
    with pytest.raises(SourceError, match="counts down"):
        webdataset.expand_braces("{3..1}.tar")
    with pytest.raises(SourceError, match="unbalanced"):
        webdataset.expand_braces("{000..003.tar")


def test_tar_samples_carry_key_image_caption_and_skip_metadata(data):
    root, samples, _, _ = data
    source = webdataset.WebDatasetSource(f"{root}/tars/{{000..003}}.tar")
    assert source.num_shards == TARS
    got = list(source.read(1))
    assert [s.key for s in got] == [f"001/{stem}.png" for t, stem, _, _ in samples if t == "001"]
    assert got[0].image == samples[PER_TAR][2] and got[0].caption == samples[PER_TAR][3]
    # the glob form names the same tars; the folder source gives the same keys
    assert webdataset.WebDatasetSource(f"{root}/tars/*.tar").shards == source.shards
    assert open_source(f"folder:{root}/folder").key(PER_TAR) == got[0].key


def test_wds_job_equals_the_same_images_as_a_folder(data):
    root, _, folder_out, folder_manifest = data
    out = root / "wds_out"
    manifest = cluster.run(_config(out, f"wds:{root}/tars/{{000..003}}.tar"))
    _same_job(out, folder_out, manifest, folder_manifest)
    assert manifest["num_images"] == manifest["num_source_images"] == TARS * PER_TAR
    assert {r["caption"] for r in _records(out)} >= {"a photo of the digit 0"}
    assert cluster.run(_config(out, f"wds:{root}/tars/{{000..003}}.tar")) == manifest  # finished: a no-op


def test_a_glob_that_matches_another_tar_is_not_resumed(data, tmp_path):
    root = data[0]
    os.makedirs(tmp_path / "tars")
    for i in range(3):
        os.link(root / "tars" / f"{i:03d}.tar", tmp_path / "tars" / f"{i:03d}.tar")
    config = _config(tmp_path / "out", f"wds:{tmp_path}/tars/*.tar", stages="embed")
    cluster.run(config)
    os.link(root / "tars" / "003.tar", tmp_path / "tars" / "003.tar")
    with pytest.raises(ClusterError, match="changed since"):
        cluster.run(config)


def test_two_workers_open_only_their_own_tars(data, monkeypatch):
    """Worker 0 fits the pixels teacher on the first tar's images (teacher_fit_samples = one tar)."""
    root = data[0]
    spec = f"wds:{root}/tars/{{000..003}}.tar"
    one = root / "one_worker"
    one_manifest = cluster.run(_config(one, spec, teacher_fit_samples=PER_TAR))
    out = root / "two_workers"
    opened = {0: set(), 1: set()}
    real_read = webdataset.WebDatasetSource.read
    worker = {"index": 0}

    def recording_read(self, shard):
        opened[worker["index"]].add(shard)
        return real_read(self, shard)

    monkeypatch.setattr(webdataset.WebDatasetSource, "read", recording_read)
    for stages, index in [("embed", 0), ("embed", 1), ("kmeans", 0), ("assign", 1), ("assign", 0)]:
        worker["index"] = index
        status = cluster.run(_config(out, spec, num_workers=2, worker_index=index, stages=stages,
                                     teacher_fit_samples=PER_TAR))
        assert status["chunks"] == ([0, 1] if index == 0 else [2, 3])
    assert opened == {0: {0, 1}, 1: {2, 3}}
    manifest = cluster.run(_config(out, spec, num_workers=2, worker_index=0, stages="finalize",
                                   teacher_fit_samples=PER_TAR))
    _same_job(out, one, manifest, one_manifest)


def test_beam_direct_runner_reads_wds(data):
    root, _, folder_out, folder_manifest = data
    out = root / "beam_out"
    manifest = cluster.run(_config(out, f"wds:{root}/tars/{{000..003}}.tar", runner="beam", beam_options=DIRECT))
    _same_job(out, folder_out, manifest, folder_manifest)


def test_gs_pattern_on_the_gcs_emulator(data, gcs_bucket):
    root, _, folder_out, folder_manifest = data
    bucket = epath.Path(gcs_bucket)
    for i in range(TARS):
        (bucket / "laion" / f"{i:03d}.tar").write_bytes((root / "tars" / f"{i:03d}.tar").read_bytes())
    assert webdataset.WebDatasetSource(f"{gcs_bucket}/laion/*.tar").shards == [
        f"{gcs_bucket}/laion/{i:03d}.tar" for i in range(TARS)]
    out = root / "gs_out"
    manifest = cluster.run(_config(out, f"wds:{gcs_bucket}/laion/{{000..003}}.tar"))
    _same_job(out, folder_out, manifest, folder_manifest)


def test_broken_samples_and_a_truncated_tar_are_skipped_and_listed(data, tmp_path):
    root, samples, _, _ = data
    png = samples[0][2]
    extra = {"000": [("zz_no_image.txt", b"a caption without its image"),
                     ("zz_bad.png", b"not a png"), ("zz_bad.txt", b"bad")]}
    _write_tars(tmp_path / "tars", samples, extra)
    tar3 = (tmp_path / "tars" / "003.tar").read_bytes()
    cut = tar3.index(samples[3 * PER_TAR + 10][1].encode() + b".png") + 512 + len(png) // 2  # mid-image of sample 10
    (tmp_path / "tars" / "003.tar").write_bytes(tar3[:cut])
    manifest = cluster.run(_config(tmp_path / "out", f"wds:{tmp_path}/tars/{{000..003}}.tar"))
    skipped = {s["key"]: s["error"] for s in manifest["skipped"]}
    assert set(skipped) == {"000/zz_no_image", "000/zz_bad.png", f"003/{samples[3 * PER_TAR + 10][1]}"}
    assert "no image member" in skipped["000/zz_no_image"]
    assert "ends early after 10 whole samples" in skipped[f"003/{samples[3 * PER_TAR + 10][1]}"]
    good = 3 * PER_TAR + 10
    assert manifest["num_images"] == good and manifest["num_skipped"] == 3
    assert manifest["num_source_images"] == good + 3
    assert sorted(r["key"] for r in _records(tmp_path / "out")) == sorted(
        f"{t}/{stem}.png" for t, stem, _, _ in samples[:good])


@pytest.mark.parametrize("source, extra, message", [
    ("wds:DIR/tars/{000..004}.tar", [], "cannot be opened"),
    ("wds:DIR/nothing/*.tar", [], "matches no tar files"),
    ("wds:DIR/tars/{000..003}.tar", ["--config.limit=10"], "limit does not apply"),
])
def test_wds_mistakes_are_one_line(data, tmp_path, source, extra, message):
    root = data[0]
    out = _cli(tmp_path, f"--config.source={source.replace('DIR', str(root))}", "--config.num_clusters=8", *extra)
    assert out.returncode != 0 and message in out.stderr and "Traceback" not in out.stderr, out.stderr[-2000:]


def test_decoding_on_processes_gives_the_same_job(data):
    """decode_processes: the tar (and a folder's files) decoded on spawned workers, the same bytes out."""
    root, _, folder_out, folder_manifest = data
    for name, source in (("wds_procs", f"wds:{root}/tars/{{000..003}}.tar"), ("folder_procs", f"folder:{root}/folder")):
        manifest = cluster.run(_config(root / name, source, decode_processes=2))
        _same_job(root / name, folder_out, manifest, folder_manifest)


def test_the_cli_clusters_a_wds_pattern(data, tmp_path):
    root = data[0]
    out = _cli(tmp_path, f"--config.source=wds:{root}/tars/{{000..003}}.tar", "--config.num_clusters=8",
               "--config.top_l=2", f"--config.shard_size={PER_TAR}")
    assert out.returncode == 0, out.stderr[-2000:]
    assert f'"num_images": {TARS * PER_TAR}' in out.stdout
    assert len(list((tmp_path / "out" / "shards").iterdir())) == TARS


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
@pytest.mark.parametrize("compressed", [False, True])
def test_the_tar_reader_agrees_with_tarfile(tmp_path, fmt, compressed):
    """Long names (GNU 'L' members, PAX path records, ustar prefixes), non-ASCII names, directories,
    empty files, gzip: the lean reader yields what tarfile extracts."""
    names = ["a/000001.jpg", "a/000001.txt", "d" * 120 + "/long.jpg", "x" * 150 + ".png",
             "caf\u00e9/\u00e9t\u00e9.jpg", "empty.txt"]
    if fmt == tarfile.USTAR_FORMAT:  # ustar: names up to 100 chars after a prefix of up to 155, ASCII
        names = ["a/000001.jpg", "a/000001.txt", "d" * 120 + "/long.jpg", "empty.txt"]
    path = tmp_path / ("t.tar.gz" if compressed else "t.tar")
    with tarfile.open(path, "w:gz" if compressed else "w", format=fmt) as tar:
        info = tarfile.TarInfo("a")
        info.type = tarfile.DIRTYPE
        tar.addfile(info)
        for i, name in enumerate(names):
            _add(tar, name, bytes([i]) * (0 if name == "empty.txt" else 700 * (i + 1)))
    with tarfile.open(path) as tar:
        want = [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]
    with open(path, "rb") as f:
        assert list(webdataset._members(f)) == want


def test_the_tar_reader_flags_corruption_and_accepts_a_missing_end_marker(tmp_path):
    path = tmp_path / "t.tar"
    with tarfile.open(path, "w") as tar:
        _add(tar, "k.jpg", b"x" * 1000)
        _add(tar, "k.txt", b"caption")
    raw = path.read_bytes()
    whole = 512 + 1024 + 512 + 512  # two members with their headers, no end-of-archive blocks
    assert [n for n, _ in webdataset._members(io.BytesIO(raw[:whole]))] == ["k.jpg", "k.txt"]
    with pytest.raises(webdataset.TarError, match="ends inside a member"):
        list(webdataset._members(io.BytesIO(raw[:700])))
    bad = bytearray(raw)
    bad[512 + 1024 + 3] ^= 0xFF  # the second header's name
    with pytest.raises(webdataset.TarError, match="checksum"):
        list(webdataset._members(io.BytesIO(bytes(bad))))


def test_a_repeated_key_is_skipped_and_listed(tmp_path):
    """Issue 31 case 8: a key repeated in a tar became two records with the same key."""
    path = tmp_path / "000.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in (("a.png", b"A"), ("a.txt", b"first"), ("b.png", b"B"), ("a.png", b"again"),
                           ("c.png", b"C"), ("c.png", b"C twice")):
            _add(tar, name, data)
    with open(path, "rb") as stream:
        out = list(webdataset._samples(stream, "000", str(path)))
    kept = [s.key for s in out if isinstance(s, webdataset.Sample)]
    skipped = {s.key: s.error for s in out if isinstance(s, webdataset.Skipped)}
    assert kept == ["000/a.png", "000/b.png"]
    assert "repeats this key after other samples" in skipped["000/a"]
    assert "holds a member of this sample twice" in skipped["000/c"]


def test_a_gzip_of_garbage_is_named_as_not_a_tar(tmp_path):
    import gzip

    path = tmp_path / "000.tar"
    path.write_bytes(gzip.compress(os.urandom(4096)))
    with open(path, "rb") as stream:
        (skipped,) = webdataset._samples(stream, "000", str(path))
    assert "it is not a tar (gzip-compressed data that holds no tar)" in skipped.error
