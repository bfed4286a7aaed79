"""Image-text retrieval with several captions per image (COCO / Flickr30k's five) and the Karpathy-split
reader: the recall matches an independent sort-based reference on sets full of ties, and the
``retrieval`` evaluator reads a Karpathy JSON end to end."""

import json

import ml_collections
import numpy as np
import pytest
from PIL import Image

from mlcd_jax.config_lib import ConfigError
from mlcd_jax.data import karpathy
from mlcd_jax.evaluate import zero_shot
from mlcd_jax.evaluate.evaluators import Retrieval, Target, ZeroShot


def _reference(sim: np.ndarray, image_of: np.ndarray, k: int) -> tuple[float, float]:
    """Recall@k by sorting each query's candidates, a true candidate after every wrong one it ties with."""
    true = image_of[None, :] == np.arange(sim.shape[0])[:, None]
    i2t = [np.any(true[i][np.lexsort((true[i], -sim[i]))][:k]) for i in range(sim.shape[0])]
    t2i = [np.any(true[:, j][np.lexsort((true[:, j], -sim[:, j]))][:k]) for j in range(sim.shape[1])]
    return float(np.mean(i2t)), float(np.mean(t2i))


@pytest.mark.parametrize("seed", range(5))
def test_several_captions_per_image_match_a_sorting_reference_with_ties(seed):
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, 6, size=30)  # 1 to 5 captions per image
    image_of = np.repeat(np.arange(30), counts)
    # Few distinct unit directions: many exact ties between images and between captions.
    images = np.eye(16)[rng.integers(0, 16, size=30)]  # 16 directions for 30 images: exact ties
    stray = np.eye(16)[rng.integers(0, 16, len(image_of))]
    texts = np.where(rng.random((len(image_of), 1)) < 0.6, images[image_of], stray)  # 40 % off their image
    ks = (1, 2, 5, 10, 20)
    got = zero_shot.retrieval_recall(images, texts, ks=ks, image_of=image_of)
    assert 0 < got["i2t_r@20"] < 1 and 0 < got["t2i_r@20"] < 1  # neither trivial nor impossible
    sim = images @ texts.T  # unit rows: the cosines retrieval_recall computes
    for k in ks:
        assert (got[f"i2t_r@{k}"], got[f"t2i_r@{k}"]) == pytest.approx(_reference(sim, image_of, k))


def test_one_caption_each_is_the_paired_default_and_bad_mappings_are_one_line():
    feats = np.random.default_rng(0).normal(size=(12, 5))
    assert zero_shot.retrieval_recall(feats, feats) == zero_shot.retrieval_recall(feats, feats, image_of=np.arange(12))
    perfect = zero_shot.retrieval_recall(feats, np.repeat(feats, 5, axis=0), image_of=np.repeat(np.arange(12), 5))
    assert set(perfect.values()) == {1.0}  # every caption exactly its image's direction
    with pytest.raises(ValueError, match="every caption needs the index of its image"):
        zero_shot.retrieval_recall(feats, feats[:3], image_of=np.array([0, 1, 12]))
    with pytest.raises(ValueError, match="an image without a caption"):
        zero_shot.retrieval_recall(feats, feats[:3], image_of=np.array([0, 1, 2]))


def _karpathy_set(tmp_path, n_test=3):
    """A Karpathy JSON in COCO's layout (images under ``filepath``), of varied sizes and modes."""
    (tmp_path / "val2014").mkdir()
    entries = []
    for i in range(n_test + 2):
        name = f"img{i}.jpg" if i % 2 else f"img{i}.png"
        pixels = np.full((20 + 7 * i, 31, 3), 40 * i, np.uint8)
        Image.fromarray(pixels if i % 3 else pixels[..., 0]).save(tmp_path / "val2014" / name)
        entries.append({"filepath": "val2014", "filename": name, "split": "test" if i < n_test else "train",
                        "sentences": [{"raw": f" picture {i} take {j} "} for j in range(5 - i % 2)]})
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps({"images": entries, "dataset": "coco"}))
    return f"karpathy:{path}"


def test_the_karpathy_reader_keeps_every_caption_with_its_image(tmp_path):
    spec = _karpathy_set(tmp_path)
    found = karpathy.load(spec, "test", image_size=16)
    assert found.images.shape == (3, 16, 16, 3) and found.images.dtype == np.uint8
    assert found.captions[:6] == tuple(f"picture 0 take {j}" for j in range(5)) + ("picture 1 take 0",)
    assert found.image_of.tolist() == [0] * 5 + [1] * 4 + [2] * 5
    assert int(found.images[2].mean()) == 80  # the third test image, a grayscale PNG repeated to RGB
    assert len(karpathy.load(spec, "test", image_size=16, limit=1).captions) == 5
    with pytest.raises(ValueError, match="split 'testing' is not one of Karpathy's"):
        karpathy.load(spec, "testing", 16)
    with pytest.raises(ValueError, match="not a Karpathy split JSON"):
        karpathy.load(f"karpathy:{tmp_path / 'missing.json'}", "test", 16)


def test_the_retrieval_evaluator_reads_a_karpathy_json(tmp_path):
    spec = _karpathy_set(tmp_path)
    config = ml_collections.ConfigDict({"data": {"image_size": 16}, "eval": {"source": ""}})
    evaluator = Retrieval(name="coco", every=0, config=config, source=spec, split="test")

    def embed(images):  # brightness: one direction per image
        return np.eye(8)[images.reshape(len(images), -1).mean(axis=1).astype(int) // 40]

    def encode_text(captions):  # "picture i ...": image i's direction
        return np.eye(8)[[int(c.split()[1]) for c in captions]]

    got = evaluator(Target("model", embed, encode_text=encode_text))
    assert set(got.values()) == {1.0} and "i2t_r@1" in got
    bad = Retrieval(name="coco", every=0, config=config, source=spec, split="testing")
    with pytest.raises(ConfigError, match="evals.coco: .*split 'testing'"):
        bad(Target("model", embed, encode_text=encode_text))


def test_imagenet_zero_shot_uses_clips_names_and_80_templates(tmp_path):
    """A folder of 1,000 synset directories (names are WordNet ids) prompts with CLIP's ImageNet names."""
    names, templates = zero_shot.CLASS_NAMES["imagenet"], zero_shot.TEMPLATES["clip80"]
    assert len(names) == 1000 and names[:3] == ("tench", "goldfish", "great white shark")
    assert len(set(templates)) == 80 and all(t.count("{}") == 1 for t in templates)
    for i in range(1000):  # label order = sorted synset ids
        (tmp_path / "test" / f"n{i:08d}").mkdir(parents=True)
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "test" / f"n{i:08d}" / "a.png")
    config = ml_collections.ConfigDict({"eval": {"source": f"folder:{tmp_path}"}})
    evaluator = ZeroShot(name="zs", every=0, config=config, templates="clip80", class_names="imagenet")
    assert evaluator._names == list(names)
    own = ZeroShot(name="zs", every=0, config=config)
    assert own._names[:2] == ["n00000000", "n00000001"]
    with pytest.raises(ConfigError, match="evals.zs.class_names='coco': use '' .* or one of imagenet"):
        ZeroShot(name="zs", every=0, config=config, class_names="coco")
    config.eval.source = "digits"
    with pytest.raises(ConfigError, match="has 10 classes but class_names='imagenet' names 1000"):
        ZeroShot(name="zs", every=0, config=config, class_names="imagenet")
