"""Image sources for the clustering job and the evaluation, by spec string: one module of this package per
spec prefix (its ``KIND``, a :class:`~mlcd_jax.data.sources.base.Kind`), found by :func:`kinds`; adding a
source is adding a module.

Specs (``open_source(spec)`` / ``open_split(spec, split)`` / ``load_arrays(spec, split, limit)`` /
``load_captioned(spec, split, limit)``):

- ``folder:DIR`` — every image file under DIR (recursive; .jpg .jpeg .png .bmp .gif .webp .tif .tiff),
  in sorted relative-path order; the key is the relative path, the bytes are the file's own bytes. If
  images sit in class sub-folders (``DIR/<class>/...``) the label is the index of ``<class>`` among the
  sorted class folders, else None. A sibling ``<stem>.txt`` is the caption (UTF-8, else read as
  Latin-1). ``open_split`` and ``load_arrays`` read ``DIR/<split>/<class>/...``, ``load_captioned``
  ``DIR/<split>/...`` (every image with a caption); the two loaders need all images of one size (the
  evaluators stream a split of any sizes, :mod:`mlcd_jax.evaluate.stream`).
- ``fashion_mnist[:DIR][:SPLIT]`` — the IDX files of Debian's ``dataset-fashion-mnist``
  (default DIR /usr/share/datasets/fashion-mnist); SPLIT is ``train`` (60,000, the default), ``test``
  (10,000) or ``all`` (train then test). E.g. ``fashion_mnist:test``, ``fashion_mnist:/data/fm:train``.
- ``digits[:SPLIT]`` — scikit-learn's bundled 8x8 digits; its values 0..16 are scaled to uint8 0..255
  by ``round(v * 255 / 16)``. ``train`` = the first 1,437 images (80 %, the default), ``test`` = the
  last 360, ``all`` = 1,797.
- ``emoji[:SIZE][:SPLIT]`` — the ~1,400 single-code-point emoji of Debian's ``fonts-noto-color-emoji``
  rendered on white at SIZE px (default 32), RGB, captioned with their Unicode names; no labels, keys
  ``U+1F304``; ``train``/``test`` is a fixed 80/20 split by a hash of the code point
  (:mod:`mlcd_jax.data.sources.emoji`; rendered once, then cached under ``$MLCD_JAX_CACHE/emoji``).
- ``tfds:NAME[:SPLIT]`` — ``tfds.data_source`` of an already prepared TFDS dataset in ArrayRecord
  format (never downloads; :mod:`mlcd_jax.data.sources.tfds`); the image feature is read undecoded, so
  the bytes are the stored originals (``tfds:fashion_mnist`` loads as uint8 [N, 28, 28, 1], like the
  IDX files).
- ``arrayrecord:GLOB`` — MLCD records (``mlcd_jax.data.records``), e.g. to re-cluster existing shards
  with another teacher; label None.
- ``wds:PATTERN`` — WebDataset tar shards, local or ``gs://``: the clustering job streams them
  (:mod:`mlcd_jax.data.webdataset`, through :mod:`mlcd_jax.data.chunks`); opened here, e.g. to evaluate
  on, their headers are indexed once and samples read by offset, ``{split}`` in the pattern naming the
  split and ``.cls`` members the labels (:mod:`mlcd_jax.data.sources.wds`).

Raw-pixel sources (IDX, digits, emoji) store a lossless PNG of exactly their pixels; grayscale stays
grayscale. Fashion-MNIST's and digits' items are captioned from their class (:func:`class_names`) with
one of the CLIP-style ``source_base.CAPTION_TEMPLATES`` ("a photo of a sneaker."), picked by a CRC-32
of the item's pixels: the same image gets the same caption in every split spec and on every machine. The
captions are part of :func:`source_identity`, so a clustering job started before its source had
captions (or with other ones) is refused on resume instead of mixing shards with and without them.

:func:`mlcd_jax.data.sources.fashion_mnist.demo_source` picks the demo's data: Debian's Fashion-MNIST, else the
same IDX files downloaded once (where the machine is online) into ``$MLCD_JAX_CACHE/fashion_mnist``,
else digits.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from collections.abc import Sequence
from typing import Any

import numpy as np

from mlcd_jax.data import augment
from mlcd_jax.data.source_base import SourceError
# The types and names callers use, from the modules that define them (noqa: re-exported).
from mlcd_jax.data.sources.base import ArraySource, Kind, Source, source_identity, split_arg  # noqa: F401
from mlcd_jax.data.sources.digits import DIGIT_CLASSES  # noqa: F401
from mlcd_jax.data.sources.fashion_mnist import FASHION_MNIST_CLASSES  # noqa: F401
from mlcd_jax.data.sources.folder import FolderSource  # noqa: F401

NO_LABEL = "has no class label (folders: DIR/<split>/<class>/...)"


@functools.cache
def kinds() -> dict[str, Kind]:
    """Every spec prefix's :class:`Kind`: the ``KIND`` of each module of this package that has one."""
    found = {}
    for module in pkgutil.iter_modules(__path__):
        kind = getattr(importlib.import_module(f"{__name__}.{module.name}"), "KIND", None)
        if kind is not None:
            found[kind.prefix] = kind
    return found


