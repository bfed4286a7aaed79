"""grain training pipeline over record shards of real images (sklearn digits)."""

import numpy as np
import pytest
from grain import sharding

from mlcd_jax.cluster.writer import write_shard
from mlcd_jax.data import augment, records
from mlcd_jax.data.pipeline import CLIP_MEAN, CLIP_STD, make_train_loader, preprocess_eval
from mlcd_jax.data.sources import load_arrays

N = 600


@pytest.fixture(scope="module")
def digits():
    images, _ = load_arrays("digits", split="all", limit=N)
    return images


def _write(directory, images, corrupt_at=()):
    """Two shards; labels[0] of record i is i (so a batch row names its source image), l = 3."""
    encoded = [records.encode(augment.encode_png(im), [i, i + 1, i + 2], [0.9, 0.8, 0.7], f"digit/{i}")
               for i, im in enumerate(images)]
    for i in corrupt_at:
        encoded[i] = b"MLCD\x01\x00garbage" if i % 2 else records.encode(b"\x89PNG broken", [i], [1.0], "bad")
    half = len(encoded) // 2
    paths = [str(directory / "a.array_record"), str(directory / "b.array_record")]
    write_shard(paths[0], encoded[:half])
    write_shard(paths[1], encoded[half:])
    return paths


@pytest.fixture(scope="module")
def shards(digits, tmp_path_factory):
    return _write(tmp_path_factory.mktemp("shards"), digits)


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def test_eval_batches_hold_the_records_pixels_and_padded_labels(shards, digits):
    loader = make_train_loader(shards, global_batch_size=32, image_size=8, top_l=4, seed=0, augment=False)
    batch = next(iter(loader))
    assert batch["image"].shape == (32, 8, 8, 3) and batch["image"].dtype == np.float32
    assert batch["labels"].shape == (32, 4) and batch["labels"].dtype == np.int32
    idx = batch["labels"][:, 0]
    np.testing.assert_array_equal(batch["labels"], np.stack([idx, idx + 1, idx + 2, np.full(32, -1)], 1))
    np.testing.assert_allclose(batch["image"], preprocess_eval(digits[idx], 8), atol=1e-6)
    grey = digits[idx].astype(np.float32)[..., 0] / 255
    np.testing.assert_allclose(batch["image"][..., 1], (grey - CLIP_MEAN[1]) / CLIP_STD[1], atol=1e-5)


def test_restored_iterator_gives_the_same_next_batches(shards):
    loader = make_train_loader(shards, global_batch_size=32, image_size=12, top_l=3, seed=1)
    it = iter(loader)
    _take(it, 3)
    state = it.get_state()
    want = _take(it, 4)
    fresh = iter(make_train_loader(shards, global_batch_size=32, image_size=12, top_l=3, seed=1))
    fresh.set_state(state)
    for a, b in zip(want, _take(fresh, 4)):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["labels"], b["labels"])


def test_two_processes_split_each_global_batch(shards):
    single = _take(iter(make_train_loader(shards, global_batch_size=32, image_size=12, top_l=3, seed=2,
                                          shard_options=sharding.NoSharding())), 3)
    parts = [
        _take(iter(make_train_loader(
            shards, global_batch_size=32, image_size=12, top_l=3, seed=2,
            shard_options=sharding.ShardOptions(shard_index=p, shard_count=2, drop_remainder=True))), 3)
        for p in range(2)
    ]
    for t in range(3):
        assert parts[0][t]["image"].shape[0] == 16
        for key in ("image", "labels"):  # augmented pixels too: seeds follow the global position
            np.testing.assert_array_equal(np.concatenate([parts[0][t][key], parts[1][t][key]]), single[t][key])


def test_worker_processes_give_the_same_batches(shards):
    kw = dict(global_batch_size=32, image_size=12, top_l=3, seed=3)
    want = _take(iter(make_train_loader(shards, **kw)), 4)
    got = _take(iter(make_train_loader(shards, num_workers=2, **kw)), 4)
    for a, b in zip(want, got):
        np.testing.assert_array_equal(a["image"], b["image"])


def test_one_epoch_reads_each_record_once_and_augments(shards, digits):
    loader = make_train_loader(shards, global_batch_size=64, image_size=8, top_l=3, seed=4, num_epochs=1)
    batches = list(iter(loader))
    assert len(batches) == N // 64
    seen = np.concatenate([b["labels"][:, 0] for b in batches])
    assert len(np.unique(seen)) == len(seen) == N // 64 * 64
    plain = preprocess_eval(digits[batches[0]["labels"][:, 0]], 8)
    assert not np.allclose(batches[0]["image"], plain)  # random resized crop / flip changed the pixels


def test_corrupt_records_are_skipped_and_counted(digits, tmp_path):
    paths = _write(tmp_path, digits, corrupt_at=(5, 6, 400))
    loader = make_train_loader(paths, global_batch_size=50, image_size=8, top_l=3, seed=0, num_epochs=1)
    batches = list(iter(loader))
    seen = np.concatenate([b["labels"][:, 0] for b in batches])
    assert len(seen) == len(batches) * 50 and not {5, 6, 400} & set(seen.tolist())
    assert loader.skipped_records == 3
    assert all(reason for _, reason in loader.skipped())


def test_preprocess_eval_resizes_crops_and_makes_rgb():
    images, _ = load_arrays("fashion_mnist", split="test", limit=5)
    out = preprocess_eval(images, 16)
    assert out.shape == (5, 16, 16, 3) and out.dtype == np.float32
    pixels = out * CLIP_STD + CLIP_MEAN  # grayscale became three equal channels
    np.testing.assert_allclose(pixels[..., 0], pixels[..., 1], atol=1e-5)
    np.testing.assert_allclose(pixels[..., 0], pixels[..., 2], atol=1e-5)
    same = preprocess_eval(images, 28)
    np.testing.assert_allclose(same[..., 2], (images[..., 0] / 255 - CLIP_MEAN[2]) / CLIP_STD[2], atol=1e-5)
    wide = np.zeros((1, 10, 20, 3), np.uint8)
    wide[:, :, 5:15] = 255  # the centre crop keeps the white middle only
    np.testing.assert_allclose(preprocess_eval(wide, 10)[0], augment.normalize(np.full((10, 10, 3), 255, np.uint8)))
