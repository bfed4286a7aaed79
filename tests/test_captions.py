"""Captioned sources for the image–text side: class names, templated captions of the raw-pixel datasets
(and the clustering job's records of them), the emoji source, and ``load_captioned``."""

import glob
import json
import os
import unicodedata

import ml_collections
import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordReader

from mlcd_jax import cluster
from mlcd_jax.data import augment, records, sources
from mlcd_jax.data.sources import emoji
from mlcd_jax.data.source_base import CAPTION_TEMPLATES, SourceError
from mlcd_jax.data.sources import (
    DIGIT_CLASSES,
    FASHION_MNIST_CLASSES,
    class_names,
    load_arrays,
    load_captioned,
    open_source,
    source_identity,
)

needs_font = pytest.mark.skipif(not os.path.isfile(emoji.FONT_PATH), reason="fonts-noto-color-emoji not installed")


def _png(path, pixels, caption=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(augment.encode_png(pixels))
    if caption is not None:
        with open(os.path.splitext(path)[0] + ".txt", "w", encoding="utf-8") as f:
            f.write(caption)


# ---------------------------------------------------------------- class names and templated captions


def test_class_names_per_source(tmp_path, fashion_mnist):
    assert class_names(fashion_mnist.spec) == list(FASHION_MNIST_CLASSES)
    assert FASHION_MNIST_CLASSES[0] == "t-shirt/top" and FASHION_MNIST_CLASSES[9] == "ankle boot"
    assert class_names("digits:test") == ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
                                          "nine"]
    pixels = np.zeros((4, 4, 3), np.uint8)
    for rel in ("golden_retriever/a.png", "cat/b.png", "train/tabby_cat/c.png", "train/dog/d.png"):
        _png(tmp_path / "pets" / rel, pixels)
    _png(tmp_path / "flat" / "e.png", pixels)
    assert class_names(f"folder:{tmp_path / 'pets'}") == ["cat", "golden retriever", "train"]
    assert class_names(f"folder:{tmp_path / 'pets'}", split="train") == ["dog", "tabby cat"]  # as load_arrays labels
    assert class_names(f"folder:{tmp_path / 'flat'}") is None
    assert class_names("emoji") is None and class_names("arrayrecord:/nowhere/*.array_record") is None
    assert class_names("tfds:fashion_mnist") == ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                                                 "Shirt", "Sneaker", "Bag", "Ankle boot"]  # builder code, offline
    assert class_names("tfds:no_such_dataset_here") is None
    with pytest.raises(SourceError, match="unknown source 'nosuch'"):
        class_names("nosuch")


def test_fashion_mnist_captions_name_the_class_deterministically(fashion_mnist):
    test = open_source(f"{fashion_mnist.spec}:test")
    captions = [test[i]["caption"] for i in range(len(test))]
    for item_caption, label in zip(captions, fashion_mnist.labels["test"]):
        name = FASHION_MNIST_CLASSES[label]
        assert item_caption in [t.format(name) for t in CAPTION_TEMPLATES] and name in item_caption
    assert len({c.replace(FASHION_MNIST_CLASSES[0], "{}") for c in captions if FASHION_MNIST_CLASSES[0] in c}) >= 4
    # the same image has the same caption whatever the spec's split, and on a second opening
    every = open_source(f"{fashion_mnist.spec}:all")
    n_train = len(fashion_mnist.labels["train"])
    assert [every[n_train + i]["caption"] for i in range(50)] == captions[:50]
    assert [open_source(f"{fashion_mnist.spec}:test")[i]["caption"] for i in range(50)] == captions[:50]
    images, got = load_captioned(fashion_mnist.spec, split="test", limit=20)
    assert images.shape == (20, 28, 28, 3) and images.dtype == np.uint8 and got == captions[:20]
    np.testing.assert_array_equal(images[..., 1], fashion_mnist.images["test"][:20])


