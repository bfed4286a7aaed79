"""Karpathy-split caption sets (COCO, Flickr30k, Flickr8k): the image-text retrieval protocol of CLIP and
the MLCD paper, five captions per image.

``karpathy:PATH/dataset_coco.json`` names Karpathy's JSON (``{"images": [{"filepath", "filename", "split",
"sentences": [{"raw"}, ...]}, ...]}``); images are read from ``<the JSON's directory>/<filepath>/<filename>``
(``filepath`` is absent for Flickr, so its images sit beside the JSON). Splits are ``train``, ``restval``,
``val`` and ``test`` (the 5K COCO / 1K Flickr test images the papers report).
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
from etils import epath

from mlcd_jax import fileio
from mlcd_jax.data import augment

PREFIX = "karpathy:"
SPLITS = ("train", "restval", "val", "test")


@dataclasses.dataclass(frozen=True)
class CaptionSet:
    """Images uint8 [N, S, S, 3] (shorter side resized to S, centre-cropped), all their captions in image
    order, and ``image_of`` [M]: the image each caption describes."""

    images: np.ndarray
    captions: tuple[str, ...]
    image_of: np.ndarray


def load(spec: str, split: str, image_size: int, limit: int | None = None) -> CaptionSet:
    """The ``split`` of the Karpathy JSON ``spec`` names (the first ``limit`` images), stored at the eval
    transform's size so the set takes N x S x S x 3 bytes whatever its files' sizes."""
    path = spec.removeprefix(PREFIX)
    if split not in SPLITS:
        raise ValueError(f"{spec}: split {split!r} is not one of Karpathy's {', '.join(SPLITS)}")
    try:
        entries = fileio.load_json(path)["images"]
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"{spec}: not a Karpathy split JSON ({type(err).__name__}: {str(err)[:200]})") from None
    entries = [e for e in entries if e.get("split") == split][:limit]
    if not entries:
        raise ValueError(f"{spec}: no images in split {split!r}")
    root = os.path.dirname(path)
    images = np.empty((len(entries), image_size, image_size, 3), np.uint8)
    captions: list[str] = []
    image_of: list[int] = []
    for i, entry in enumerate(entries):
        file = os.path.join(root, entry.get("filepath", ""), entry["filename"])
        image = augment.decode_image(epath.Path(file).read_bytes(), min_side=image_size)
        images[i] = augment.resize_center_crop(augment.to_channels(image, 3), image_size)
        sentences = [s["raw"].strip() for s in entry["sentences"]]
        if not sentences:
            raise ValueError(f"{spec}: {file} has no captions")
        captions += sentences
        image_of += [i] * len(sentences)
    return CaptionSet(images, tuple(captions), np.asarray(image_of, np.int64))
