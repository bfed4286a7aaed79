"""Features of a labelled eval split, streamed from its source (issue 30): the split is read in batches of
:data:`BATCH` images, each batch decoded and brought to one shape on the host, embedded on the devices,
and only the features [N, d] (float32) and labels [N] are kept. Host memory holds two batches of images
(one embedding while the next decodes, on a thread per core), not the split, so it does not grow with
the eval set.

A batch whose images all have one shape goes to the embedding as decoded (a ViT's extractor brings it to
the model's size itself, the raw-pixel baseline flattens it: the same numbers as a split loaded whole);
a batch of mixed sizes is brought to the model's size image by image first (shorter side resized,
centre crop: :func:`~mlcd_jax.data.pipeline.eval_pixels`), as a batch needs one shape. Raw-pixel
sources (:class:`~mlcd_jax.data.sources.ArraySource`) are sliced, without a PNG round trip.

In a multi-process run every process reads the same batches and calls the embedding with the same
inputs, as :class:`~mlcd_jax.models.features.FeatureExtractor` needs; only process 0 shows progress.
"""

from __future__ import annotations

import concurrent.futures
import os
from collections.abc import Callable, Iterator

import numpy as np

from mlcd_jax.data import augment
from mlcd_jax.data.pipeline import eval_pixels
from mlcd_jax.data.source_base import SourceError
from mlcd_jax.data.sources import ArraySource, Source
from mlcd_jax.evaluate.progress import progress

BATCH = 256  # images read, decoded and embedded at a time (FeatureExtractor's default batch)
NO_LABEL = "has no class label (folders: DIR/<split>/<class>/...)"


def read_images(
    source: Source, rows: np.ndarray, image_size: int, pool: concurrent.futures.Executor | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 [b, H, W, C] and labels int64 [b] of ``source``'s items ``rows``: as decoded when
    they share one shape, else each brought to ``image_size`` (3 channels); decoded on ``pool``'s
    threads when given (PIL decodes without the GIL). An item that does not decode or has no label is a
    SourceError naming its key."""
    if isinstance(source, ArraySource):  # raw pixels: no PNG round trip
        if source.labels is None:
            raise SourceError(f"{source.name} {NO_LABEL}")
        return source.images[rows], np.asarray(source.labels[rows], np.int64)

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
    if any(image.shape != images[0].shape for image in images):
        images = [eval_pixels(image[None], image_size)[0] for image in images]
    return np.stack(images), np.asarray([label for _, label in loaded], np.int64)


def _batches(source: Source, count: int, image_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """:func:`read_images` of the first ``count`` items in batches of :data:`BATCH`, the next batch read
    (and decoded on a thread per core) while the caller embeds this one."""
    starts = range(0, count, BATCH)
    decoders = concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1)

    def read(start: int) -> tuple[np.ndarray, np.ndarray]:
        return read_images(source, np.arange(start, min(start + BATCH, count)), image_size, decoders)

    with decoders, concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(read, starts[0]) if starts else None
        for start in starts:
            batch = pending.result()
            pending = pool.submit(read, start + BATCH) if start + BATCH < count else None
            yield batch


def split_features(
    embed: Callable[[np.ndarray], np.ndarray], source: Source, count: int, image_size: int, name: str
) -> tuple[np.ndarray, np.ndarray]:
    """``embed``'s features float32 [count, d] and the labels int64 [count] of ``source``'s first ``count``
    items, streamed (see the module docstring); ``name`` labels the progress bar ("features train")."""
    if count < 1:
        raise SourceError(f"{name}: no images to embed")
    features, labels = None, np.empty(count, np.int64)
    with progress(count, f"features {name}", "img") as bar:
        start = 0
        for images, batch_labels in _batches(source, count, image_size):
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