def test_digits_captions_are_pinned():
    """The template choice is a CRC-32 of the pixels: the same on every machine and release."""
    assert load_captioned("digits", split="test", limit=5)[1] == [
        "a photo of a two.", "a photo of a three.", "a low resolution photo of a four.",
        "a close-up photo of a five.", "a cropped photo of a six."]
    images, labels = load_arrays("digits", split="test", limit=5)
    assert [DIGIT_CLASSES[y] for y in labels] == ["two", "three", "four", "five", "six"]


def test_folder_captions_load_and_a_missing_one_is_named(tmp_path):
    pixels = np.arange(48, dtype=np.uint8).reshape(4, 4, 3)
    _png(tmp_path / "test" / "a.png", pixels, "a red square")
    _png(tmp_path / "test" / "b.png", pixels[::-1], "ein blaues Quadrat")
    images, captions = load_captioned(f"folder:{tmp_path}", split="test")
    assert images.shape == (2, 4, 4, 3) and captions == ["a red square", "ein blaues Quadrat"]
    _png(tmp_path / "test" / "c.png", pixels)
    with pytest.raises(SourceError, match=r"c\.png has no caption"):
        load_captioned(f"folder:{tmp_path}", split="test")
    with pytest.raises(SourceError, match="has no 'train' sub-folder"):
        load_captioned(f"folder:{tmp_path}", split="train")


# ---------------------------------------------------------------- the clustering job's records


