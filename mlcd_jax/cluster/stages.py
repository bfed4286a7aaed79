"""The clustering job's stages, as runners see them.

- ``embed`` (each worker, its contiguous range of chunks; a chunk is ``shard_size`` images or one tar):
  decode, embed with the teacher, L2-normalise, write ``embeddings/<c>.npz`` (embeddings, source
  positions, the keys it skipped and why). Worker 0 (or the Beam launcher) first fits the teacher when it
  needs fitting (``teacher.npz``); other workers wait for it, and Beam workers only load it.
- ``kmeans``: a seeded sample of at most ``num_clusters * max_points_per_centroid`` embeddings, read from
  the embedding files part by part (never whole), spherical k-means one Lloyd iteration at a time
  (checkpointed by ``kmeans``, so it resumes), then ``centroids.npy`` (k x d, unit rows) and, for IVF,
  ``kmeans/ivf.faiss``. Flat: worker 0 / the launcher, streaming the sample in blocks of
  ``kmeans_stream_rows`` when it is larger. Hierarchical: worker ``w`` of ``n`` clusters parts ``w, w +
  n, ...`` (every worker runs this stage), worker 0 waits for all parts and merges them.
- ``assign`` (each worker, its chunks): top-l search, the shard, then ``assignments/<c>.npz`` (the chunk's
  completion marker).

``embed`` and ``assign`` are ``ChunkStage``s: ``todo()`` lists this worker's chunks without output,
``setup(pool)`` loads the model once per process, ``run_chunk`` does one chunk and returns counters.
A chunk's output is written last and atomically and a re-done chunk writes the same bytes, so any
runner may skip a chunk whose output exists and retry one that failed.
"""

from __future__ import annotations

import abc
import concurrent.futures
import functools
import os
import time
from collections.abc import Callable
from typing import ClassVar

import faiss
import jax
import numpy as np

from mlcd_jax import fileio
from mlcd_jax.cluster import kmeans, storage, teachers
from mlcd_jax.cluster.config import ClusterError
from mlcd_jax.cluster.context import Context, Loaded
from mlcd_jax.cluster.writer import write_shard
from mlcd_jax.data import records

Progress = Callable[[int], object]  # called with the number of images just done


def embed_batch(
    teacher: teachers.Teacher, loaded: list[Loaded]
) -> tuple[np.ndarray, np.ndarray, list[tuple[str, str]]]:
    """Unit embeddings of the decodable images of a batch, the mask of those, and (key, error) of the rest."""
    ok = np.array([im is not None for _, im, _ in loaded], bool)
    bad = [(key, err) for key, im, err in loaded if im is None]
    good = [im for _, im, _ in loaded if im is not None]
    if not good:
        return np.zeros((0, 0), np.float32), ok, bad
    return kmeans.l2_normalize(teacher(np.stack(good))), ok, bad


class ChunkStage(abc.ABC):
    """A stage done chunk by chunk; ``output(chunk)`` is written last and marks the chunk done."""

    name: ClassVar[str]
    description: ClassVar[str]  # the progress bar's label

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    @abc.abstractmethod
    def output(self, chunk: int) -> str:
        """The file whose presence marks ``chunk`` done."""

    def todo(self) -> list[int]:
        """This worker's chunks without output, once their inputs exist (waiting for other workers)."""
        chunks = self.ctx.my_chunks
        done = fileio.existing(self.output(ch) for ch in chunks)
        todo = [ch for ch in chunks if self.output(ch) not in done]
        if todo:
            self.wait_for_inputs(todo)
        return todo

    def wait_for_inputs(self, chunks: list[int]) -> None:
        """Returns once the files that ``chunks`` read exist; a stage with no such files returns at once."""

    @abc.abstractmethod
    def setup(self, pool: concurrent.futures.Executor) -> None:
        """Loads what ``run_chunk`` needs into this process (once per process)."""

    @abc.abstractmethod
    def run_chunk(
        self, chunk: int, pool: concurrent.futures.Executor, progress: Progress | None = None
    ) -> dict[str, int]:
        """Does ``chunk`` (idempotent); returns counters. ``progress(n)`` reports ``n`` images done."""


