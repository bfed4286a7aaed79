"""What the source modules share (:mod:`mlcd_jax.data.sources` and the ones it opens, e.g.
:mod:`mlcd_jax.data.sources.emoji`, :mod:`mlcd_jax.data.sources.tfds`, :mod:`mlcd_jax.data.webdataset`): the
error, the split names, the cache root, the item layout, caption decoding, CLIP-style caption templates
and :class:`Chunks`, a source as the clustering job reads it. A leaf module, so a source module imports
it without importing the spec parser that imports the source modules."""

from __future__ import annotations

import abc
import concurrent.futures
import hashlib
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

SPLITS = ("train", "test", "all")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
CAPTION_TEMPLATES = (  # a few of CLIP's ImageNet prompt templates
    "a photo of a {}.",
    "a black and white photo of a {}.",
    "a low resolution photo of a {}.",
    "a cropped photo of a {}.",
    "a photo of the {}.",
    "a close-up photo of a {}.",
)


def identity_digest(parts: Iterable[str], num_images: int | None) -> dict[str, Any]:
    """``{"num_images", "sha256"}`` of ``parts`` (one line each); ``num_images`` None: not known up front."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode("utf-8", "surrogateescape") + b"\n")
    return {"num_images": num_images, "sha256": digest.hexdigest()}


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


# (source key, encoded image bytes or None when unreadable, the error or None)
Encoded = tuple[str, bytes | None, str | None]
Read = Callable[[], Encoded]  # reads one image when called (on a worker thread, or already read)


class Chunks(abc.ABC):
    """A source as the clustering job reads it: ``num_chunks`` units of work (chunk c becomes output
    shard c), each read in batches of position-ordered images. :func:`mlcd_jax.data.chunks.open_chunks`
    opens one for any source spec; the job sees nothing else of the source."""

    num_chunks: int
    num_images: int | None  # None: known once every chunk was read (a streamed source)

    @abc.abstractmethod
    def chunk_size(self, chunk: int) -> int | None:
        """How many images ``chunk`` has, or None (a streamed chunk, before it is read)."""

    @abc.abstractmethod
    def identity(self) -> dict[str, Any]:
        """``{"num_images", "sha256"}`` of what names the images (:func:`identity_digest`): a job
        records it and refuses to resume against a changed source."""

    @abc.abstractmethod
    def batches(self, chunk: int, size: int) -> Iterator[tuple[list[int], list[Read]]]:
        """``chunk``'s images in batches of ``size``: their positions in the chunk and their readers."""

    @abc.abstractmethod
    def items(self, chunk: int, positions: list[int], pool: concurrent.futures.Executor) -> Iterable[dict[str, Any]]:
        """The items (key, image bytes, caption) at ``positions`` (ascending) of ``chunk``, in order; an
        item that is no longer the image it was when first read raises :class:`SourceError`."""

    @abc.abstractmethod
    def fit_sample(self, n: int, seed: int) -> list[Read]:
        """Readers of up to ``n`` images for fitting a teacher: a seeded sample, or the first ``n``
        where the source is a stream."""
