"""What every source kind shares: the :class:`Source` protocol, a spec prefix's :class:`Kind` (what the
registry in :mod:`mlcd_jax.data.sources` dispatches on), raw-pixel arrays as a source
(:class:`ArraySource`: IDX files, digits, emoji) and the identity a clustering job records."""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

import numpy as np

from mlcd_jax.data import augment
from mlcd_jax.data.source_base import CAPTION_TEMPLATES, SPLITS, Chunks, SourceError, identity_digest, item


class Source(Protocol):
    """Random access to ``{key, image (encoded bytes), label, caption}`` items."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict[str, Any]: ...

    def key(self, index: int) -> str:
        """Item ``index``'s key without reading it (what a job lists when reading fails)."""
        ...

    def identity_parts(self, num_images: int) -> Iterable[str]:
        """What tells the first ``num_images`` items apart from another set (see :func:`source_identity`)."""
        ...


def _no_class_names(args: list[str], split: str | None) -> list[str] | None:
    return None


@dataclasses.dataclass(frozen=True)
class Kind:
    """One spec prefix, ``PREFIX[:ARGS]``: a module of this package that defines ``KIND`` adds it.

    ``open(spec, args, split)`` makes the source (``args``: the spec's ``:``-separated parts after the
    prefix; a ``split`` replaces the spec's own); ``class_names(args, split)`` its labels' names, or None.
    With ``path=True`` everything after ``PREFIX:`` is one path (it may hold ``:``) and must be given.
    ``usage`` is the spec's form, as the unknown-source message lists it. A streamed kind (``wds:``)
    gives the clustering job its own chunks, ``chunks(args, limit)``, instead of random access to
    ``open``'s source cut into chunks (:func:`mlcd_jax.data.chunks.open_chunks`).
    """

    prefix: str
    usage: str
    open: Callable[[str, list[str], str | None], Source]
    class_names: Callable[[list[str], str | None], list[str] | None] = _no_class_names
    path: bool = False
    chunks: Callable[[list[str], int], Chunks] | None = None


def split_arg(spec: str, value: str, allowed: tuple[str, ...] = SPLITS) -> str:
    """``value`` when it is one of ``allowed`` splits, else a SourceError naming ``spec``."""
    if value not in allowed:
        raise SourceError(f"{spec!r}: split {value!r} is not one of {', '.join(allowed)}")
    return value


def source_identity(source: Source, num_images: int) -> dict[str, Any]:
    """The image count and a SHA-256 of what names the first ``num_images`` items: a folder's sorted
    relative paths, ArrayRecord files' names and sizes, a dataset's name and split (and a raw-pixel
    source's keys and captions). A clustering job records it, so that resuming against a changed source
    is refused instead of mislabelling records (or mixing records with and without captions)."""
    return identity_digest(source.identity_parts(num_images), num_images)


def templated_captions(images: np.ndarray, labels: np.ndarray, names: Sequence[str]) -> list[str]:
    """A caption per image naming its class ``names[label]`` in one of ``CAPTION_TEMPLATES``, picked by a
    CRC-32 of the image's pixels (so it does not depend on the image's position in a split)."""
    return [
        CAPTION_TEMPLATES[zlib.crc32(np.ascontiguousarray(image)) % len(CAPTION_TEMPLATES)].format(names[label])
        for image, label in zip(images, labels)
    ]


class ArraySource:
    """Raw uint8 pixel arrays [N, H, W, C] served as lossless PNGs (IDX files, digits, emoji), with
    optional labels, captions and keys (default ``<name>/<index>``)."""

    def __init__(
        self,
        name: str,
        images: np.ndarray,
        labels: np.ndarray | None,
        captions: Sequence[str] | None = None,
        keys: Sequence[str] | None = None,
    ) -> None:
        self.name, self.images, self.labels, self.captions, self.keys = name, images, labels, captions, keys

    def __len__(self) -> int:
        return len(self.images)

    def key(self, index: int) -> str:
        return f"{self.name}/{index:08d}" if self.keys is None else self.keys[index]

    def __getitem__(self, index: int) -> dict[str, Any]:
        label = None if self.labels is None else int(self.labels[index])
        caption = None if self.captions is None else self.captions[index]
        return item(self.key(index), augment.encode_png(self.images[index]), label, caption)

    def identity_parts(self, num_images: int) -> Iterable[str]:
        """Name, count and image shape, then the own keys and the captions (what the records carry)."""
        parts = [self.name, str(num_images), str(self.images.shape[1:])]
        for names in (self.keys, self.captions):
            if names is not None:
                parts.extend(names[:num_images])
        return parts

    def __repr__(self) -> str:
        return f"ArraySource({self.name!r}, n={len(self)})"


def classified(name: str, images: np.ndarray, labels: np.ndarray, names: Sequence[str]) -> ArraySource:
    """Labelled raw pixels whose captions name their class (:func:`templated_captions`)."""
    return ArraySource(name, images, labels, templated_captions(images, labels, names))