@pytest.fixture(scope="module")
def digits_job(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits_job")
    config = ml_collections.ConfigDict(dict(
        source="digits:test", limit=0, output_dir=str(out), num_clusters=8, top_l=2, kmeans_iters=3,
        shard_size=200, progress=False, pixels_dim=16, teacher_fit_samples=200))
    cluster.run(config)
    return config


def test_cluster_job_writes_the_captions_into_records(digits_job):
    recs = []
    for path in sorted(glob.glob(os.path.join(digits_job.output_dir, "shards", "*.array_record"))):
        reader = ArrayRecordReader(path)
        recs.extend(records.decode(r) for r in reader.read_all())
        reader.close()
    source = open_source("digits:test")
    assert len(recs) == len(source) == 360
    assert [(r["key"], r["caption"]) for r in recs] == [(source.key(i), source[i]["caption"]) for i in range(360)]


def test_a_job_started_before_captions_is_refused(digits_job):
    """A job.json written before the raw-pixel sources had captions (their identity was name, count and
    shape only) must not be resumed, nor its captionless records returned as if finished."""
    source = open_source("digits:test")
    job_path = os.path.join(digits_job.output_dir, "job.json")
    with open(job_path) as f:
        job = json.load(f)
    assert job["source_identity"] == source_identity(source, 360)
    captionless = sources.ArraySource(source.name, source.images, source.labels)
    job["source_identity"] = source_identity(captionless, 360)
    with open(job_path, "w") as f:
        json.dump(job, f)
    with pytest.raises(cluster.ClusterError, match="changed since"):
        cluster.run(digits_job)


# ---------------------------------------------------------------- emoji


def _keys(source):
    return [source.key(i) for i in range(len(source))]


@pytest.fixture(scope="module")
def emoji_cache(tmp_path_factory):
    """A private $MLCD_JAX_CACHE for the module, the emoji rendered into it once."""
    if not os.path.isfile(emoji.FONT_PATH):
        pytest.skip("fonts-noto-color-emoji not installed")
    root = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLCD_JAX_CACHE", str(root))
        emoji.load("all")
        yield root


def test_emoji_images_and_captions(emoji_cache):
    source = open_source("emoji:all")
    images, captions = load_captioned("emoji", split="all")
    assert 1000 <= len(source) == len(images) <= 1600
    assert images.shape[1:] == (32, 32, 3) and images.dtype == np.uint8
    flat = images.reshape(len(images), -1)
    assert (flat.min(axis=1) < 200).all() and (flat.std(axis=1) > 5).all()  # a drawing on each, not blank
    keys = _keys(source)
    assert "U+1F304" in keys and captions[keys.index("U+1F304")] == "sunrise over mountains"
    assert captions == [unicodedata.name(chr(int(k[2:], 16))).lower() for k in keys]
    item = source[keys.index("U+1F304")]
    assert item["label"] is None and item["caption"] == "sunrise over mountains"
    np.testing.assert_array_equal(augment.decode_image(item["image"]), images[keys.index("U+1F304")])
    assert class_names("emoji") is None
    with pytest.raises(SourceError, match="has no class label"):
        load_arrays("emoji", split="test")


def test_emoji_split_is_disjoint_and_deterministic(emoji_cache):
    keys = {split: _keys(open_source(f"emoji:{split}")) for split in ("train", "test", "all")}
    assert not set(keys["train"]) & set(keys["test"])
    assert sorted(keys["train"] + keys["test"]) == sorted(keys["all"])
    assert 0.15 < len(keys["test"]) / len(keys["all"]) < 0.25
    assert keys["train"] == _keys(open_source("emoji"))  # the default split
    assert [emoji.split_of(cp) for cp in (0x1F304, 0x1F600, 0x1F603, 0x1F60E)] == ["train", "train", "test", "test"]


def test_emoji_cache_is_reused(emoji_cache, monkeypatch):
    files = glob.glob(str(emoji_cache / "emoji" / "*.npz"))
    assert len(files) == 1 and "32px" in files[0]
    monkeypatch.setattr(emoji, "render_all", lambda *a: pytest.fail("rendered again"))
    assert len(open_source("emoji:test")) > 0


@needs_font
def test_emoji_size_is_configurable(tmp_path, monkeypatch):
    monkeypatch.setenv("MLCD_JAX_CACHE", str(tmp_path))
    monkeypatch.setattr(emoji, "_candidates", lambda font_path: [0x1F304, 0x1F600, 0x2764])
    images, captions = load_captioned("emoji:16", split="all")
    assert images.shape == (3, 16, 16, 3) and captions == ["sunrise over mountains", "grinning face",
                                                           "heavy black heart"]
    with pytest.raises(SourceError, match="neither a split"):
        open_source("emoji:big")


def test_missing_emoji_font_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(emoji, "FONT_PATH", str(tmp_path / "NotoColorEmoji.ttf"))
    with pytest.raises(SourceError, match="install Debian's fonts-noto-color-emoji"):
        open_source("emoji:test")


def test_a_new_source_kind_is_one_module(tmp_path, monkeypatch):
    """The registry finds every module of mlcd_jax.data.sources that defines KIND: a module added to the
    package (here a folder put on its path) is a new spec prefix for open_source, open_split,
    class_names, the loaders and the clustering job's chunks, with no other edit."""
    (tmp_path / "noise.py").write_text(
        "import numpy as np\n"
        "from mlcd_jax.data.sources.base import ArraySource, Kind\n"
        "def _open(spec, args, split):\n"
        "    n = int(args[0]) if args else 4\n"
        "    images = np.random.default_rng(0).integers(0, 256, (n, 8, 8, 3), np.uint8)\n"
        "    return ArraySource(f'noise/{split or \"train\"}', images, np.arange(n) % 2)\n"
        "KIND = Kind('noise', 'noise[:N]', _open, lambda args, split: ['odd', 'even'])\n"
    )
    monkeypatch.setattr(sources, "__path__", [*sources.__path__, str(tmp_path)])
    sources.kinds.cache_clear()
    try:
        assert len(sources.open_source("noise:6")) == 6
        images, labels = sources.load_arrays("noise:5", "test")
        assert images.shape == (5, 8, 8, 3) and labels.tolist() == [0, 1, 0, 1, 0]
        assert sources.class_names("noise") == ["odd", "even"]
        from mlcd_jax.data.chunks import open_chunks

        chunks = open_chunks("noise:7", 3)
        assert [chunks.chunk_size(c) for c in range(chunks.num_chunks)] == [3, 3, 1]
        with pytest.raises(SourceError, match="noise\\[:N\\]"):  # listed among the kinds
            sources.open_source("nosuch")
    finally:
        sources.kinds.cache_clear()
