"""One worker's view of a clustering run: settings, source, output layout, its chunks, and the plumbing
every stage shares (progress bars, waiting for other workers' files, claiming ``output_dir``, loading
images for the teacher).

Work is cut into the source's chunks (:func:`mlcd_jax.data.chunks.open_chunks`, the only way the job
reads a source): ``shard_size`` consecutive images of a random-access source, or one tar file of a
``wds:`` source (read as a stream, its image count known once read). Chunk ``c`` becomes shard ``c``
whatever the number of workers, and worker ``w`` of ``n`` owns a contiguous range of chunks, so the
union of N workers' output is byte-identical to one worker's. An image's *position* is its source
index, or for a tar its place among the tar's entries.
"""

from __future__ import annotations

import concurrent.futures
import functools
import glob
import multiprocessing
import os
import time
from collections.abc import Iterable, Iterator
from typing import Any

import ml_collections
import numpy as np
from tqdm import tqdm

from mlcd_jax import fileio
from mlcd_jax.cluster import kmeans, storage
from mlcd_jax.cluster.config import IVF_FROM_K, OUTPUT_SETTINGS, ClusterError, complete, default_config
from mlcd_jax.data import augment
from mlcd_jax.data.chunks import open_chunks
from mlcd_jax.data.source_base import Encoded, Read

# (source key, image resized for the teacher or None when undecodable, the error or None)
Loaded = tuple[str, np.ndarray | None, str | None]
SOURCE_IDENTITY = "source_identity"  # job.json's record of the source (sources.source_identity)


