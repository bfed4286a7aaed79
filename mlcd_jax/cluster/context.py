"""One worker's view of a clustering run: settings, source, output layout, its chunks, and the plumbing
every stage shares (progress bars, waiting for other workers' files, claiming ``output_dir``, loading
images for the teacher).

Work is cut into chunks: ``shard_size`` consecutive images of a random-access source, or one tar file of a
``wds:`` source (``mlcd_jax.data.webdataset``: read as a stream, its image count known once read). Chunk
``c`` becomes shard ``c`` whatever the number of workers, and worker ``w`` of ``n`` owns a contiguous
range of chunks, so the union of N workers' output is byte-identical to one worker's. An image's
*position* is its source index, or for a tar its place among the tar's entries.
"""

from __future__ import annotations

import concurrent.futures
import functools
import glob
import itertools
import math
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
from mlcd_jax.data import augment, webdataset
from mlcd_jax.data.sources import Source, identity_digest, open_source, source_identity

# (source key, image resized for the teacher or None when undecodable, the error or None)
Loaded = tuple[str, np.ndarray | None, str | None]
# (source key, encoded image bytes or None when unreadable, the error or None)
Encoded = tuple[str, bytes | None, str | None]
SOURCE_IDENTITY = "source_identity"  # job.json's record of the source (sources.source_identity)


class Context:
    """One worker's view of a clustering run (config completed, source opened, layout fixed)."""

    def __init__(self, config: ml_collections.ConfigDict) -> None:
        self.cfg = c = complete(config)
        self.source: Source | None = None  # a random-access source, or
        self.tars: webdataset.WebDatasetSource | None = None  # a wds: source (one chunk per tar file)
        self.num_images: int | None = None  # unknown for tars until they are read
        if c.source.startswith(webdataset.SPEC_PREFIX):
            if c.limit:
                raise ClusterError("limit does not apply to a wds: source (its size is known once read): "
                                   "name fewer tar files in the pattern instead")
            self.tars = webdataset.WebDatasetSource(c.source[len(webdataset.SPEC_PREFIX):])
            num_chunks = self.tars.num_shards
        else:
            self.source = open_source(c.source)
            self.num_images = len(self.source) if not c.limit else min(c.limit, len(self.source))
            if self.num_images == 0:
                raise ClusterError(f"source {c.source!r} has no images")
            if c.num_clusters > self.num_images:
                raise ClusterError(
                    f"num_clusters={c.num_clusters} is more than the {self.num_images} images of {c.source!r}: "
                    "lower num_clusters"
                )
            num_chunks = math.ceil(self.num_images / c.shard_size)
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

    def chunk_range(self, chunk: int) -> range:
        """The source indices of ``chunk`` (random-access sources only)."""
        assert self.num_images is not None, "a tar chunk has no index range: use chunk_size / chunk_batches"
        size = self.cfg.shard_size
        return range(chunk * size, min((chunk + 1) * size, self.num_images))

    def chunk_size(self, chunk: int) -> int | None:
        """How many images ``chunk`` has, or None (a tar, before it is read)."""
        return None if self.tars is not None else len(self.chunk_range(chunk))

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
        identity = (source_identity(self.source, self.num_images) if self.tars is None
                    else identity_digest(self.tars.identity_parts(), None))
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

    def _read(self, index: int) -> Encoded:
        """Source item ``index``'s key and encoded bytes, or the read error; never raises on bad data."""
        try:
            item = self.source[index]
        except OSError as e:  # e.g. a broken symlink in a folder source
            return self.source.key(index), None, f"unreadable ({e.strerror or e})"
        return item["key"], item["image"], None

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

    def load_images(
        self, indices: Iterable[int], pool: concurrent.futures.Executor, size: int, channels: int
    ) -> list[Loaded]:
        """The source images ``indices``, read on ``pool``, decoded and resized to ``size`` x ``size`` x ``channels``."""
        if not self.cfg.decode_processes:  # read and decode in one task per image
            return list(pool.map(lambda i: _prepare(self._read(i), size, channels), indices))
        return list(self._decode(pool.map(self._read, indices), pool, size, channels))

    def _load_entries(
        self, entries: list[webdataset.Sample | webdataset.Skipped], pool: concurrent.futures.Executor, size: int,
        channels: int,
    ) -> Iterator[Loaded]:
        """Tar entries submitted for decoding (a ``Skipped`` one passes through as undecodable)."""
        encoded = [(e.key, None, e.error) if isinstance(e, webdataset.Skipped) else (e.key, e.image, None)
                   for e in entries]
        return self._decode(encoded, pool, size, channels)

    def chunk_batches(
        self, chunk: int, pool: concurrent.futures.Executor, size: int, channels: int
    ) -> Iterator[tuple[list[int], list[Loaded]]]:
        """``chunk``'s images in batches of ``batch_size``: their positions and the loaded images.

        A tar is read as a stream on the caller's thread, a batch ahead of the decoding (on ``pool``'s
        threads, or on the ``decode_processes`` workers)."""
        bs = self.cfg.batch_size
        if self.tars is None:
            rng = self.chunk_range(chunk)
            for start in range(rng.start, rng.stop, bs):
                positions = list(range(start, min(start + bs, rng.stop)))
                yield positions, self.load_images(positions, pool, size, channels)
            return
        # The tar's next batch is read while the workers decode this one.
        entries = enumerate(self.tars.read(chunk))
        pending = None
        while True:
            batch = list(itertools.islice(entries, bs))
            submitted = None
            if batch:
                submitted = ([p for p, _ in batch], self._load_entries([e for _, e in batch], pool, size, channels))
            if pending is not None:
                yield pending[0], list(pending[1])
            if submitted is None:
                return
            pending = submitted

    def chunk_items(
        self, chunk: int, positions: list[int], pool: concurrent.futures.Executor
    ) -> Iterable[dict[str, Any]]:
        """The source items (key, image bytes, caption) at ``positions`` (ascending) of ``chunk``, in order.

        A tar is read again; an entry that is no longer the image it was when embedded (the tar changed
        in between) raises ``ClusterError`` instead of pairing labels with other images."""
        if self.tars is None:
            return pool.map(self.source.__getitem__, positions)
        return self._tar_items(chunk, positions)

    def _tar_items(self, chunk: int, positions: list[int]) -> Iterator[dict[str, Any]]:
        wanted = iter(positions)
        target = next(wanted, None)
        for position, entry in enumerate(self.tars.read(chunk)):
            if position != target:
                continue
            if not isinstance(entry, webdataset.Sample):
                break
            yield {"key": entry.key, "image": entry.image, "caption": entry.caption}
            target = next(wanted, None)
        if target is not None:
            raise ClusterError(f"{self.tars.shards[chunk]} changed since it was embedded (entry {target} is no "
                               "longer a readable image): re-run with a new output_dir")

    def fit_images(self, n: int, pool: concurrent.futures.Executor, size: int, channels: int) -> list[np.ndarray]:
        """The decodable images of a teacher's fit set of ``n``: a seeded sample of a random-access source,
        or a tar source's first ``n`` entries in shard order (reading no more tars than that takes)."""
        if self.tars is None:
            rng = np.random.default_rng(self.cfg.seed)
            n = min(n, self.num_images)
            picks = np.sort(rng.choice(self.num_images, n, replace=False))
            loaded = self.load_images(picks.tolist(), pool, size, channels)
        else:
            entries = itertools.chain.from_iterable(self.tars.read(s) for s in range(self.tars.num_shards))
            loaded = list(self._load_entries(list(itertools.islice(entries, n)), pool, size, channels))
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
