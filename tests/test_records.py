"""Record schema (round trip, lossless images, versioning and corruption errors) and the image sources
that fill records: the IDX reader, tfds datasets and the demo's choice (and download) of data."""

import functools
import gzip
import http.server
import os
import shutil
import socket
import struct
import threading
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds

from mlcd_jax.data import augment, records
from mlcd_jax.data.sources import fashion_mnist as fmnist  # "fashion_mnist" is a fixture here
from mlcd_jax.data.source_base import CAPTION_TEMPLATES, SourceError
from mlcd_jax.data.sources import class_names, load_arrays, open_source


def _record(**overrides):
    args = dict(image=augment.encode_png(np.arange(64, dtype=np.uint8).reshape(8, 8)),
                labels=np.array([5, 2, 9], np.int32), scores=np.array([0.9, 0.5, -0.1], np.float32),
                key="a/b.png", caption="a caption ü")
    args.update(overrides)
    return args


def test_round_trip_keeps_every_field():
    args = _record()
    out = records.decode(records.encode(**args))
    assert out["image"] == args["image"] and out["key"] == "a/b.png" and out["caption"] == "a caption ü"
    np.testing.assert_array_equal(out["labels"], args["labels"])
    np.testing.assert_array_equal(out["scores"], args["scores"])
    assert out["labels"].dtype == np.int32 and out["scores"].dtype == np.float32
    assert records.decode(records.encode(**_record(caption=None)))["caption"] is None


def test_raw_pixel_sources_store_exact_pixels(fashion_mnist):
    images, labels = load_arrays("digits", split="train", limit=20)
    source = open_source("digits:train")
    for i in range(20):
        item = source[i]
        rec = records.decode(records.encode(item["image"], [1], [1.0], item["key"]))
        np.testing.assert_array_equal(augment.decode_image(rec["image"]), images[i])
        assert item["label"] == labels[i]
    fm = open_source(f"{fashion_mnist.spec}:test")
    fm_images, fm_labels = load_arrays(fashion_mnist.spec, split="test", limit=3)
    np.testing.assert_array_equal(augment.decode_image(fm[2]["image"]), fm_images[2])
    assert fm_images.shape == (3, 28, 28, 1) and fm_images.dtype == np.uint8 and fm_labels.dtype == np.int64
    np.testing.assert_array_equal(fm_images[..., 0], fashion_mnist.images["test"][:3])
    np.testing.assert_array_equal(fm_labels, fashion_mnist.labels["test"][:3])
    assert len(fm) == len(fashion_mnist.labels["test"]) and fm[2]["label"] == fashion_mnist.labels["test"][2]
    everything, _ = load_arrays(fashion_mnist.spec, split="all")
    np.testing.assert_array_equal(everything[..., 0], np.concatenate([fashion_mnist.images[s] for s in ("train", "test")]))


# ---------------------------------------------------------------- IDX files


@pytest.mark.parametrize("name", ["images-idx3-ubyte", "images-idx3-ubyte.gz"])
def test_idx_reader_round_trips_header_shape_and_dtype(tmp_path, write_idx, name):
    array = np.random.default_rng(0).integers(0, 256, (5, 3, 4), dtype=np.uint8)
    write_idx(tmp_path / name, array)
    assert (tmp_path / name).read_bytes()[:2] == (b"\x1f\x8b" if name.endswith(".gz") else b"\x00\x00")
    got = fmnist.read_idx(str(tmp_path / name))
    assert got.dtype == np.uint8 and got.shape == (5, 3, 4)
    np.testing.assert_array_equal(got, array)
    write_idx(tmp_path / name, array[:, 0, 0])  # labels: one dimension
    np.testing.assert_array_equal(fmnist.read_idx(str(tmp_path / name)), array[:, 0, 0])