class Embed(ChunkStage):
    """``embeddings/<chunk>.npz``: the chunk's unit embeddings, their source indices, the skipped keys and why."""

    name = "embed"
    description = "embed"

    def __init__(self, ctx: Context, *, fit_teacher: bool = True) -> None:
        """``fit_teacher=False`` (Beam workers): a teacher that needs fitting must already be fitted."""
        super().__init__(ctx)
        self.fit_teacher = fit_teacher
        self.teacher: teachers.Teacher | None = None

    def output(self, chunk: int) -> str:
        return self.ctx.layout.embeddings(chunk)

    def setup(self, pool: concurrent.futures.Executor) -> None:
        """Loads the teacher; worker 0 fits it on a seeded sample when it needs fitting, others wait for it."""
        c = self.ctx.cfg
        sample = None
        if self.fit_teacher:
            if c.teacher == "pixels" and c.worker_index != 0:
                self.ctx.wait_for([os.path.join(c.output_dir, teachers.TEACHER_STATE)],
                                  "the fitted teacher (written by worker 0)")
            sample = functools.partial(self._fit_sample, pool)
        # the job runs on this process alone (a Beam worker, or process 0 of a training run)
        self.teacher = teachers.build_teacher(c.teacher, c, c.output_dir, sample, devices=jax.local_devices())

    def _fit_sample(self, pool: concurrent.futures.Executor) -> np.ndarray:
        """The decodable images of the teacher's fit set (``Context.fit_images``); the time this took goes
        to ``timings/teacher_fit.json``."""
        c = self.ctx.cfg
        t0 = time.perf_counter()
        images = self.ctx.fit_images(c.teacher_fit_samples, pool, c.pixels_size, 3)
        if not images:
            raise ClusterError(f"none of the sampled images of {c.source!r} could be decoded")
        seconds = time.perf_counter() - t0
        storage.save_json(self.ctx.layout.path("timings", "teacher_fit.json"), {"seconds": seconds})
        return np.stack(images)

    def run_chunk(
        self, chunk: int, pool: concurrent.futures.Executor, progress: Progress | None = None
    ) -> dict[str, int]:
        """Embeds one chunk into ``embeddings/<chunk>.npz``; counts ``images_embedded``, ``images_undecodable``."""
        assert self.teacher is not None, "setup() loads the teacher"
        c = self.ctx.cfg
        t0 = time.perf_counter()
        parts, kept, skipped = [], [], []
        batches = self.ctx.chunk_batches(chunk, pool, self.teacher.input_size, self.teacher.channels)
        # The next batch is read and decoded (on the pool's threads) while the teacher embeds this one.
        with concurrent.futures.ThreadPoolExecutor(1) as ahead:
            upcoming = ahead.submit(next, batches, None)
            while (batch := upcoming.result()) is not None:
                upcoming = ahead.submit(next, batches, None)
                positions, loaded = batch
                emb, ok, bad = embed_batch(self.teacher, loaded)
                if len(emb):
                    parts.append(emb.astype(c.embedding_dtype))
                kept.extend(np.asarray(positions)[ok].tolist())
                skipped.extend(bad)
                if progress:
                    progress(len(positions))
        storage.save_npz(
            self.output(chunk),
            embeddings=np.concatenate(parts) if parts else np.zeros((0, 0), c.embedding_dtype),
            index=np.asarray(kept, np.int64),
            skipped_keys=np.asarray([k for k, _ in skipped], dtype=str),
            skipped_errors=np.asarray([e for _, e in skipped], dtype=str),
            seconds=np.float64(time.perf_counter() - t0),
        )
        return {"images_embedded": len(kept), "images_undecodable": len(skipped)}