def parse(spec: str) -> tuple[Kind, list[str]]:
    """The spec's kind and its arguments (the ``:``-separated parts after the prefix, or one path)."""
    prefix, _, rest = spec.partition(":")
    kind = kinds().get(prefix)
    if kind is None:
        usages = [k.usage for k in kinds().values()]
        raise SourceError(f"unknown source {spec!r}: use {', '.join(usages[:-1])} or {usages[-1]}")
    if kind.path:
        if not rest:
            raise SourceError(f"source {spec!r} needs a path: {prefix}:PATH")
        return kind, [rest]
    return kind, rest.split(":") if rest else []


def open_source(spec: str) -> Source:
    """The source named by ``spec`` (see the module docstring for the forms)."""
    kind, args = parse(spec)
    return kind.open(spec, args, None)


def open_split(spec: str, split: str) -> Source:
    """One split of ``spec``: ``split`` replaces a split in the spec (``fashion_mnist:train`` with
    ``split='test'`` reads the test set); folders read ``DIR/<split>``."""
    kind, args = parse(spec)
    return kind.open(spec, args, split_arg(spec, split))


def class_names(spec: str, split: str | None = None) -> list[str] | None:
    """The class names of ``spec``'s labels in label order, as zero-shot prompts name them, or None when
    its items have no class labels (emoji, ArrayRecord, tars) or the names are unknown.

    Fashion-MNIST's and digits' fixed names; a folder's sorted class-folder names with underscores as
    spaces (those of ``DIR/<split>`` when ``split`` is given, as :func:`load_arrays` labels them); a
    tfds dataset's ``ClassLabel`` names where its builder is available offline.
    """
    kind, args = parse(spec)
    return kind.class_names(args, split)


def _loaded(source: Source, limit: int | None, field: str, missing: str) -> tuple[np.ndarray, Sequence[Any]]:
    """The first ``limit`` (or all) images uint8 [N, H, W, C] of ``source`` and the items' ``field``
    (``label`` or ``caption``); an item without one is a SourceError "<key> <missing>"."""
    n = len(source) if limit is None else min(limit, len(source))
    if isinstance(source, ArraySource):  # no PNG round trip
        values = source.labels if field == "label" else source.captions
        if values is None:
            raise SourceError(f"{source.name} {missing}")
        return np.ascontiguousarray(source.images[:n]), values[:n]
    images, values = [], []
    for i in range(n):
        item = source[i]
        try:
            image = augment.decode_image(item["image"])
        except ValueError as e:
            raise SourceError(f"{item['key']}: {e}") from e
        if images and image.shape != images[0].shape:
            raise SourceError(
                f"{item['key']} is {image.shape}, other images are {images[0].shape}: "
                "loading needs one image size (resize the folder first)"
            )
        if item[field] is None:
            raise SourceError(f"{item['key']} {missing}")
        images.append(image)
        values.append(item[field])
    if not images:
        raise SourceError("no images to load")
    return np.stack(images), values


def load_arrays(spec: str, split: str = "train", limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """All (or the first ``limit``) images uint8 [N, H, W, C] and class labels [N] of one split
    (:func:`open_split`), all of one size, in host memory: for tests and tools on small sets (the
    evaluators stream their splits instead, :mod:`mlcd_jax.evaluate.stream`).
    """
    source = open_split(spec, split)
    images, labels = _loaded(source, limit, "label", NO_LABEL)
    return images, np.asarray(labels, np.int64)


def load_captioned(spec: str, split: str = "train", limit: int | None = None) -> tuple[np.ndarray, list[str]]:
    """All (or the first ``limit``) images uint8 [N, H, W, 3] (grayscale repeated) and captions of one split.

    For image–text retrieval: emoji, Fashion-MNIST and digits (templated captions), folders whose images
    have ``<stem>.txt`` captions (``DIR/<split>/...``). ``split`` replaces a split in ``spec``.
    """
    source = open_split(spec, split)
    images, captions = _loaded(source, limit, "caption", "has no caption (a sibling <stem>.txt)")
    return (images if images.shape[-1] == 3 else np.repeat(images, 3, axis=-1)), list(captions)
