"""Record schema: round trip, lossless images, versioning and corruption errors."""

import struct

import numpy as np
import pytest

from mlcd_jax.data import augment, records
from mlcd_jax.data.sources import load_arrays, open_source


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


def test_raw_pixel_sources_store_exact_pixels():
    images, labels = load_arrays("digits", split="train", limit=20)
    source = open_source("digits:train")
    for i in range(20):
        item = source[i]
        rec = records.decode(records.encode(item["image"], [1], [1.0], item["key"]))
        np.testing.assert_array_equal(augment.decode_image(rec["image"]), images[i])
        assert item["label"] == labels[i]
    fm = open_source("fashion_mnist:test")
    fm_images, _ = load_arrays("fashion_mnist", split="test", limit=3)
    np.testing.assert_array_equal(augment.decode_image(fm[2]["image"]), fm_images[2])
    assert fm_images.shape[1:] == (28, 28, 1) and len(fm) == 10_000


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