def test_idx_reader_rejects_other_types_and_broken_files(tmp_path, write_idx):
    write_idx(tmp_path / "floats.gz", np.zeros((2, 3), np.float32))
    with pytest.raises(SourceError, match=r"floats.gz holds IDX data type 0x0d; only unsigned bytes \(0x08\)"):
        fmnist.read_idx(str(tmp_path / "floats.gz"))
    write_idx(tmp_path / "short", np.zeros((4, 5), np.uint8))
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-1])
    with pytest.raises(SourceError, match=r"short holds 19 bytes of data, its header declares \(4, 5\)"):
        fmnist.read_idx(str(tmp_path / "short"))
    (tmp_path / "png").write_bytes(augment.encode_png(np.zeros((2, 2), np.uint8)))
    with pytest.raises(SourceError, match="png is not an IDX file"):
        fmnist.read_idx(str(tmp_path / "png"))
    with pytest.raises(SourceError, match="train-images-idx3-ubyte.*not found in .*pass fashion_mnist:DIR"):
        open_source(f"fashion_mnist:{tmp_path}:train")


@pytest.mark.skipif(not fmnist.installed(),
                    reason=f"needs the real Fashion-MNIST: Debian's dataset-fashion-mnist ({fmnist.FASHION_MNIST_DIR})")
def test_debian_fashion_mnist_has_its_published_sizes():
    train, test = open_source("fashion_mnist"), open_source("fashion_mnist:test")
    assert (len(train), len(test)) == (60_000, 10_000)
    images, labels = load_arrays("fashion_mnist", split="test", limit=100)
    assert images.shape == (100, 28, 28, 1) and images.dtype == np.uint8 and set(labels) == set(range(10))


# ---------------------------------------------------------------- tfds


def test_tfds_source_reads_an_mnist_style_dataset_like_the_idx_files(fashion_mnist, tmp_path, monkeypatch):
    """A tiny tfds dataset built here (PNG bytes in, so no TensorFlow) reads back as the IDX path does."""
    n = {"train": 12, "test": 5}

    class MlcdTestGarments(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(28, 28, 1)), "label": tfds.features.ClassLabel(num_classes=10)}))

        def _split_generators(self, dl_manager):
            return {split: self._generate_examples(split) for split in n}

        def _generate_examples(self, split):
            for i in range(n[split]):
                yield i, {"image": augment.encode_png(fashion_mnist.images[split][i]),
                          "label": int(fashion_mnist.labels[split][i])}

    monkeypatch.setattr(tfds.core.constants, "DATA_DIR", str(tmp_path))
    tfds.builder("mlcd_test_garments", file_format="array_record").download_and_prepare()
    source = open_source("tfds:mlcd_test_garments:train")
    assert len(source) == 12 and isinstance(source[0]["image"], bytes) and source[0]["key"].startswith("mlcd_test")
    item = source[0]  # ClassLabel without names given: the label's string form, in a caption template
    assert item["caption"] in {t.format(str(item["label"])) for t in CAPTION_TEMPLATES}
    images, labels = load_arrays("tfds:mlcd_test_garments", split="test")
    assert images.shape == (5, 28, 28, 1) and images.dtype == np.uint8 and labels.dtype == np.int64
    # tfds stores examples in its own order: compare as (label, pixels) multisets
    want = sorted((int(y), x.tobytes()) for x, y in zip(fashion_mnist.images["test"][:5], fashion_mnist.labels["test"]))
    assert sorted((int(y), x[..., 0].tobytes()) for x, y in zip(images, labels)) == want
    with pytest.raises(SourceError, match="tfds:mlcd_test_garments:validation is not available locally"):
        open_source("tfds:mlcd_test_garments:validation")


