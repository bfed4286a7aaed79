"""The offline clustering job: embed -> spherical k-means -> top-l assignment -> ArrayRecord shards.

Work is cut into chunks of ``shard_size`` consecutive source images; chunk ``c`` becomes shard ``c``
whatever the number of workers, so the union of N workers' output is byte-identical to one worker's.

Stages (``config.stages``: ``all`` or a comma list):

- ``embed`` (each worker, its contiguous range of chunks): decode, embed with the teacher, L2-normalise,
  write ``embeddings/<c>.npz`` (embeddings, source indices, the keys it skipped and why). Worker 0 first
  fits the teacher when it needs fitting (``teacher.npz``); other workers wait for it.
- ``kmeans`` (worker 0 only): a seeded sample of at most ``num_clusters * max_points_per_centroid``
  embeddings, spherical k-means one Lloyd iteration at a time (checkpointed, so it resumes), then
  ``centroids.npy`` (k x d, unit rows) and, for IVF, ``kmeans/ivf.faiss``.
- ``assign`` (each worker, its chunks): top-l search, the shard, then ``assignments/<c>.npz`` (the chunk's
  completion marker).
- ``finalize`` (worker 0): ``manifest.json``; with ``stages=all`` every worker returns it.

Each output is written to a temp file and renamed (on ``gs://`` uploaded whole, see ``storage``); a re-run
skips what exists, so a killed job resumes and a finished job (manifest present, same settings) returns
at once without touching a file. With ``num_workers > 1`` and ``stages=all`` a worker waits (polling,
``wait_timeout_s``) for outputs of other workers; a single worker that misses an input raises instead.
``runner=beam`` runs the embed and assign stages as Apache Beam pipelines over the same per-chunk
methods (``embed_chunk``, ``assign_chunk``) and the rest in this process: ``mlcd_jax.cluster.beam``.
"""

from __future__ import annotations

import concurrent.futures
import glob
import math
import os
import time
from collections.abc import Callable, Iterable
from typing import Any

import faiss
import ml_collections
import numpy as np
from tqdm import tqdm

from mlcd_jax import fileio
from mlcd_jax.cluster import kmeans, storage, teachers
from mlcd_jax.cluster.writer import encode_record, write_shard
from mlcd_jax.data import augment, records
from mlcd_jax.data.sources import Source, open_source

MANIFEST_VERSION = 1
STAGES = ("embed", "kmeans", "assign", "finalize")
RUNNERS = ("local", "beam")
# Settings that change the output; execution knobs (workers, GPU, threads, batch size) are left out.
OUTPUT_SETTINGS = (
    "source", "limit", "teacher", "pixels_size", "pixels_dim", "teacher_fit_samples", "embedding_dtype",
    "num_clusters", "kmeans_iters", "max_points_per_centroid", "kmeans_method", "kmeans_parts", "kmeans_fp16",
    "seed", "top_l", "assign", "threshold",
    "index", "ivf_nprobe", "shard_size",
)
IVF_FROM_K = 200_000  # index=auto uses IVF from this many centroids on (exact search is fine below)


class ClusterError(ValueError):
    """Bad job settings or inputs; the message names the value and the fix."""


