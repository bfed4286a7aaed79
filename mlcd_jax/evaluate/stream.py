"""Features of a labelled eval split, streamed from its source (issue 30): the split is read in batches (a
ViT's: its extractor's ``batch_size``, ``eval.batch_size``; other embeddings: :data:`BATCH` images), each
batch decoded and brought to one shape on the host, embedded on the devices, and only the features
[N, d] (float32) and labels [N] are kept. Host memory holds two batches of images (one embedding while
the next decodes, on a thread per core), not the split, so it does not grow with the eval set.

A ViT's extractor takes the images as decoded, of any sizes, and brings them to the model's size on the
devices (:mod:`~mlcd_jax.data.eval_resize`: shorter side resized, centre crop, exactly as
:func:`~mlcd_jax.data.augment.resize_center_crop` does on the host). Other embeddings (the raw-pixel
baseline, which flattens its images) get a batch as decoded when its images share one shape, else each
image brought to the model's size on the host (:func:`~mlcd_jax.data.pipeline.eval_pixels`). Raw-pixel
sources (:class:`~mlcd_jax.data.sources.ArraySource`) are sliced, without a PNG round trip.

In a multi-process run each host reads and decodes only the rows of each batch that its own devices
embed (:meth:`~mlcd_jax.models.features.FeatureExtractor.own_rows`), and every process gets all the
features back; other embeddings (raw pixels, a teacher) read every batch on every process. Only
process 0 shows progress.
"""

from __future__ import annotations

import concurrent.futures
import os
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import jax
import numpy as np

from mlcd_jax.data import augment
from mlcd_jax.data.pipeline import eval_pixels
from mlcd_jax.data.source_base import SourceError
from mlcd_jax.data.sources import NO_LABEL, ArraySource, Source
from mlcd_jax.evaluate.progress import progress
from mlcd_jax.models.features import FeatureExtractor

BATCH = 256  # images read and decoded at a time for an embedding other than a FeatureExtractor (its own batch)
T = TypeVar("T")


def read_images(
    source: Source, rows: np.ndarray, image_size: int, pool: concurrent.futures.Executor | None = None,
    *, host_resize: bool = True,
) -> tuple[np.ndarray | list[np.ndarray], np.ndarray]:
    """Images uint8 [b, H, W, C] and labels int64 [b] of ``source``'s items ``rows``: as decoded when
    they share one shape, else each brought to ``image_size`` (3 channels), or with ``host_resize=False``
    a list of them as decoded (for a :class:`FeatureExtractor`, which resizes on the devices); decoded
    on ``pool``'s threads when given (PIL decodes without the GIL). An item that does not decode or has
    no label is a SourceError naming its key."""
    if isinstance(source, ArraySource):  # raw pixels: no PNG round trip
        return source.images[rows], read_labels(source, rows)

    def load(index: int) -> tuple[np.ndarray, int]:
        item = source[int(index)]
        try:
            image = augment.decode_image(item["image"])
        except ValueError as e:
            raise SourceError(f"{item['key']}: {e}") from e
        if item["label"] is None:
            raise SourceError(f"{item['key']} {NO_LABEL}")
        return image, item["label"]

    loaded = list(pool.map(load, rows) if pool is not None else map(load, rows))
    images = [image for image, _ in loaded]
    labels = np.asarray([label for _, label in loaded], np.int64)
    if any(image.shape != images[0].shape for image in images):
        if not host_resize:
            return images, labels
        images = [eval_pixels(image[None], image_size)[0] for image in images]
    return np.stack(images), labels