def test_a_manual_download_dataset_is_prepared_from_its_manual_dir_then_read(fashion_mnist, tmp_path, monkeypatch):
    """ImageNet's path, with a stand-in: a tfds builder that only reads files put in its manual_dir (as
    imagenet2012 reads the ILSVRC2012 tars). Unprepared, the source names the command that prepares it;
    that command, run as printed, makes the ArrayRecord files the source then reads; the evaluation's
    test split is its validation split (its test split is unlabelled, as imagenet2012's)."""
    from mlcd_jax.data.sources.tfds import prepare_command

    class MlcdTestManual(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")
        MANUAL_DOWNLOAD_INSTRUCTIONS = "put images.npy and labels.npy in manual_dir"

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(28, 28, 1)),
                "label": tfds.features.ClassLabel(names=["t-shirt", "trouser", "pullover", "dress", "coat",
                                                         "sandal", "shirt", "sneaker", "bag", "ankle boot"])}))

        def _split_generators(self, dl_manager):
            return {split: self._generate_examples(dl_manager.manual_dir, split) for split in ("validation", "test")}

        def _generate_examples(self, manual_dir, split):
            images, labels = np.load(manual_dir / "images.npy"), np.load(manual_dir / "labels.npy")
            for i, (x, y) in enumerate(zip(images, labels)):  # the test split unlabelled (-1), as imagenet2012's
                yield i, {"image": augment.encode_png(x), "label": int(y) if split == "validation" else -1}

    monkeypatch.setattr(tfds.core.constants, "DATA_DIR", str(tmp_path / "tfds"))
    with pytest.raises(SourceError, match="prepare it once in ArrayRecord format: python -c .*manual_dir='DIR'"):
        open_source("tfds:mlcd_test_manual:validation")
    manual = tmp_path / "manual"
    manual.mkdir()
    np.save(manual / "images.npy", fashion_mnist.images["test"][:7, :, :, None])
    np.save(manual / "labels.npy", fashion_mnist.labels["test"][:7])
    command = prepare_command("mlcd_test_manual").replace("DIR", str(manual))
    exec(command.removeprefix('python -c "').removesuffix('"'))  # in this process: the builder class is here
    images, labels = load_arrays("tfds:mlcd_test_manual", split="test")  # the evaluation's split: validation here
    assert images.shape == (7, 28, 28, 1) and sorted(labels.tolist()) == sorted(fashion_mnist.labels["test"][:7].tolist())
    assert class_names("tfds:mlcd_test_manual")[7] == "sneaker"


# ---------------------------------------------------------------- the demo's data


@pytest.fixture
def no_debian_fashion_mnist(tmp_path, monkeypatch):
    monkeypatch.setattr(fmnist, "FASHION_MNIST_DIR", str(tmp_path / "absent"))


@pytest.fixture
def cache_root(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("MLCD_JAX_CACHE", str(root))
    return root


class _QuietFiles(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def fashion_mnist_host(fashion_mnist, tmp_path, monkeypatch):
    """A local HTTP server in place of Fashion-MNIST's download host, serving the generated IDX files
    (delete some from ``host.served`` to make a download fail midway); yields the served folder."""
    served = tmp_path / "served"
    shutil.copytree(fashion_mnist.directory, served)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietFiles, directory=served))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}/"
    monkeypatch.setattr(fmnist, "_fashion_mnist_urls", lambda: {n: base + n for n in fmnist.FASHION_MNIST_FILES})
    yield served
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("gzipped", [True, False])
def test_demo_source_prefers_debian_fashion_mnist(fashion_mnist, cache_root, tmp_path, monkeypatch, capsys, gzipped):
    """The Debian folder's IDX files count gzipped (as Debian ships them) or not (as the reader takes them)."""
    folder = tmp_path / "debian"
    folder.mkdir()
    for name in fmnist.FASHION_MNIST_FILES:
        data = (fashion_mnist.directory / name).read_bytes()
        if not gzipped:
            name, data = name.removesuffix(".gz"), gzip.decompress(data)
        (folder / name).write_bytes(data)
    monkeypatch.setattr(fmnist, "FASHION_MNIST_DIR", str(folder))
    monkeypatch.setattr(fmnist, "_downloadable", lambda url: pytest.fail("probed the network"))
    assert fmnist.demo_source() == "fashion_mnist" and capsys.readouterr().out == ""
    assert len(open_source("fashion_mnist:train")) == len(fashion_mnist.labels["train"])


