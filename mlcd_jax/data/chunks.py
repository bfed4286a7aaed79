"""Any source spec opened as :class:`~mlcd_jax.data.source_base.Chunks`, what the clustering job reads.

A random-access source (every spec :func:`mlcd_jax.data.sources.open_source` opens) is cut into chunks of
``shard_size`` consecutive images of its first ``limit``; a streamed source (a source kind with
``chunks``: ``wds:`` tar files, one chunk per tar) brings its own chunks. A new source of either sort
is one module of :mod:`mlcd_jax.data.sources`.
"""

from __future__ import annotations

import concurrent.futures
import functools
import math
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from mlcd_jax.data.source_base import Chunks, Encoded, Read
from mlcd_jax.data.sources import Source, parse, source_identity



class IndexedChunks(Chunks):
    """A random-access source's first ``limit`` images (0: all), ``shard_size`` to a chunk."""

    def __init__(self, source: Source, shard_size: int, limit: int = 0) -> None:
        self.source, self.shard_size = source, shard_size
        self.num_images = len(source) if not limit else min(limit, len(source))
        self.num_chunks = math.ceil(self.num_images / shard_size)

    def _range(self, chunk: int) -> range:
        return range(chunk * self.shard_size, min((chunk + 1) * self.shard_size, self.num_images))

    def chunk_size(self, chunk: int) -> int:
        return len(self._range(chunk))

    def identity(self) -> dict[str, Any]:
        return source_identity(self.source, self.num_images)

    def _read(self, index: int) -> Encoded:
        """Item ``index``'s key and encoded bytes, or the read error; never raises on bad data."""
        try:
            item = self.source[index]
        except OSError as e:  # e.g. a broken symlink in a folder source
            return self.source.key(index), None, f"unreadable ({e.strerror or e})"
        return item["key"], item["image"], None

    def batches(self, chunk: int, size: int) -> Iterator[tuple[list[int], list[Read]]]:
        indices = self._range(chunk)
        for start in range(indices.start, indices.stop, size):
            positions = list(range(start, min(start + size, indices.stop)))
            yield positions, [functools.partial(self._read, i) for i in positions]

    def items(self, chunk: int, positions: list[int], pool: concurrent.futures.Executor) -> Iterable[dict[str, Any]]:
        return pool.map(self.source.__getitem__, positions)

    def fit_sample(self, n: int, seed: int) -> list[Read]:
        n = min(n, self.num_images)
        picks = np.sort(np.random.default_rng(seed).choice(self.num_images, n, replace=False))
        return [functools.partial(self._read, i) for i in picks.tolist()]


def open_chunks(spec: str, shard_size: int, limit: int = 0) -> Chunks:
    """The chunks of source ``spec``: its streamed source's, or ``shard_size`` images each of its first
    ``limit`` (0: all); a spec that names nothing usable is a ``SourceError``."""
    kind, args = parse(spec)
    if kind.chunks is not None:
        return kind.chunks(args, limit)
    return IndexedChunks(kind.open(spec, args, None), shard_size, limit)