def default_config() -> ml_collections.ConfigDict:
    """Every key of the job with its default; ``source``, ``output_dir``, ``num_clusters`` must be set."""
    c = ml_collections.ConfigDict()
    c.source = ""  # folder:DIR | fashion_mnist[:DIR][:SPLIT] | digits[:SPLIT] | tfds:NAME[:SPLIT] | arrayrecord:GLOB
    c.limit = 0  # use only the first `limit` source images (0 = all)
    c.output_dir = ""
    c.teacher = "pixels"  # pixels | hf:DIR | checkpoint:WORKDIR
    c.pixels_size = 16  # pixels teacher: images down-sampled to this square (RGB) ...
    c.pixels_dim = 64  # ... and projected on this many principal components
    c.teacher_fit_samples = 10_000  # images (seeded sample) a teacher that needs fitting is fitted on
    c.embedding_dtype = "float16"  # on-disk embeddings: float16 halves the disk of a 400M x 768 run
    c.num_clusters = 0
    c.kmeans_iters = 20
    c.max_points_per_centroid = 256  # k-means sample = min(N, k * this), as faiss does
    c.kmeans_method = "flat"  # flat | hierarchical (each of kmeans_parts parts to k, then their union to k)
    c.kmeans_parts = 8  # hierarchical only: every part needs >= num_clusters sampled points
    c.kmeans_fp16 = False  # GPU faiss only: centroids stored in float16 on the GPU(s)
    c.seed = 0
    c.top_l = 8
    c.assign = "topl"  # topl | threshold (the paper's Tab. 5d: positives = top-l with cosine >= threshold)
    c.threshold = 0.5
    c.index = "auto"  # flat (exact) | ivf | auto (ivf from 200K centroids on)
    c.ivf_nprobe = 64
    c.shard_size = 10_000  # images per chunk = per output shard
    c.num_workers = 1
    c.worker_index = 0
    c.stages = "all"
    c.use_gpu = ml_collections.config_dict.placeholder(bool)  # None = auto (GPU faiss importable and a GPU seen)
    c.batch_size = 256  # images per teacher call
    c.assign_batch_size = 65_536  # queries per faiss search
    c.decode_threads = 0  # 0 = one per CPU core
    c.wait_timeout_s = 86_400.0
    c.progress = True
    c.runner = "local"  # local (this process, one of num_workers) | beam (Apache Beam: mlcd_jax.cluster.beam)
    c.beam_options = ""  # runner=beam: Beam pipeline options, e.g. "--runner=DataflowRunner --project=P ..."
    c.dry_run = False  # print the plan (with runner=beam: the pipeline options) and exit; nothing is written
    return c