def test_demo_source_passes_over_an_empty_debian_folder(tmp_path, cache_root, fashion_mnist, monkeypatch, capsys):
    """A folder without the IDX files (say left by a removed package) is not Fashion-MNIST: the demo
    goes on to the download cache (here complete), as on a machine without the folder."""
    (tmp_path / "debian").mkdir()
    monkeypatch.setattr(fmnist, "FASHION_MNIST_DIR", str(tmp_path / "debian"))
    shutil.copytree(fashion_mnist.directory, cache_root / "fashion_mnist")
    monkeypatch.setattr(fmnist, "_downloadable", lambda url: pytest.fail("probed the network"))
    assert fmnist.demo_source() == f"fashion_mnist:{cache_root / 'fashion_mnist'}" and capsys.readouterr().out == ""


def test_demo_source_uses_a_complete_download_cache_without_the_network(no_debian_fashion_mnist, cache_root,
                                                                       fashion_mnist, monkeypatch, capsys):
    shutil.copytree(fashion_mnist.directory, cache_root / "fashion_mnist")
    monkeypatch.setattr(fmnist, "_downloadable", lambda url: pytest.fail("probed the network"))
    monkeypatch.setattr(fmnist, "_fashion_mnist_urls", lambda: pytest.fail("looked up the download"))
    spec = fmnist.demo_source()
    assert spec == f"fashion_mnist:{cache_root / 'fashion_mnist'}" and capsys.readouterr().out == ""
    # as configs/demo.py uses it: f"{spec}:train" to cluster, spec (with a split) to evaluate
    assert len(open_source(f"{spec}:train")) == len(fashion_mnist.labels["train"])
    np.testing.assert_array_equal(load_arrays(spec, split="test", limit=4)[1], fashion_mnist.labels["test"][:4])


def test_fashion_mnist_urls_are_tfds_registered_ones():
    """The real addresses come from tfds's builder, and tfds has checksums for all four to verify them."""
    from tensorflow_datasets.core.download import checksums

    urls = fmnist._fashion_mnist_urls()
    assert sorted(urls) == sorted(fmnist.FASHION_MNIST_FILES)
    host = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
    assert urls["t10k-labels-idx1-ubyte.gz"] == host + "t10k-labels-idx1-ubyte.gz"
    assert set(urls.values()) <= set(checksums.get_all_url_infos())


def test_demo_source_downloads_fashion_mnist_when_online(no_debian_fashion_mnist, cache_root, fashion_mnist,
                                                         fashion_mnist_host, monkeypatch, capsys):
    """tfds's download manager fetches the four files from the (local) host into the cache, replacing a
    partial earlier download, and the next call reuses them."""
    cache = cache_root / "fashion_mnist"
    cache.mkdir(parents=True)
    (cache / "train-images-idx3-ubyte.gz").write_bytes(b"left by an interrupted run")
    probed = []
    real_probe = fmnist._downloadable
    monkeypatch.setattr(fmnist, "_downloadable", lambda url: probed.append(url) or real_probe(url))
    spec = fmnist.demo_source()
    assert spec == f"fashion_mnist:{cache}"
    assert probed == [fmnist._fashion_mnist_urls()["train-labels-idx1-ubyte.gz"]]
    out = capsys.readouterr().out
    assert out == f"notice: downloading Fashion-MNIST with tensorflow_datasets into {cache} (once)\n"
    assert sorted(os.listdir(cache_root)) == ["fashion_mnist"]  # no temporary folder left
    assert sorted(os.listdir(cache)) == sorted(fmnist.FASHION_MNIST_FILES)
    for name in fmnist.FASHION_MNIST_FILES:
        assert (cache / name).read_bytes() == (fashion_mnist.directory / name).read_bytes()
    images, _ = load_arrays(spec, split="train", limit=5)
    np.testing.assert_array_equal(images[..., 0], fashion_mnist.images["train"][:5])
    monkeypatch.setattr(fmnist, "_downloadable", lambda url: pytest.fail("probed the network again"))
    assert fmnist.demo_source() == spec and capsys.readouterr().out == ""