class Context:
    """One worker's view of a clustering run (config completed, source opened, layout fixed)."""

    def __init__(self, config: ml_collections.ConfigDict) -> None:
        self.cfg = c = complete(config)
        self.chunks = open_chunks(c.source, c.shard_size, c.limit)
        self.num_images = self.chunks.num_images  # None for a streamed source until it is read
        if self.num_images == 0:
            raise ClusterError(f"source {c.source!r} has no images")
        if self.num_images is not None and c.num_clusters > self.num_images:
            raise ClusterError(
                f"num_clusters={c.num_clusters} is more than the {self.num_images} images of {c.source!r}: "
                "lower num_clusters"
            )
        num_chunks = self.chunks.num_chunks
        self.layout = storage.Layout(c.output_dir, num_chunks)
        self.settings = {key: c[key] for key in OUTPUT_SETTINGS}
        if c.kmeans_method != "hierarchical":
            del self.settings["kmeans_parts"]  # changes nothing for flat k-means
        else:
            del self.settings["kmeans_stream_rows"]  # parts are streamed whatever it is
        w, n = c.worker_index, c.num_workers
        self.my_chunks = range(w * num_chunks // n, (w + 1) * num_chunks // n)
        self.use_gpu = kmeans.gpu_available() if c.use_gpu is None else bool(c.use_gpu)
        if c.kmeans_fp16 and not self.use_gpu:
            print("notice: kmeans_fp16 applies to GPU faiss only; this run uses the CPU in float32", flush=True)
        self.threads = c.decode_threads or os.cpu_count() or 1
        self._decoders: concurrent.futures.ProcessPoolExecutor | None = None  # decode_processes > 0

    @property
    def index_kind(self) -> str:
        """The centroids' search index: ``flat`` (exact) or ``ivf`` (``index=auto``: ivf from ``IVF_FROM_K`` on)."""
        if self.cfg.index != "auto":
            return self.cfg.index
        return "ivf" if self.cfg.num_clusters >= IVF_FROM_K else "flat"

    def chunk_size(self, chunk: int) -> int | None:
        """How many images ``chunk`` has, or None (a tar, before it is read)."""
        return self.chunks.chunk_size(chunk)

    def bar(self, total: int | None, desc: str, unit: str = "img") -> tqdm:
        """A progress bar, silent unless ``config.progress``."""
        return tqdm(total=total, desc=desc, unit=unit, disable=not self.cfg.progress, dynamic_ncols=True)

    def wait_for(self, paths: list[str], what: str) -> None:
        """Returns once all ``paths`` exist: at once, by waiting for other workers, or raises."""
        deadline = time.monotonic() + self.cfg.wait_timeout_s
        announced = False
        while True:
            present = fileio.existing(paths)
            missing = [p for p in paths if p not in present]
            if not missing:
                return
            if self.cfg.num_workers == 1:
                raise ClusterError(f"{what} is missing ({missing[0]}): run its stage first")
            if time.monotonic() > deadline:
                raise ClusterError(f"gave up after {self.cfg.wait_timeout_s}s waiting for {what} ({missing[0]})")
            if not announced:
                print(f"worker {self.cfg.worker_index}: waiting for {what} ({len(missing)} files)", flush=True)
                announced = True
            time.sleep(2.0)

    def claim(self) -> None:
        """Writes ``job.json`` (the settings and the source's identity) or checks that the one there has
        the same settings and source: chunk c's records pair the source's images of chunk c with labels
        computed earlier, so a source that gained, lost or renamed images must not be resumed."""
        identity = self.chunks.identity()
        if fileio.exists(self.layout.job):
            recorded = fileio.load_json(self.layout.job)
            defaults = default_config()
            have = {**{k: defaults[k] for k in OUTPUT_SETTINGS}, **recorded}
            diff = {k: (have.get(k), v) for k, v in self.settings.items() if have.get(k) != v}
            if diff:
                raise ClusterError(
                    f"{self.cfg.output_dir} holds a job with other settings {diff} (theirs, yours): "
                    "use a new output_dir"
                )
            then = recorded.get(SOURCE_IDENTITY)
            if then is not None and then != identity:
                raise ClusterError(
                    f"the source {self.cfg.source!r} changed since {self.cfg.output_dir} was started "
                    f"({then['num_images']} images then, {identity['num_images']} now; names or files differ; "
                    "None: a wds: source, whose tar names are compared): "
                    "its records would get other images' labels; use a new output_dir, or delete this one "
                    "to start fresh"
                )
        else:
            storage.save_json(self.layout.job, {**self.settings, SOURCE_IDENTITY: identity})
        if self.cfg.num_workers == 1:  # nobody else writes here: drop temp files of a killed run
            for stale in glob.glob(os.path.join(self.cfg.output_dir, "**", ".*.tmp"), recursive=True):
                os.remove(stale)

    def _load(self, reads: list[Read], pool: concurrent.futures.Executor, size: int, channels: int) -> Iterator[Loaded]:
        """The images ``reads`` read, submitted now for reading and decoding to ``size`` x ``size`` x
        ``channels``, returned in order as done."""
        if not self.cfg.decode_processes:  # read and decode in one task per image
            return pool.map(lambda read: _prepare(read(), size, channels), reads)
        return self._decode(pool.map(lambda read: read(), reads), pool, size, channels)

    def _decode(
        self, encoded: Iterable[Encoded], pool: concurrent.futures.Executor, size: int, channels: int
    ) -> Iterator[Loaded]:
        """Encoded images decoded and resized for the teacher, submitted now, returned in order as done:
        on ``decode_processes`` worker processes (no GIL between them: what a many-core host needs to keep
        an accelerator fed) or on ``pool``'s threads."""
        work = functools.partial(_prepare, size=size, channels=channels)
        if not self.cfg.decode_processes:
            return pool.map(work, encoded)
        if self._decoders is None:  # spawned, not forked: this process may already run JAX's threads
            self._decoders = concurrent.futures.ProcessPoolExecutor(
                self.cfg.decode_processes, mp_context=multiprocessing.get_context("spawn"))
        encoded = list(encoded)
        return self._decoders.map(work, encoded, chunksize=max(1, len(encoded) // (2 * self.cfg.decode_processes)))

    def chunk_batches(
        self, chunk: int, pool: concurrent.futures.Executor, size: int, channels: int
    ) -> Iterator[tuple[list[int], list[Loaded]]]:
        """``chunk``'s images in batches of ``batch_size``: their positions and the loaded images. The
        next batch is read (a tar: as a stream, on the caller's thread) while this one is decoded (on
        ``pool``'s threads, or on the ``decode_processes`` workers)."""
        pending = None
        for positions, reads in self.chunks.batches(chunk, self.cfg.batch_size):
            submitted = positions, self._load(reads, pool, size, channels)
            if pending is not None:
                yield pending[0], list(pending[1])
            pending = submitted
        if pending is not None:
            yield pending[0], list(pending[1])

    def chunk_items(
        self, chunk: int, positions: list[int], pool: concurrent.futures.Executor
    ) -> Iterable[dict[str, Any]]:
        """The source items (key, image bytes, caption) at ``positions`` (ascending) of ``chunk``, in order;
        one that changed since it was embedded raises instead of pairing labels with other images."""
        return self.chunks.items(chunk, positions, pool)

    def fit_images(self, n: int, pool: concurrent.futures.Executor, size: int, channels: int) -> list[np.ndarray]:
        """The decodable images of a teacher's fit set of ``n``: a seeded sample of a random-access source,
        or a tar source's first ``n`` entries in shard order (reading no more tars than that takes)."""
        loaded = self._load(self.chunks.fit_sample(n, self.cfg.seed), pool, size, channels)
        return [im for _, im, _ in loaded if im is not None]


def _prepare(encoded: Encoded, size: int, channels: int) -> Loaded:
    """An encoded image decoded and resized for the teacher, or its error. A large JPEG decodes at the
    smallest DCT scale that still covers ``size`` (PIL's draft mode), as the training loader does."""
    key, data, error = encoded
    if data is None:
        return key, None, error
    try:
        image = augment.decode_image(data, min_side=size)
    except ValueError as e:
        return key, None, str(e)
    return key, augment.resize_center_crop(augment.to_channels(image, channels), size), None
