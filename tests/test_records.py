"""Record schema (round trip, lossless images, versioning and corruption errors) and the image sources
that fill records: the IDX reader, tfds datasets and the demo's choice of data."""

import functools
import http.server
import os
import socket
import struct
import threading
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds

from mlcd_jax.data import augment, records, sources
from mlcd_jax.data.sources import SourceError, load_arrays, open_source


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
    got = sources._read_idx(str(tmp_path / name))
    assert got.dtype == np.uint8 and got.shape == (5, 3, 4)
    np.testing.assert_array_equal(got, array)
    write_idx(tmp_path / name, array[:, 0, 0])  # labels: one dimension
    np.testing.assert_array_equal(sources._read_idx(str(tmp_path / name)), array[:, 0, 0])


def test_idx_reader_rejects_other_types_and_broken_files(tmp_path, write_idx):
    write_idx(tmp_path / "floats.gz", np.zeros((2, 3), np.float32))
    with pytest.raises(SourceError, match=r"floats.gz holds IDX data type 0x0d; only unsigned bytes \(0x08\)"):
        sources._read_idx(str(tmp_path / "floats.gz"))
    write_idx(tmp_path / "short", np.zeros((4, 5), np.uint8))
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-1])
    with pytest.raises(SourceError, match=r"short holds 19 bytes of data, its header declares \(4, 5\)"):
        sources._read_idx(str(tmp_path / "short"))
    (tmp_path / "png").write_bytes(augment.encode_png(np.zeros((2, 2), np.uint8)))
    with pytest.raises(SourceError, match="png is not an IDX file"):
        sources._read_idx(str(tmp_path / "png"))
    with pytest.raises(SourceError, match="train-images-idx3-ubyte.*not found in .*pass fashion_mnist:DIR"):
        open_source(f"fashion_mnist:{tmp_path}:train")


@pytest.mark.skipif(not os.path.isdir(sources.FASHION_MNIST_DIR),
                    reason=f"needs the real Fashion-MNIST: Debian's dataset-fashion-mnist ({sources.FASHION_MNIST_DIR})")
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
    images, labels = load_arrays("tfds:mlcd_test_garments", split="test")
    assert images.shape == (5, 28, 28, 1) and images.dtype == np.uint8 and labels.dtype == np.int64
    # tfds stores examples in its own order: compare as (label, pixels) multisets
    want = sorted((int(y), x.tobytes()) for x, y in zip(fashion_mnist.images["test"][:5], fashion_mnist.labels["test"]))
    assert sorted((int(y), x[..., 0].tobytes()) for x, y in zip(images, labels)) == want
    with pytest.raises(SourceError, match="tfds:mlcd_test_garments:validation is not available locally"):
        open_source("tfds:mlcd_test_garments:validation")


# ---------------------------------------------------------------- the demo's data


@pytest.fixture
def no_debian_fashion_mnist(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "FASHION_MNIST_DIR", str(tmp_path / "absent"))


@pytest.fixture
def tfds_unprepared(monkeypatch):
    """tfds's fashion_mnist is not prepared until a (fake) download_and_prepare has run."""
    prepared = []

    def open_prepared():
        if not prepared:
            raise SourceError("tfds:fashion_mnist:train is not available locally")

    monkeypatch.setattr(sources, "_open_tfds_fashion_mnist", open_prepared)
    return prepared


def _tensorflow(monkeypatch, installed):
    real = sources.importlib.util.find_spec
    monkeypatch.setattr(sources.importlib.util, "find_spec",
                        lambda name, *a: (object() if installed else None) if name == "tensorflow" else real(name, *a))


def test_demo_source_prefers_debian_fashion_mnist(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sources, "FASHION_MNIST_DIR", str(tmp_path))
    assert sources.demo_source() == "fashion_mnist" and capsys.readouterr().out == ""


def test_demo_source_uses_prepared_tfds(no_debian_fashion_mnist, monkeypatch, capsys):
    monkeypatch.setattr(sources, "_open_tfds_fashion_mnist", lambda: None)
    monkeypatch.setattr(sources, "_downloadable", lambda url: pytest.fail("probed the network"))
    assert sources.demo_source() == "tfds:fashion_mnist" and capsys.readouterr().out == ""


def test_demo_source_downloads_with_tfds_when_online(no_debian_fashion_mnist, tfds_unprepared, monkeypatch, capsys):
    _tensorflow(monkeypatch, installed=True)
    probed = []
    monkeypatch.setattr(sources, "_downloadable", lambda url: probed.append(url) or True)

    def download_and_prepare(builder, download_config):
        assert builder.name == "fashion_mnist" and not download_config.try_download_gcs
        tfds_unprepared.append(builder)

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", download_and_prepare)
    assert sources.demo_source() == "tfds:fashion_mnist"
    assert probed == ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/train-labels-idx1-ubyte.gz"]
    assert capsys.readouterr().out.startswith("notice: downloading Fashion-MNIST with tensorflow_datasets into ")


@pytest.mark.parametrize("tensorflow, online, download_error, reason", [
    (False, True, None, "tfds cannot prepare fashion_mnist without TensorFlow"),
    (True, False, None, "no answer from fashion-mnist.s3-website.eu-central-1.amazonaws.com: offline"),
    (True, True, ConnectionResetError("reset by peer"), "could not download fashion_mnist (ConnectionResetError: reset"),
])
def test_demo_source_falls_back_to_digits_with_one_notice(no_debian_fashion_mnist, tfds_unprepared, monkeypatch,
                                                          capsys, tensorflow, online, download_error, reason):
    _tensorflow(monkeypatch, tensorflow)
    monkeypatch.setattr(sources, "_downloadable", lambda url: online)

    def download_and_prepare(builder, download_config):
        assert online and tensorflow, "tried to download"
        raise download_error

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", download_and_prepare)
    assert sources.demo_source() == "digits"
    notices = [line for line in capsys.readouterr().out.splitlines() if "the demo uses" in line]
    assert len(notices) == 1 and notices[0].startswith(f"notice: {sources.FASHION_MNIST_DIR} not found")
    assert reason in notices[0] and notices[0].endswith("the demo uses scikit-learn's bundled digits")


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
        check = functools.partial(sources._downloadable, timeout_s=0.5)
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