class Assign(ChunkStage):
    """Shard ``chunk`` (records with their top-l prototypes), then ``assignments/<chunk>.npz`` (labels, scores)."""

    name = "assign"
    description = "assign + write"

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        self.index: faiss.Index | None = None  # the centroids' search index, loaded by setup()

    def output(self, chunk: int) -> str:
        return self.ctx.layout.assignment(chunk)

    def wait_for_inputs(self, chunks: list[int]) -> None:
        layout = self.ctx.layout
        self.ctx.wait_for([layout.centroids], "centroids.npy (written by worker 0's kmeans stage)")
        self.ctx.wait_for([layout.embeddings(ch) for ch in chunks], "this worker's embeddings")

    def setup(self, pool: concurrent.futures.Executor) -> None:
        """Loads the index searched: the saved IVF index, or an exact one built from ``centroids.npy``."""
        layout, use_gpu, fp16 = self.ctx.layout, self.ctx.use_gpu, self.ctx.cfg.kmeans_fp16
        if self.ctx.index_kind == "ivf":
            with fileio.local_copy(layout.ivf_index) as path:
                self.index = kmeans.read_index(path, use_gpu=use_gpu, fp16=fp16)
        else:
            self.index = kmeans.build_index(storage.load_npy(layout.centroids), "flat", use_gpu=use_gpu, fp16=fp16)

    def run_chunk(
        self, chunk: int, pool: concurrent.futures.Executor, progress: Progress | None = None
    ) -> dict[str, int]:
        """Top-l assignment of one chunk, its shard, then its assignment file; counts ``records_written``."""
        assert self.index is not None, "setup() loads the index"
        c, layout = self.ctx.cfg, self.ctx.layout
        t0 = time.perf_counter()
        with storage.load_npz(layout.embeddings(chunk)) as z:
            emb, kept = z["embeddings"], z["index"]
        parts = [
            kmeans.assign_batch(self.index, emb[s : s + c.assign_batch_size].astype(np.float32), c.top_l, c.assign,
                                c.threshold)
            for s in range(0, len(emb), c.assign_batch_size)
        ]
        labels = np.concatenate([p[0] for p in parts]) if parts else np.zeros((0, c.top_l), np.int32)
        scores = np.concatenate([p[1] for p in parts]) if parts else np.zeros((0, c.top_l), np.float32)
        t1 = time.perf_counter()
        items = self.ctx.chunk_items(chunk, kept.tolist(), pool)
        write_shard(layout.shard(chunk), (records.encode(item["image"], lab, sc, item["key"], item.get("caption"))
                                          for item, lab, sc in zip(items, labels, scores, strict=True)))
        storage.save_npz(self.output(chunk), labels=labels, scores=scores, index=kept,
                         assign_seconds=np.float64(t1 - t0), write_seconds=np.float64(time.perf_counter() - t1))
        if progress:
            progress(self.ctx.chunk_size(chunk) or len(kept))
        return {"records_written": len(labels)}


def chunk_stage(name: str, ctx: Context, *, fit_teacher: bool = True) -> ChunkStage:
    """The chunked stage ``name`` (``embed`` or ``assign``) of ``ctx``; ``fit_teacher``: see ``Embed``."""
    if name == Embed.name:
        return Embed(ctx, fit_teacher=fit_teacher)
    if name == Assign.name:
        return Assign(ctx)
    raise ValueError(f"{name!r} is not a chunked stage: choose {Embed.name} or {Assign.name}")