def _complete(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``config`` over the defaults; unknown keys and bad values raise ``ClusterError``."""
    full = default_config()
    unknown = sorted(set(config.keys()) - set(full.keys()))
    if unknown:
        raise ClusterError(f"unknown clustering config keys {unknown}; known: {sorted(full.keys())}")
    with full.unlocked():
        full.update(dict(config.items()))
    if not full.source:
        raise ClusterError("config.source is empty: set e.g. --config.source=folder:/path/to/images")
    if not full.output_dir:
        raise ClusterError("config.output_dir is empty: set --config.output_dir=DIR")
    if full.num_clusters < 1:
        raise ClusterError(f"num_clusters={full.num_clusters} must be >= 1")
    if full.top_l < 1 or full.top_l > full.num_clusters:
        raise ClusterError(f"top_l={full.top_l} must be in [1, num_clusters={full.num_clusters}]")
    if full.assign not in ("topl", "threshold"):
        raise ClusterError(f"assign={full.assign!r}: choose topl or threshold")
    if full.index not in ("auto", "flat", "ivf"):
        raise ClusterError(f"index={full.index!r}: choose auto, flat or ivf")
    if not 0 <= full.worker_index < full.num_workers:
        raise ClusterError(f"worker_index={full.worker_index} must be in [0, num_workers={full.num_workers})")
    if full.shard_size < 1 or full.kmeans_iters < 1:
        raise ClusterError("shard_size and kmeans_iters must be >= 1")
    if full.kmeans_method not in kmeans.METHODS:
        raise ClusterError(f"kmeans_method={full.kmeans_method!r}: choose {' or '.join(kmeans.METHODS)}")
    if full.kmeans_method == "hierarchical" and full.kmeans_parts > full.max_points_per_centroid:
        raise ClusterError(
            f"kmeans_parts={full.kmeans_parts} > max_points_per_centroid={full.max_points_per_centroid}: a part "
            "would get fewer sampled points than num_clusters; lower kmeans_parts"
        )
    if full.embedding_dtype not in ("float16", "float32"):
        raise ClusterError(f"embedding_dtype={full.embedding_dtype!r}: choose float16 or float32")
    if full.runner not in RUNNERS:
        raise ClusterError(f"runner={full.runner!r}: choose {' or '.join(RUNNERS)}")
    if full.runner == "beam" and full.num_workers != 1:
        raise ClusterError("runner=beam spreads the chunks over the Beam workers itself: leave num_workers=1")
    teachers.check_spec(full.teacher)
    return full


def _stages(spec: str) -> tuple[str, ...]:
    chosen = STAGES if spec == "all" else tuple(s.strip() for s in spec.split(",") if s.strip())
    bad = [s for s in chosen if s not in STAGES]
    if bad or not chosen:
        raise ClusterError(f"stages={spec!r}: use all or a comma list of {', '.join(STAGES)}")
    return chosen


class Job:
    """One worker's view of a clustering run (config completed, source opened, layout fixed)."""

    def __init__(self, config: ml_collections.ConfigDict) -> None:
        self.cfg = c = _complete(config)
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

    # ------------------------------------------------------------------------------------ plumbing

    def chunk_range(self, chunk: int) -> range:
        size = self.cfg.shard_size
        return range(chunk * size, min((chunk + 1) * size, self.num_images))

    def _bar(self, total: int, desc: str, unit: str = "img") -> tqdm:
        return tqdm(total=total, desc=desc, unit=unit, disable=not self.cfg.progress, dynamic_ncols=True)

    def _await(self, paths: list[str], what: str) -> None:
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
        """Writes ``job.json`` or checks that the one there has the same settings."""
        if fileio.exists(self.layout.job):
            have = {**{k: default_config()[k] for k in OUTPUT_SETTINGS}, **fileio.load_json(self.layout.job)}
            diff = {k: (have.get(k), v) for k, v in self.settings.items() if have.get(k) != v}
            if diff:
                raise ClusterError(
                    f"{self.cfg.output_dir} holds a job with other settings {diff} (theirs, yours): "
                    "use a new output_dir"
                )
        else:
            storage.save_json(self.layout.job, self.settings)
        if self.cfg.num_workers == 1:  # nobody else writes here: drop temp files of a killed run
            for stale in glob.glob(os.path.join(self.cfg.output_dir, "**", ".*.tmp"), recursive=True):
                os.remove(stale)

    def _load(self, index: int, size: int, channels: int) -> tuple[str, np.ndarray | None, str | None]:
        """(key, image prepared for the teacher or None, error) of one source image; never raises on bad data."""
        try:
            item = self.source[index]
        except OSError as e:
            return str(index), None, f"unreadable ({e})"
        try:
            image = augment.decode_image(item["image"])
        except ValueError as e:
            return item["key"], None, str(e)
        return item["key"], augment.resize_center_crop(augment.to_channels(image, channels), size), None

    def load_batch(self, indices: Iterable[int], pool, size: int, channels: int):
        return list(pool.map(lambda i: self._load(i, size, channels), indices))

    # ------------------------------------------------------------------------------------ stages

    def teacher(self, pool) -> teachers.Teacher:
        """The job's teacher; worker 0 fits it (on a seeded sample) when it needs fitting."""
        c = self.cfg
        state = os.path.join(c.output_dir, teachers.TEACHER_STATE)
        if c.teacher == "pixels" and c.worker_index != 0:
            self._await([state], "the fitted teacher (written by worker 0)")

        def sample() -> np.ndarray:
            t0 = time.perf_counter()
            rng = np.random.default_rng(c.seed)
            n = min(c.teacher_fit_samples, self.num_images)
            picks = np.sort(rng.choice(self.num_images, n, replace=False))
            images = [im for _, im, _ in self.load_batch(picks.tolist(), pool, c.pixels_size, 3) if im is not None]
            if not images:
                raise ClusterError(f"none of the {n} sampled images of {c.source!r} could be decoded")
            storage.save_json(self.layout.path("timings", "teacher_fit.json"), {"seconds": time.perf_counter() - t0})
            return np.stack(images)

        return teachers.build_teacher(c.teacher, c, c.output_dir, sample)

    def embed_todo(self) -> list[int]:
        """This worker's chunks that have no embeddings yet."""
        done = fileio.existing(self.layout.embeddings(ch) for ch in self.my_chunks)
        return [ch for ch in self.my_chunks if self.layout.embeddings(ch) not in done]

    def embed(self, pool) -> None:
        todo = self.embed_todo()
        if not todo:
            return
        teacher = self.teacher(pool)
        bar = self._bar(sum(len(self.chunk_range(ch)) for ch in todo), "embed")
        for chunk in todo:
            self.embed_chunk(chunk, teacher, pool, bar.update)
        bar.close()

    def embed_chunk(
        self, chunk: int, teacher: teachers.Teacher, pool, progress: Callable[[int], object] | None = None
    ) -> tuple[int, int]:
        """Embeds one chunk into ``embeddings/<chunk>.npz`` (atomically); returns (embedded, undecodable) counts.

        ``progress(n)`` is called after each batch of ``n`` images. Idempotent: a re-run writes the same arrays.
        """
        t0 = time.perf_counter()
        parts, kept, skipped = [], [], []
        rng = self.chunk_range(chunk)
        for start in range(rng.start, rng.stop, self.cfg.batch_size):
            indices = range(start, min(start + self.cfg.batch_size, rng.stop))
            emb, ok, bad = embed_batch(teacher, self.load_batch(indices, pool, teacher.input_size, teacher.channels))
            if len(emb):
                parts.append(emb.astype(self.cfg.embedding_dtype))
            kept.extend(np.asarray(indices)[ok].tolist())
            skipped.extend(bad)
            if progress:
                progress(len(indices))
        storage.save_npz(
            self.layout.embeddings(chunk),
            embeddings=np.concatenate(parts) if parts else np.zeros((0, 0), self.cfg.embedding_dtype),
            index=np.asarray(kept, np.int64),
            skipped_keys=np.asarray([k for k, _ in skipped], dtype=str),
            skipped_errors=np.asarray([e for _, e in skipped], dtype=str),
            seconds=np.float64(time.perf_counter() - t0),
        )
        return len(kept), len(skipped)

    def _all_embeddings(self) -> list[str]:
        return [self.layout.embeddings(ch) for ch in range(self.layout.num_chunks)]

    def sample_embeddings(self) -> np.ndarray:
        """A seeded sample (without replacement) of at most k * max_points_per_centroid embeddings, float32."""
        c = self.cfg
        counts = []
        for path in self._all_embeddings():
            with storage.load_npz(path) as z:
                counts.append(len(z["index"]))
        total = int(sum(counts))
        if c.num_clusters > total:
            raise ClusterError(
                f"num_clusters={c.num_clusters} is more than the {total} decodable images: lower num_clusters"
            )
        size = min(total, c.num_clusters * c.max_points_per_centroid)
        picks = np.arange(total) if size == total else np.sort(np.random.default_rng(c.seed).choice(total, size, replace=False))
        offsets = np.concatenate([[0], np.cumsum(counts)])
        rows = []
        for chunk, path in enumerate(self._all_embeddings()):
            local = picks[(picks >= offsets[chunk]) & (picks < offsets[chunk + 1])] - offsets[chunk]
            if len(local):
                with storage.load_npz(path) as z:
                    rows.append(z["embeddings"][local].astype(np.float32))
        return kmeans.l2_normalize(np.concatenate(rows))

    def index_kind(self) -> str:
        if self.cfg.index != "auto":
            return self.cfg.index
        return "ivf" if self.cfg.num_clusters >= IVF_FROM_K else "flat"

    def kmeans(self) -> None:
        if fileio.exists(self.layout.centroids):
            return
        self._await(self._all_embeddings(), "the embeddings of all workers")
        c = self.cfg
        t0 = time.perf_counter()
        x = self.sample_embeddings()
        hierarchical = c.kmeans_method == "hierarchical"
        levels = c.kmeans_parts + 1 if hierarchical else 1
        desc = f"k-means ({c.kmeans_method}) {len(x)}x{x.shape[1]} -> {c.num_clusters}"
        bar = self._bar(levels * c.kmeans_iters, desc, unit="it")
        state_paths = kmeans.state_paths(self.layout.kmeans_dir, c.kmeans_parts if hierarchical else 0)
        for done in fileio.existing(state_paths):
            with storage.load_npz(done) as z:
                bar.update(int(z["iteration"]))

        def progress(_: int, obj: float) -> None:
            bar.set_postfix(objective=f"{obj:.4g}")
            bar.update(1)

        def save_state(path: str, centroids: np.ndarray, iteration: int, objectives: list[float]) -> None:
            storage.save_npz(path, centroids=centroids, iteration=np.int64(iteration),
                             objectives=np.asarray(objectives), seconds=np.float64(time.perf_counter() - t0))

        common = dict(use_gpu=self.use_gpu, fp16=c.kmeans_fp16, save_state=save_state, progress=progress)
        if hierarchical:
            try:
                centroids, objectives = kmeans.hierarchical_kmeans(
                    x, c.num_clusters, c.kmeans_iters, c.seed, c.kmeans_parts, state_dir=self.layout.kmeans_dir,
                    **common)
            except ValueError as e:
                raise ClusterError(f"{e} (kmeans_parts={c.kmeans_parts})") from e
        else:
            centroids, objectives = kmeans.spherical_kmeans(
                x, c.num_clusters, c.kmeans_iters, c.seed, state_path=state_paths[-1], **common)
        bar.close()
        if self.index_kind() == "ivf":
            index = kmeans.build_index(centroids, "ivf", nprobe=c.ivf_nprobe, seed=c.seed)
            with fileio.atomic_path(self.layout.ivf_index) as tmp:
                faiss.write_index(index, tmp)
        storage.save_json(self.layout.kmeans_info, {
            "method": c.kmeans_method, "sample_size": len(x),
            # the last Lloyd iteration's objective (of the second level when hierarchical)
            "objective_per_point": objectives[-1] / len(x) if not hierarchical else None,
            "sample_mean_cosine": kmeans.mean_cosine_to_nearest(x, centroids, use_gpu=self.use_gpu),
            "seconds": time.perf_counter() - t0,
        })
        storage.save_npy(self.layout.centroids, centroids)  # last: its presence marks the stage done

    def search_index(self) -> faiss.Index:
        """The faiss index over the job's centroids that the assign stage searches: the saved IVF index,
        or an exact one built from ``centroids.npy``."""
        fp16 = self.cfg.kmeans_fp16
        if self.index_kind() == "ivf":
            with fileio.local_copy(self.layout.ivf_index) as path:
                return kmeans.read_index(path, use_gpu=self.use_gpu, fp16=fp16)
        return kmeans.build_index(storage.load_npy(self.layout.centroids), "flat", use_gpu=self.use_gpu, fp16=fp16)

    def assign_todo(self) -> list[int]:
        """This worker's chunks without assignments, once their inputs (centroids, embeddings) exist."""
        done = fileio.existing(self.layout.assignment(ch) for ch in self.my_chunks)
        todo = [ch for ch in self.my_chunks if self.layout.assignment(ch) not in done]
        if todo:
            self._await([self.layout.centroids], "centroids.npy (written by worker 0's kmeans stage)")
            self._await([self.layout.embeddings(ch) for ch in todo], "this worker's embeddings")
        return todo

    def assign(self, pool) -> None:
        todo = self.assign_todo()
        if not todo:
            return
        index = self.search_index()
        bar = self._bar(sum(len(self.chunk_range(ch)) for ch in todo), "assign + write")
        for chunk in todo:
            self.assign_chunk(chunk, index, pool)
            bar.update(len(self.chunk_range(chunk)))
        bar.close()

    def assign_chunk(self, chunk: int, index: faiss.Index, pool) -> int:
        """Top-l assignment of one chunk: shard ``chunk``, then ``assignments/<chunk>.npz``; returns the records.

        The assignment file is written last and marks the chunk done; a re-run rewrites the same bytes.
        """
        c = self.cfg
        t0 = time.perf_counter()
        with storage.load_npz(self.layout.embeddings(chunk)) as z:
            emb, kept = z["embeddings"], z["index"]
        parts = [
            kmeans.assign_batch(index, emb[s : s + c.assign_batch_size].astype(np.float32), c.top_l, c.assign, c.threshold)
            for s in range(0, len(emb), c.assign_batch_size)
        ]
        labels = np.concatenate([p[0] for p in parts]) if parts else np.zeros((0, c.top_l), np.int32)
        scores = np.concatenate([p[1] for p in parts]) if parts else np.zeros((0, c.top_l), np.float32)
        t1 = time.perf_counter()
        items = pool.map(self.source.__getitem__, kept.tolist())
        write_shard(self.layout.shard(chunk),
                    (encode_record(item, lab, sc) for item, lab, sc in zip(items, labels, scores)))
        storage.save_npz(self.layout.assignment(chunk), labels=labels, scores=scores, index=kept,
                         assign_seconds=np.float64(t1 - t0), write_seconds=np.float64(time.perf_counter() - t1))
        return len(labels)

    def finalize(self) -> dict[str, Any]:
        """Aggregates every chunk into ``manifest.json`` (and returns it)."""
        chunks = range(self.layout.num_chunks)
        self._await([self.layout.shard(ch) for ch in chunks] + [self.layout.assignment(ch) for ch in chunks],
                    "the shards of all workers")
        c = self.cfg
        t0 = time.perf_counter()
        dim = storage.npy_shape(self.layout.centroids)[1]
        sizes = np.zeros(c.num_clusters, np.int64)
        top1 = topl = positives = 0.0
        seconds = {"embed": 0.0, "assign": 0.0, "write": 0.0}
        shards, skipped = [], []
        for ch in chunks:
            with storage.load_npz(self.layout.embeddings(ch)) as z:
                seconds["embed"] += float(z["seconds"])
                skipped += [{"key": k, "error": e} for k, e in zip(z["skipped_keys"].tolist(), z["skipped_errors"].tolist())]
            with storage.load_npz(self.layout.assignment(ch)) as z:
                labels, scores = z["labels"], z["scores"]
                seconds["assign"] += float(z["assign_seconds"])
                seconds["write"] += float(z["write_seconds"])
            valid = labels >= 0
            sizes += np.bincount(labels[:, 0], minlength=c.num_clusters)
            top1 += float(scores[:, 0].sum())
            topl += float(scores[valid].sum())
            positives += float(valid.sum())
            shards.append({"path": self.layout.shard_name(ch), "num_records": len(labels)})
        num_images = sum(s["num_records"] for s in shards)
        fit = self.layout.path("timings", "teacher_fit.json")
        if fileio.exists(fit):
            seconds["teacher_fit"] = fileio.load_json(fit)["seconds"]
        kmeans_info = fileio.load_json(self.layout.kmeans_info)
        seconds["kmeans"] = kmeans_info.pop("seconds")
        nonempty = sizes[sizes > 0]
        manifest = {
            "schema_version": MANIFEST_VERSION,
            "record_version": records.VERSION,
            "source": c.source,
            "teacher": c.teacher,
            "embedding_dim": int(dim),
            "num_clusters": c.num_clusters,
            "top_l": c.top_l,
            "assign": c.assign,
            "threshold": c.threshold if c.assign == "threshold" else None,
            "label_padding": "label -1, score -inf" if c.assign == "threshold" else None,
            "index": self.index_kind(),
            "num_source_images": self.num_images,
            "num_images": num_images,
            "num_skipped": len(skipped),
            "skipped": skipped,
            "shards": shards,
            "centroids": "centroids.npy",
            "kmeans": kmeans_info,
            "cluster_sizes_top1": {
                "empty": int((sizes == 0).sum()),
                "largest": int(sizes.max()),
                "smallest_nonempty": int(nonempty.min()) if len(nonempty) else 0,
                "mean": float(sizes.mean()),
            },
            "mean_top1_cosine": top1 / max(num_images, 1),
            "mean_topl_cosine": topl / max(positives, 1.0),
            "mean_positives": positives / max(num_images, 1),
            "seconds": {**seconds, "finalize": time.perf_counter() - t0},
            "settings": self.settings,
        }
        storage.save_json(self.layout.manifest, manifest)
        return manifest


def embed_batch(
    teacher: teachers.Teacher, loaded: list[tuple[str, np.ndarray | None, str | None]]
) -> tuple[np.ndarray, np.ndarray, list[tuple[str, str]]]:
    """Unit embeddings of the decodable images of a batch, the mask of those, and (key, error) of the rest."""
    ok = np.array([im is not None for _, im, _ in loaded], bool)
    bad = [(key, err) for key, im, err in loaded if im is None]
    good = [im for _, im, _ in loaded if im is not None]
    if not good:
        return np.zeros((0, 0), np.float32), ok, bad
    return kmeans.l2_normalize(teacher(np.stack(good))), ok, bad


def run(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Runs (or resumes) this worker's stages; returns the manifest (``stages`` with ``finalize``) or a status.

    A finished job with the same settings returns its manifest without recomputing or rewriting anything.
    """
    job = Job(config)
    c = job.cfg
    stages = _stages(c.stages)
    beam = _beam_runner() if c.runner == "beam" else None
    if c.dry_run:
        plan = {"runner": c.runner, "source": c.source, "output_dir": c.output_dir, "num_images": job.num_images,
                "num_chunks": job.layout.num_chunks, "stages": list(stages),
                "chunk_range": [job.my_chunks.start, job.my_chunks.stop]}
        return plan if beam is None else {**plan, **beam.describe(c)}
    if fileio.exists(job.layout.manifest):
        job.claim()  # raises if the settings differ
        return fileio.load_json(job.layout.manifest)
    job.claim()
    if beam is not None:
        beam.run_stages(job, stages)
    else:
        with concurrent.futures.ThreadPoolExecutor(job.threads) as pool:
            if "embed" in stages:
                job.embed(pool)
            if "kmeans" in stages and c.worker_index == 0:
                job.kmeans()
            if "assign" in stages:
                job.assign(pool)
    if "finalize" in stages:
        if c.worker_index == 0:
            return job.finalize()
        job._await([job.layout.manifest], "manifest.json (written by worker 0)")
        return fileio.load_json(job.layout.manifest)
    return {"worker_index": c.worker_index, "stages": list(stages), "chunks": list(job.my_chunks)}


def _beam_runner():
    """``mlcd_jax.cluster.beam``, or a ``ClusterError`` naming the extra to install."""
    try:
        from mlcd_jax.cluster import beam
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] != "apache_beam":
            raise
        raise ClusterError("runner=beam needs Apache Beam: pip install 'mlcd_jax[beam]'") from None
    return beam


def load_teacher(output_dir: str) -> teachers.Teacher:
    """The teacher of a finished (or embedded) job, as it was fitted, for evaluation baselines."""
    job_path = os.path.join(output_dir, "job.json")
    if not fileio.exists(job_path):
        raise ClusterError(f"{output_dir} has no job.json: not a clustering job's output_dir")
    settings = fileio.load_json(job_path)
    config = default_config()
    config.update({k: v for k, v in settings.items() if k in config})
    return teachers.build_teacher(settings["teacher"], config, output_dir)
