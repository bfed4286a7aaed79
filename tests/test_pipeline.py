"""grain training pipeline over record shards of real images (sklearn digits), both paths: decoded
once into memory (the default for small data) and streamed per record (``in_memory_bytes=0``), then
the on-device augmentation."""

import io
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from grain import sharding
from PIL import Image

from mlcd_jax.cluster.writer import write_shard
from mlcd_jax.config_lib import ResumeMismatch
from mlcd_jax.data import augment, order, records
from mlcd_jax.data.pipeline import CLIP_MEAN, CLIP_STD, make_train_loader, preprocess_eval
from mlcd_jax.data.sources import load_arrays

N = 600
PATHS = {"in_memory": {}, "streamed": {"in_memory_bytes": 0}}


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


def _same(a, b):
    for key in ("image", "size", "seed", "labels"):
        np.testing.assert_array_equal(a[key], b[key])


@pytest.mark.parametrize("path", PATHS)
def test_canvas_batches_hold_the_records_pixels_seeds_and_padded_labels(shards, digits, path):
    loader = make_train_loader(shards, global_batch_size=32, image_size=8, top_l=4, seed=0, augment=False,
                               **PATHS[path])
    batch = next(iter(loader))
    canvas = batch["image"].shape[1]
    assert batch["image"].dtype == np.uint8 and batch["image"].shape == (32, canvas, canvas, 3)
    assert canvas == (8 if path == "in_memory" else 16)  # streamed: 2 x image_size
    np.testing.assert_array_equal(batch["size"], np.full((32, 2), 8))
    assert batch["seed"].dtype == np.uint32 and len(np.unique(batch["seed"][:, 0])) == 32
    assert batch["labels"].shape == (32, 4) and batch["labels"].dtype == np.int32
    idx = batch["labels"][:, 0]
    np.testing.assert_array_equal(batch["labels"], np.stack([idx, idx + 1, idx + 2, np.full(32, -1)], 1))
    np.testing.assert_array_equal(batch["image"][:, :8, :8], np.repeat(digits[idx], 3, axis=-1))
    assert not batch["image"][:, 8:].any() and not batch["image"][:, :, 8:].any()  # canvas padding
    model_in = np.asarray(jax.jit(loader.augment)(batch)["image"])
    assert model_in.shape == (32, 8, 8, 3) and model_in.dtype == np.float32
    np.testing.assert_allclose(model_in, preprocess_eval(digits[idx], 8), atol=1e-5)
    grey = digits[idx].astype(np.float32)[..., 0] / 255
    np.testing.assert_allclose(model_in[..., 1], (grey - CLIP_MEAN[1]) / CLIP_STD[1], atol=1e-5)


@pytest.mark.parametrize("path", PATHS)
def test_a_smaller_top_l_keeps_each_images_best_labels(shards, path):
    batch = next(iter(make_train_loader(shards, global_batch_size=32, image_size=8, top_l=2, seed=0,
                                        **PATHS[path])))
    idx = batch["labels"][:, 0]
    np.testing.assert_array_equal(batch["labels"], np.stack([idx, idx + 1], 1))


@pytest.mark.parametrize("path", PATHS)
def test_restored_iterator_gives_the_same_next_batches(shards, path):
    kw = dict(global_batch_size=32, image_size=12, top_l=3, seed=1, **PATHS[path])
    it = iter(make_train_loader(shards, **kw))
    _take(it, 3)
    state = it.get_state()
    want = _take(it, 4)
    fresh = iter(make_train_loader(shards, **kw))
    fresh.set_state(state)
    for a, b in zip(want, _take(fresh, 4)):
        _same(a, b)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("workers", [(0, 2), (2, 0), (2, 3)])
def test_a_state_resumes_under_another_worker_count_and_from_moved_shards(shards, tmp_path, path, workers):
    """grain refused both ('Worker count in checkpoint does not match', 'DataSource ... hash_of_paths')."""
    kw = dict(global_batch_size=32, image_size=12, top_l=3, seed=1, **PATHS[path])
    it = iter(make_train_loader(shards, num_workers=workers[0], **kw))
    _take(it, 5)
    state = it.get_state()
    want = _take(it, 4)
    moved = [str(tmp_path / os.path.basename(p)) for p in shards]
    for src, dst in zip(shards, moved):
        shutil.copyfile(src, dst)
    fresh = iter(make_train_loader(moved, num_workers=workers[1], **kw))
    fresh.set_state(state)
    for a, b in zip(want, _take(fresh, 4)):
        _same(a, b)


@pytest.mark.parametrize("path", PATHS)
def test_a_state_of_another_data_order_is_refused_in_one_line(shards, path):
    kw = dict(global_batch_size=32, image_size=12, top_l=3, **PATHS[path])
    it = iter(make_train_loader(shards, seed=1, **kw))
    _take(it, 2)
    with pytest.raises(ResumeMismatch, match="the checkpoint's data( order)?: .*seed=1.*; this run's: .*seed=2"):
        iter(make_train_loader(shards, seed=2, **kw)).set_state(it.get_state())
    with pytest.raises(ResumeMismatch, match="the checkpoint's data: .*; this run's: "):
        iter(make_train_loader(shards[:1], seed=1, **kw)).set_state(it.get_state())