class KMeans:
    """The k-means stage: sample the embeddings, cluster, save the search index, ``centroids.npy`` last.

    The sample is read from the embedding chunk files on demand (``kmeans.ChunkedSample``), so this
    process holds one part of it at a time: ``hierarchical``: one of ``kmeans_parts`` parts; worker w of
    n clusters parts w, w + n, ... (each marked done by its sizes file), then worker 0 waits for all
    parts and merges them. ``flat`` (worker 0 only): a sample of more than ``kmeans_stream_rows`` rows
    is streamed that many rows at a time per Lloyd iteration; a smaller one is clustered in memory.
    """

    name = "kmeans"

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def _embedding_files(self) -> list[str]:
        return [self.ctx.layout.embeddings(ch) for ch in range(self.ctx.layout.num_chunks)]

    def sample(self) -> kmeans.ChunkedSample:
        """A seeded sample (without replacement, in file order) of at most k * max_points_per_centroid
        embeddings; only the row counts are read here, the rows when the sample is indexed."""
        c = self.ctx.cfg
        counts = []
        for path in self._embedding_files():
            with storage.load_npz(path) as z:
                counts.append(len(z["index"]))
        total = int(sum(counts))
        if c.num_clusters > total:
            raise ClusterError(
                f"num_clusters={c.num_clusters} is more than the {total} decodable images: lower num_clusters"
            )
        size = min(total, c.num_clusters * c.max_points_per_centroid)
        picks = np.arange(total) if size == total else np.sort(np.random.default_rng(c.seed).choice(total, size, replace=False))
        return kmeans.ChunkedSample(self._embedding_files(), counts, picks)

    def run(self) -> None:
        """Resumes or runs this worker's share of k-means unless ``centroids.npy`` exists; waits for all
        workers' embeddings (and, on worker 0, for the other workers' hierarchical parts)."""
        ctx, layout, c = self.ctx, self.ctx.layout, self.ctx.cfg
        hierarchical = c.kmeans_method == "hierarchical"
        parts = c.kmeans_parts if hierarchical else 0
        mine = range(c.worker_index, parts, c.num_workers)
        if fileio.exists(layout.centroids) or (c.worker_index != 0 and not mine):
            return
        ctx.wait_for(self._embedding_files(), "the embeddings of all workers")
        t0 = time.perf_counter()
        x = self.sample()
        rows: kmeans.Rows = x
        stream = hierarchical or len(x) > c.kmeans_stream_rows
        desc = f"k-means ({c.kmeans_method}{', streamed' if stream else ''}) {len(x)}x{x.shape[1]} -> {c.num_clusters}"
        bar = ctx.bar((parts + 1) * c.kmeans_iters, desc, unit="it")
        bar.update(kmeans.iterations_done(layout.kmeans_dir, parts))

        def progress(_: int, obj: float) -> None:
            bar.set_postfix(objective=f"{obj:.4g}")
            bar.update(1)

        common = dict(use_gpu=ctx.use_gpu, fp16=c.kmeans_fp16, started=t0, progress=progress)
        state = kmeans.state_paths(layout.kmeans_dir, parts)[-1]
        if hierarchical:
            try:
                kmeans.check_parts(len(x), c.num_clusters, parts)
            except ValueError as e:
                raise ClusterError(f"{e} (kmeans_parts={parts})") from e
            args = (c.num_clusters, c.kmeans_iters, c.seed, parts)
            for p in mine:
                kmeans.kmeans_part(x, p, *args, state_dir=layout.kmeans_dir, **common)
            if c.worker_index != 0:
                bar.close()
                return
            ctx.wait_for(kmeans.part_sizes_paths(layout.kmeans_dir, parts), "the k-means parts of all workers")
            bar.update(kmeans.iterations_done(layout.kmeans_dir, parts) - bar.n)
            results = [kmeans.kmeans_part(x, p, *args, state_dir=layout.kmeans_dir) for p in range(parts)]  # loaded
            centroids, objectives = kmeans.merge_parts(
                results, c.num_clusters, c.kmeans_iters, c.seed, state_path=state, **common)
            block_rows: int | None = int(np.diff(kmeans.part_bounds(len(x), parts)).max())
        else:
            block_rows = c.kmeans_stream_rows if stream else None
            if not stream:
                rows = x[:]  # small enough for faiss in memory (the centroids of earlier versions)
            centroids, objectives = kmeans.spherical_kmeans(
                rows, c.num_clusters, c.kmeans_iters, c.seed, block_rows=block_rows, state_path=state, **common)
        bar.close()
        if ctx.index_kind == "ivf":
            index = kmeans.build_index(centroids, "ivf", nprobe=c.ivf_nprobe, seed=c.seed)
            with fileio.atomic_path(layout.ivf_index) as tmp:
                kmeans.write_index(index, tmp)
        storage.save_json(layout.kmeans_info, {
            "method": c.kmeans_method, "sample_size": len(x),
            # the last Lloyd iteration's objective (of the second level when hierarchical)
            "objective_per_point": objectives[-1] / len(x) if not hierarchical else None,
            "sample_mean_cosine": kmeans.mean_cosine_to_nearest(
                rows, centroids, use_gpu=ctx.use_gpu, block_rows=block_rows or kmeans.SEARCH_BATCH),
            "seconds": time.perf_counter() - t0,
        })
        storage.save_npy(layout.centroids, centroids)  # last: its presence marks the stage done
