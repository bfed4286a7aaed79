"""What the source modules share (:mod:`mlcd_jax.data.sources` and the ones it opens, e.g.
:mod:`mlcd_jax.data.emoji`, :mod:`mlcd_jax.data.tfds_source`): the error, the split names, the cache
root, the item layout, caption decoding and CLIP-style caption templates. A leaf module, so a source
module imports it without importing the spec parser that imports the source modules."""

from __future__ import annotations

import os
from typing import Any

SPLITS = ("train", "test", "all")
CAPTION_TEMPLATES = (  # a few of CLIP's ImageNet prompt templates
    "a photo of a {}.",
    "a black and white photo of a {}.",
    "a low resolution photo of a {}.",
    "a cropped photo of a {}.",
    "a photo of the {}.",
    "a close-up photo of a {}.",
)


class SourceError(ValueError):
    """A source spec is malformed or points at nothing usable."""


def cache_root() -> str:
    """Where downloaded and rendered data is kept: ``$MLCD_JAX_CACHE`` (default ``~/.cache/mlcd_jax``)."""
    return os.environ.get("MLCD_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "mlcd_jax"))


def decode_caption(data: bytes) -> str:
    """A caption file's text: UTF-8 (a BOM dropped), or Latin-1 when the bytes are not UTF-8 (every byte
    is a Latin-1 character, so a caption is never lost; Windows-1252 quotes come out as control chars)."""
    try:
        return data.decode("utf-8-sig").strip()
    except UnicodeDecodeError:
        return data.decode("latin-1").strip()


def item(key: str, image: bytes, label: int | None = None, caption: str | None = None) -> dict[str, Any]:
    """A source's item: ``{key, image (encoded bytes), label, caption}``."""
    return {"key": key, "image": image, "label": label, "caption": caption}