@pytest.mark.parametrize("path", PATHS)
def test_two_processes_split_each_global_batch(shards, path):
    kw = dict(global_batch_size=32, image_size=12, top_l=3, seed=2, **PATHS[path])
    single = _take(iter(make_train_loader(shards, shard_options=sharding.NoSharding(), **kw)), 3)
    parts = [
        _take(iter(make_train_loader(
            shards, shard_options=sharding.ShardOptions(shard_index=p, shard_count=2, drop_remainder=True), **kw)), 3)
        for p in range(2)
    ]
    for t in range(3):
        assert parts[0][t]["image"].shape[0] == 16
        for key in ("image", "labels", "seed"):  # seeds (so crops and flips) follow the global position
            np.testing.assert_array_equal(np.concatenate([parts[0][t][key], parts[1][t][key]]), single[t][key])


_PROCESS_SCRIPT = """
import sys, numpy as np, jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
from mlcd_jax.data.pipeline import make_train_loader
it = iter(make_train_loader(sys.argv[3:5], global_batch_size=32, image_size=12, top_l=3, seed=2))
np.save(sys.argv[5], np.stack([next(it)["labels"] for _ in range(3)]))
"""


def test_two_real_processes_read_their_halves_of_each_global_batch(shards, tmp_path):
    """Two JAX processes (jax.distributed on localhost), the default ShardByJaxProcess split and the real
    sampler: together they read exactly the one-process batches."""
    import portpicker

    address = f"localhost:{portpicker.pick_unused_port()}"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen([sys.executable, "-c", _PROCESS_SCRIPT, address, str(p), *shards,
                               str(tmp_path / f"p{p}.npy")], env=env, stderr=subprocess.PIPE, text=True)
             for p in range(2)]
    for proc in procs:
        assert proc.wait(timeout=300) == 0, proc.stderr.read()[-3000:]
    halves = [np.load(tmp_path / f"p{p}.npy") for p in range(2)]
    single = _take(iter(make_train_loader(shards, global_batch_size=32, image_size=12, top_l=3, seed=2,
                                          shard_options=sharding.NoSharding())), 3)
    for t in range(3):
        np.testing.assert_array_equal(np.concatenate([halves[0][t], halves[1][t]]), single[t]["labels"])


@pytest.mark.parametrize("path", PATHS)
def test_worker_processes_give_the_same_batches(shards, path):
    kw = dict(global_batch_size=32, image_size=12, top_l=3, seed=3, **PATHS[path])
    want = _take(iter(make_train_loader(shards, **kw)), 4)
    got = _take(iter(make_train_loader(shards, num_workers=2, **kw)), 4)
    for a, b in zip(want, got):
        _same(a, b)


@pytest.mark.parametrize("path", PATHS)
def test_one_epoch_reads_each_record_once_and_augments(shards, digits, path):
    loader = make_train_loader(shards, global_batch_size=64, image_size=8, top_l=3, seed=4, num_epochs=1,
                               **PATHS[path])
    batches = list(iter(loader))
    assert len(batches) == N // 64
    seen = np.concatenate([b["labels"][:, 0] for b in batches])
    assert len(np.unique(seen)) == len(seen) == N // 64 * 64
    plain = preprocess_eval(digits[batches[0]["labels"][:, 0]], 8)
    augmented = np.asarray(jax.jit(loader.augment)(batches[0])["image"])
    assert augmented.shape == plain.shape and not np.allclose(augmented, plain)  # crop / flip changed pixels


@pytest.mark.parametrize("path", PATHS)
def test_corrupt_records_are_skipped_and_counted(digits, tmp_path, path):
    paths = _write(tmp_path, digits, corrupt_at=(5, 6, 400))
    loader = make_train_loader(paths, global_batch_size=50, image_size=8, top_l=3, seed=0, num_epochs=1,
                               **PATHS[path])
    batches = list(iter(loader))
    seen = np.concatenate([b["labels"][:, 0] for b in batches])
    assert len(seen) == len(batches) * 50 and not {5, 6, 400} & set(seen.tolist())
    assert loader.skipped_records == 3
    assert all(reason for _, reason in loader.skipped())
    assert sorted(where for where, _ in loader.skipped()) == [  # N // 2 records per shard
        "a.array_record record 5", "a.array_record record 6", "b.array_record record 100"]