def _read_ahead(read: Callable[[int, concurrent.futures.Executor], T], starts: range) -> Iterator[T]:
    """``read(start, decoders)`` for each of ``starts`` in order, the next one read on a thread (its
    images decoded on ``decoders``, a thread per core) while the caller uses this one."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as decoders, \
            concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(read, starts[0], decoders) if starts else None
        for i in range(len(starts)):
            result = pending.result()
            if i + 1 < len(starts):
                pending = pool.submit(read, starts[i + 1], decoders)
            yield result


def _batches(
    source: Source, count: int, image_size: int, host_resize: bool, size: int
) -> Iterator[tuple[np.ndarray | list[np.ndarray], np.ndarray]]:
    """:func:`read_images` of the first ``count`` items in batches of ``size``, read ahead."""

    def read(start: int, decoders: concurrent.futures.Executor) -> tuple[np.ndarray | list[np.ndarray], np.ndarray]:
        rows = np.arange(start, min(start + size, count))
        return read_images(source, rows, image_size, decoders, host_resize=host_resize)

    return _read_ahead(read, range(0, count, size))


def read_labels(source: Source, rows: np.ndarray) -> np.ndarray:
    """Labels int64 [b] of ``source``'s items ``rows``, without decoding their images (a folder's from the
    paths, others' from the items)."""
    if isinstance(source, ArraySource):
        if source.labels is None:
            raise SourceError(f"{source.name} {NO_LABEL}")
        return np.asarray(source.labels[rows], np.int64)
    labels = []
    for index in rows:
        label = source.label(int(index)) if hasattr(source, "label") else source[int(index)]["label"]
        if label is None:
            raise SourceError(f"{source.key(int(index))} {NO_LABEL}")
        labels.append(label)
    return np.asarray(labels, np.int64)


def _own_rows_features(
    embed: FeatureExtractor, source: Source, count: int, image_size: int, name: str
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`split_features` in a multi-process run: of each batch, this process reads and decodes only
    the rows its devices hold (:meth:`FeatureExtractor.own_rows`), the next batch's on a thread while
    the devices embed this one; every process gets every feature back, and reads every label."""
    size, own = embed.batch_size, embed.own_rows()

    def read(start: int, decoders: concurrent.futures.Executor) -> tuple[int, dict[tuple[int, int], Any], np.ndarray]:
        n = min(size, count - start)
        parts = {(a, min(b, n)): read_images(source, np.arange(start + a, start + min(b, n)), image_size, decoders,
                                             host_resize=False)[0]
                 for a, b in own if a < n}
        return n, parts, read_labels(source, np.arange(start, start + n))

    labels = np.empty(count, np.int64)

    def batches(bar: Any) -> Iterator[tuple[int, Callable[[slice], np.ndarray]]]:
        for start, (n, parts, batch_labels) in zip(range(0, count, size), _read_ahead(read, range(0, count, size))):
            labels[start : start + n] = batch_labels
            bar.update(n)
            yield n, lambda part, parts=parts: parts[(part.start, part.stop)]

    with progress(count, f"features {name}", "img") as bar:
        features = np.asarray(embed.embed_batches(batches(bar)), np.float32)
    return features, labels


def split_features(
    embed: Callable[[np.ndarray], np.ndarray], source: Source, count: int, image_size: int, name: str
) -> tuple[np.ndarray, np.ndarray]:
    """``embed``'s features float32 [count, d] and the labels int64 [count] of ``source``'s first ``count``
    items, streamed (see the module docstring); ``name`` labels the progress bar ("features train")."""
    if count < 1:
        raise SourceError(f"{name}: no images to embed")
    if isinstance(embed, FeatureExtractor) and jax.process_count() > 1:
        return _own_rows_features(embed, source, count, image_size, name)
    features, labels = None, np.empty(count, np.int64)
    with progress(count, f"features {name}", "img") as bar:
        start = 0
        extractor = isinstance(embed, FeatureExtractor)
        for images, batch_labels in _batches(source, count, image_size, not extractor,
                                             embed.batch_size if extractor else BATCH):
            got = np.asarray(embed(images), np.float32)
            if features is None:
                features = np.empty((count, got.shape[1]), np.float32)
            elif got.shape[1] != features.shape[1]:
                raise SourceError(f"{name}: {source.key(start)} gives {got.shape[1]} features, earlier images "
                                  f"{features.shape[1]}: this target needs all images of one size")
            features[start : start + len(images)], labels[start : start + len(images)] = got, batch_labels
            start += len(images)
            bar.update(len(images))
    return features, labels