@pytest.mark.parametrize("failure, reason", [
    ("offline", "no answer from 127.0.0.1 (offline)"),
    ("missing file", "could not download Fashion-MNIST ("),
    ("bad checksum", "could not download Fashion-MNIST (NonMatchingChecksumError"),
    ("no tfds builder", "no Fashion-MNIST download address (KeyError"),
])
def test_demo_source_falls_back_to_digits_with_one_notice(no_debian_fashion_mnist, cache_root, fashion_mnist_host,
                                                          monkeypatch, capsys, failure, reason):
    """Whatever stops the download leaves no complete-looking cache (nor temporary files) behind."""
    if failure == "offline":
        monkeypatch.setattr(fmnist, "_downloadable", lambda url: False)
    elif failure == "missing file":  # the other three download, then this one answers 404
        (fashion_mnist_host / "t10k-images-idx3-ubyte.gz").unlink()
    elif failure == "bad checksum":
        from tensorflow_datasets.core.download import checksums

        registered = checksums.get_all_url_infos()
        url = fmnist._fashion_mnist_urls()["train-images-idx3-ubyte.gz"]
        registered[url] = checksums.UrlInfo(size=(fashion_mnist_host / "train-images-idx3-ubyte.gz").stat().st_size,
                                            checksum="0" * 64, filename="train-images-idx3-ubyte.gz")
        monkeypatch.setattr(checksums, "get_all_url_infos", lambda: dict(registered))
    else:
        monkeypatch.setattr(fmnist, "_fashion_mnist_urls", lambda: {}["no fashion_mnist builder"])
    assert fmnist.demo_source() == "digits"
    notices = [line for line in capsys.readouterr().out.splitlines() if "the demo uses" in line]
    assert len(notices) == 1 and notices[0].startswith(f"notice: no Fashion-MNIST in {fmnist.FASHION_MNIST_DIR}")
    assert reason in notices[0] and notices[0].endswith("the demo uses scikit-learn's bundled digits")
    assert not fmnist._has_fashion_mnist(str(cache_root / "fashion_mnist"))
    assert not os.path.exists(cache_root) or os.listdir(cache_root) in ([], ["fashion_mnist"])
    assert not os.path.exists(cache_root / "fashion_mnist") or os.listdir(cache_root / "fashion_mnist") == []


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_HEAD(self):
        if self.path == "/hang":
            time.sleep(5)
        self.send_response(200 if self.path == "/file.gz" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_downloadable_needs_a_2xx_answer_and_never_waits_past_its_timeout():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        closed_port = closed.getsockname()[1]
    try:
        check = functools.partial(fmnist._downloadable, timeout_s=0.5)
        assert check(f"{base}/file.gz")
        assert not check(f"{base}/missing.gz")  # a server that answers, but not with the file
        assert not check(f"http://127.0.0.1:{closed_port}/file.gz") and not check("http://name.invalid/file.gz")
        start = time.monotonic()
        assert not check(f"{base}/hang")
        assert time.monotonic() - start < 2
    finally:
        server.shutdown()
        server.server_close()


def test_unknown_version_is_a_clear_error():
    data = bytearray(records.encode(**_record()))
    struct.pack_into("<H", data, 4, 7)
    with pytest.raises(records.UnsupportedRecordVersion, match="version 7 is not supported.*version 1"):
        records.decode(bytes(data))


@pytest.mark.parametrize("data, match", [
    (b"MLC", "too short"),
    (b"XXXX" + bytes(20), "not an MLCD record"),
])
def test_garbage_is_rejected(data, match):
    with pytest.raises(records.RecordError, match=match):
        records.decode(data)


def test_truncated_record_is_rejected():
    data = records.encode(**_record())
    with pytest.raises(records.RecordError, match="expected"):
        records.decode(data[:-5])


def test_scores_must_descend():
    with pytest.raises(ValueError, match="descending"):
        records.encode(**_record(scores=np.array([0.1, 0.5, 0.2], np.float32)))


def test_pad_positives_pads_with_minus_one():
    labels, scores = records.pad_positives(np.array([3, 1]), np.array([0.8, 0.7]), 4)
    np.testing.assert_array_equal(labels, [3, 1, -1, -1])
    assert scores[0] == np.float32(0.8) and np.isneginf(scores[2:]).all()
    labels, _ = records.pad_positives(np.array([3, 1, 2]), np.array([0.8, 0.7, 0.1]), 2)
    np.testing.assert_array_equal(labels, [3, 1])