@pytest.mark.parametrize("path", PATHS)
def test_a_damaged_shard_is_skipped_with_its_file_named(digits, tmp_path, path):
    """64 bytes flipped inside a shard stopped training at the same step on every re-run with riegeli's
    'Corrupted ... records file', naming no file."""
    paths = _write(tmp_path, digits)
    data = bytearray(open(paths[0], "rb").read())
    middle = len(data.rstrip(b"\0")) // 2  # inside the records, not the zero padding after them
    data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])
    open(paths[0], "wb").write(bytes(data))
    loader = make_train_loader(paths, global_batch_size=50, image_size=8, top_l=3, seed=0, num_epochs=1,
                               **PATHS[path])
    batches = list(iter(loader))
    assert len(batches) >= (N - 10) // 50
    skipped = loader.skipped()
    assert 1 <= len(skipped) <= 3 and all(where.startswith("a.array_record record ") for where, _ in skipped)


def test_example_seeds_depend_on_seed_epoch_and_position_only():
    a = order.example_seeds(7, 2, np.arange(1000))
    assert a.shape == (1000, 2) and a.dtype == np.uint32 and len(np.unique(a[:, 0])) > 990
    np.testing.assert_array_equal(order.example_seeds(7, 2, np.arange(500, 600)), a[500:600])
    assert not np.array_equal(order.example_seeds(8, 2, np.arange(1000)), a)
    assert not np.array_equal(order.example_seeds(7, 3, np.arange(1000)), a)


def test_crop_boxes_follow_the_area_and_aspect_ranges():
    keys = jax.random.split(jax.random.key(0), 4000)
    size = jnp.array([30, 40])
    boxes = np.asarray(jax.vmap(lambda k: augment.crop_box(k, size, (0.2, 0.9)))(keys))
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 30 + 1e-4).all() and (left + w <= 40 + 1e-4).all()
    area = h * w / 1200
    assert area.min() >= 0.2 - 1e-4 and area.max() <= 0.9 + 1e-4 and 0.45 < area.mean() < 0.65
    assert (w / h).min() >= 3 / 4 - 1e-4 and (w / h).max() <= 4 / 3 + 1e-4
    assert top.std() > 1 and left.std() > 1  # positions vary
    tall = np.asarray(augment.crop_box(jax.random.key(1), jnp.array([100, 10]), (0.9, 1.0)))  # nothing fits
    np.testing.assert_allclose(tall, [(100 - 10 / 0.75) / 2, 0, 10 / 0.75, 10], rtol=1e-5)


def test_device_crop_matches_pil_bilinear_resize():
    rng = np.random.default_rng(0)
    smooth = np.asarray(Image.fromarray((rng.random((10, 8)) * 255).astype(np.uint8)).resize((30, 40), Image.BICUBIC))
    image = smooth[:, :, None]  # 40 x 30
    for box in [(3.2, 4.7, 20.5, 15.3), (0.0, 0.0, 40.0, 30.0), (5.0, 2.0, 10.0, 12.0)]:
        top, left, h, w = box
        want = np.asarray(Image.fromarray(smooth).resize((16, 16), Image.BILINEAR, box=(left, top, left + w, top + h)))
        got = np.asarray(augment.crop_resize(jnp.asarray(image), jnp.asarray(box, jnp.float32), 16))[:, :, 0]
        assert np.abs(got - want).max() < 1.5  # PIL rounds to uint8


def test_augment_batch_flips_half_and_depends_only_on_each_seed():
    canvas = np.zeros((64, 8, 8, 1), np.uint8)
    canvas[:, :, :4] = 255  # left half white
    size = np.full((64, 2), 8, np.int32)
    seeds = order.example_seeds(0, 0, np.arange(64))
    out = np.asarray(augment.augment_batch(canvas, size, seeds, image_size=8, augment=True, crop_scale=(1.0, 1.0)))
    white_left = out[:, :, 0, 0] > out[:, :, -1, 0]
    flipped = ~white_left.all(axis=1)
    assert 16 < flipped.sum() < 48  # about half flipped
    again = np.asarray(augment.augment_batch(canvas[::-1], size, seeds[::-1], image_size=8, augment=True,
                                             crop_scale=(1.0, 1.0)))
    np.testing.assert_array_equal(again[::-1], out)  # batch order does not matter, only the seed


def test_streamed_jpegs_decode_small_and_fit_the_canvas():
    big = np.asarray(Image.fromarray((np.random.default_rng(0).random((60, 90)) * 255).astype(np.uint8))
                     .resize((900, 600)).convert("RGB"))
    buf = io.BytesIO()
    Image.fromarray(big).save(buf, format="JPEG", quality=90)
    draft = augment.decode_image(buf.getvalue(), min_side=100)
    assert draft.shape == (150, 225, 3)  # 1/4 scale: the smallest with a shorter side >= 100
    assert augment.decode_image(buf.getvalue()).shape == (600, 900, 3)
    assert augment.shrink_to_fit(draft, 112).shape == (75, 112, 3)


def test_preprocess_eval_resizes_crops_and_makes_rgb(fashion_mnist):
    images, _ = load_arrays(fashion_mnist.spec, split="test", limit=5)
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
