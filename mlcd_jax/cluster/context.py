"""One worker's view of a clustering run: settings, source, output layout, its chunks, and the plumbing
every stage shares (progress bars, waiting for other workers' files, claiming ``output_dir``, loading
images for the teacher).

Work is cut into chunks of ``shard_size`` consecutive source images; chunk ``c`` becomes shard ``c``
whatever the number of workers, and worker ``w`` of ``n`` owns a contiguous range of chunks, so the
union of N workers' output is byte-identical to one worker's.
"""

from __future__ import annotations

import concurrent.futures
import glob
import math
import os
import time
from collections.abc import Iterable

import ml_collections
import numpy as np
from tqdm import tqdm

from mlcd_jax import fileio
from mlcd_jax.cluster import kmeans, storage
from mlcd_jax.cluster.config import IVF_FROM_K, OUTPUT_SETTINGS, ClusterError, complete, default_config
from mlcd_jax.data import augment
from mlcd_jax.data.sources import Source, open_source, source_identity

# (source key, image resized for the teacher or None when undecodable, the error or None)
Loaded = tuple[str, np.ndarray | None, str | None]
SOURCE_IDENTITY = "source_identity"  # job.json's record of the source (sources.source_identity)


class Context:
    """One worker's view of a clustering run (config completed, source opened, layout fixed)."""

    def __init__(self, config: ml_collections.ConfigDict) -> None:
        self.cfg = c = complete(config)
        self.source: Source = open_source(c.source)
        self.num_images = len(self.source) if not c.limit else min(c.limit, len(self.source))
        if self.num_images == 0:
            raise ClusterError(f"source {c.source!r} has no images")
        if c.num_clusters > self.num_images:
            raise ClusterError(
                f"num_clusters={c.num_clusters} is more than the {self.num_images} images of {c.source!r}: "
                "lower num_clusters"
            )
        self.layout = storage.Layout(c.output_dir, math.ceil(self.num_images / c.shard_size))
        self.settings = {key: c[key] for key in OUTPUT_SETTINGS}
        if c.kmeans_method != "hierarchical":
            del self.settings["kmeans_parts"]  # changes nothing for flat k-means
        w, n = c.worker_index, c.num_workers
        chunks = self.layout.num_chunks
        self.my_chunks = range(w * chunks // n, (w + 1) * chunks // n)
        self.use_gpu = kmeans.gpu_available() if c.use_gpu is None else bool(c.use_gpu)
        if c.kmeans_fp16 and not self.use_gpu:
            print("notice: kmeans_fp16 applies to GPU faiss only; this run uses the CPU in float32", flush=True)
        self.threads = c.decode_threads or os.cpu_count() or 1

    @property
    def index_kind(self) -> str:
        """The centroids' search index: ``flat`` (exact) or ``ivf`` (``index=auto``: ivf from ``IVF_FROM_K`` on)."""
        if self.cfg.index != "auto":
            return self.cfg.index
        return "ivf" if self.cfg.num_clusters >= IVF_FROM_K else "flat"

    def chunk_range(self, chunk: int) -> range:
        """The source indices of ``chunk``."""
        size = self.cfg.shard_size
        return range(chunk * size, min((chunk + 1) * size, self.num_images))

    def bar(self, total: int, desc: str, unit: str = "img") -> tqdm:
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
        identity = source_identity(self.source, self.num_images)
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
                    f"({then['num_images']} images then, {identity['num_images']} now; names or files differ): "
                    "its records would get other images' labels; use a new output_dir, or delete this one "
                    "to start fresh"
                )
        else:
            storage.save_json(self.layout.job, {**self.settings, SOURCE_IDENTITY: identity})
        if self.cfg.num_workers == 1:  # nobody else writes here: drop temp files of a killed run
            for stale in glob.glob(os.path.join(self.cfg.output_dir, "**", ".*.tmp"), recursive=True):
                os.remove(stale)

    def _load(self, index: int, size: int, channels: int) -> Loaded:
        """One source image prepared for the teacher; never raises on bad data."""
        try:
            item = self.source[index]
        except OSError as e:  # e.g. a broken symlink in a folder source
            return self.source.key(index), None, f"unreadable ({e.strerror or e})"
        try:
            image = augment.decode_image(item["image"])
        except ValueError as e:
            return item["key"], None, str(e)
        return item["key"], augment.resize_center_crop(augment.to_channels(image, channels), size), None

    def load_images(
        self, indices: Iterable[int], pool: concurrent.futures.Executor, size: int, channels: int
    ) -> list[Loaded]:
        """The source images ``indices``, decoded on ``pool`` and resized to ``size`` x ``size`` x ``channels``."""
        return list(pool.map(lambda i: self._load(i, size, channels), indices))
