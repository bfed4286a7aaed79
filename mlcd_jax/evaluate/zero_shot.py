"""Image-text evaluation: zero-shot classification with prompt ensembles, and image<->text retrieval.

Zero-shot (CLIP's protocol): each class name is written into every template, the text tower embeds the
prompts, their L2-normalised embeddings are averaged per class and normalised again; an image is
assigned the class whose embedding has the highest cosine with its (normalised) image embedding.
Retrieval: paired images and captions, Recall@K both ways (image->text: is the image's own caption
among the K captions nearest to it; text->image likewise).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from mlcd_jax.data.source_base import CAPTION_TEMPLATES

# Prompt templates by name. "simple": one prompt; "clip7": the seven templates CLIP's prompt-engineering
# notebook selected from its 80 ImageNet prompts; "captions": the templates the raw-pixel sources write
# their training captions with (mlcd_jax.data.source_base.CAPTION_TEMPLATES), the demo's ensemble.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "simple": ("a photo of a {}.",),
    "clip7": (
        "itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.",
        "a {} in a video game.", "art of the {}.", "a photo of the small {}.",
    ),
    "captions": tuple(CAPTION_TEMPLATES),
}

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
    image_features: np.ndarray, text_features: np.ndarray, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """``{"i2t_r@K": ..., "t2i_r@K": ...}`` for paired rows (row i of each is one pair)."""
    if len(image_features) != len(text_features):
        raise ValueError(f"{len(image_features)} images but {len(text_features)} captions: retrieval needs pairs")
    sim = _normalize(image_features) @ _normalize(text_features).T
    out = {}
    for name, scores in (("i2t", sim), ("t2i", sim.T)):
        # rank of the true pair = other candidates scoring at least as high (a tie counts against it, so
        # a collapsed model that scores everything alike gets chance-level recall, not a perfect one)
        rank = np.sum(scores >= np.diag(scores)[:, None], axis=1) - 1
        for k in ks:
            out[f"{name}_r@{k}"] = float(np.mean(rank < k))
    return out
