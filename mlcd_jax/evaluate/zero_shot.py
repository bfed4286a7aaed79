"""Image-text evaluation: zero-shot classification with prompt ensembles, and image<->text retrieval.

Zero-shot (CLIP's protocol): each class name is written into every template, the text tower embeds the
prompts, their L2-normalised embeddings are averaged per class and normalised again; an image is
assigned the class whose embedding has the highest cosine with its (normalised) image embedding.
Retrieval: images and their captions (one or several each, as COCO's and Flickr's five), Recall@K both
ways (image->text: is one of the image's captions among the K captions nearest to it; text->image: is
the caption's image among the K images nearest to it).
"""

from __future__ import annotations

import importlib.resources
import json
from collections.abc import Callable, Sequence

import numpy as np

from mlcd_jax.data.source_base import CAPTION_TEMPLATES

# CLIP's ImageNet-1K class names (label order: sorted WordNet ids, as tfds's imagenet2012 and a folder
# of synset directories) and its 80 prompt templates; imagenet.json names their source and licence.
IMAGENET: dict = json.loads((importlib.resources.files("mlcd_jax.evaluate") / "imagenet.json").read_text("utf-8"))

# Prompt templates by name. "simple": one prompt; "clip7": the seven templates CLIP's prompt-engineering
# notebook selected from its 80 ImageNet prompts; "clip80": all 80 (the papers' ImageNet zero-shot);
# "captions": the templates the raw-pixel sources write their training captions with
# (mlcd_jax.data.source_base.CAPTION_TEMPLATES), the demo's ensemble.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "simple": ("a photo of a {}.",),
    "clip7": (
        "itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.",
        "a {} in a video game.", "art of the {}.", "a photo of the small {}.",
    ),
    "clip80": tuple(IMAGENET["templates"]),
    "captions": tuple(CAPTION_TEMPLATES),
}

# Built-in class-name lists by name, for sources whose own names are ids (ImageNet's WordNet synsets).
CLASS_NAMES: dict[str, tuple[str, ...]] = {"imagenet": tuple(IMAGENET["class_names"])}

EncodeText = Callable[[Sequence[str]], np.ndarray]


def _normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def class_embeddings(encode_text: EncodeText, class_names: Sequence[str], templates: Sequence[str]) -> np.ndarray:
    """[C, d] unit vectors: the normalised mean of each class's normalised prompt embeddings."""
    prompts = [t.format(name) for name in class_names for t in templates]
    emb = _normalize(encode_text(prompts)).reshape(len(class_names), len(templates), -1)
    return _normalize(emb.mean(axis=1))


def zero_shot_top1(image_features: np.ndarray, labels: np.ndarray, classes: np.ndarray) -> float:
    """Fraction of images whose nearest class embedding (cosine) is their label."""
    predicted = np.argmax(_normalize(image_features) @ classes.T, axis=1)
    return float(np.mean(predicted == np.asarray(labels)))


def retrieval_recall(
    image_features: np.ndarray, text_features: np.ndarray, ks: Sequence[int] = (1, 5, 10),
    image_of: np.ndarray | None = None,
) -> dict[str, float]:
    """``{"i2t_r@K": ..., "t2i_r@K": ...}``: Recall@K both ways.

    ``image_of[j]`` is the image caption j describes (default: row j of each is one pair). Image->text
    is a hit when any of the image's captions is among the K texts nearest to it; text->image when the
    caption's image is among the K nearest images. A tie with a wrong candidate counts against the true
    one (a collapsed model that scores everything alike gets chance-level recall, not a perfect one).
    """
    image_of = np.arange(len(text_features)) if image_of is None else np.asarray(image_of)
    if image_of.shape != (len(text_features),) or not np.all((image_of >= 0) & (image_of < len(image_features))):
        raise ValueError(f"{len(image_features)} images and {len(text_features)} captions: every caption needs "
                         "the index of its image (image_of)")
    if np.bincount(image_of, minlength=len(image_features)).min() == 0:
        raise ValueError("an image without a caption: retrieval needs every image captioned")
    sim = _normalize(image_features) @ _normalize(text_features).T  # [images, texts]
    true = image_of[None, :] == np.arange(len(image_features))[:, None]
    best_true = np.where(true, sim, -np.inf).max(axis=1)  # each image's best-scoring caption
    ranks = {
        "i2t": np.sum(~true & (sim >= best_true[:, None]), axis=1),  # wrong captions at least as close
        "t2i": np.sum(~true & (sim >= sim[image_of, np.arange(len(image_of))][None, :]), axis=0),
    }
    return {f"{name}_r@{k}": float(np.mean(rank < k)) for name, rank in ranks.items() for k in ks}
