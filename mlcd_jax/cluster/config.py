"""The clustering job's settings: every key with its default, their validation, and the stage list.

Imports neither faiss nor the job's machinery, so config files (``configs/cluster/*.py``, the trainer's
``data.cluster``) can build a clustering config cheaply.
"""

from __future__ import annotations

import ml_collections

from mlcd_jax.cluster import teachers

STAGES = ("embed", "kmeans", "assign", "finalize")
RUNNERS = ("local", "beam")
KMEANS_METHODS = ("flat", "hierarchical")
# Settings that change the output; execution knobs (workers, GPU, threads, batch size) are left out.
OUTPUT_SETTINGS = (
    "source", "limit", "teacher", "teacher_dtype", "pixels_size", "pixels_dim", "teacher_fit_samples", "embedding_dtype",
    "num_clusters", "kmeans_iters", "max_points_per_centroid", "kmeans_method", "kmeans_parts", "kmeans_fp16",
    "kmeans_stream_rows",
    "seed", "top_l", "assign", "threshold",
    "index", "ivf_nprobe", "shard_size",
)
IVF_FROM_K = 200_000  # index=auto uses IVF from this many centroids on (exact search is fine below)


class ClusterError(ValueError):
    """Bad job settings or inputs; the message names the value and the fix."""


def default_config() -> ml_collections.ConfigDict:
    """Every key of the job with its default; ``source``, ``output_dir``, ``num_clusters`` must be set."""
    c = ml_collections.ConfigDict()
    c.source = ""  # folder:DIR | fashion_mnist[:DIR][:SPLIT] | digits[:SPLIT] | tfds:NAME[:SPLIT] | arrayrecord:GLOB | wds:PATTERN
    c.limit = 0  # use only the first `limit` source images (0 = all)
    c.output_dir = ""
    c.teacher = "pixels"  # pixels | hf:DIR | hf-hub:ORG/NAME[@REV] | checkpoint:WORKDIR
    c.teacher_dtype = ""  # hf / checkpoint compute dtype: "" = its own (hf float32, a run's model.dtype) | bfloat16 | float32
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
    # flat only: a larger sample is streamed from the embedding files, this many rows in memory at a time
    # (6 GiB at 768-d), with its own initialisation (other, equally good centroids); a smaller one is
    # clustered whole in memory by faiss. Hierarchical k-means always streams, one part at a time.
    c.kmeans_stream_rows = 2_000_000
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
    # > 0: decode on this many worker processes instead of threads (Python's per-image work holds the GIL:
    # threads stop scaling at ~2 cores; on a many-core accelerator host use about one per core)
    c.decode_processes = 0
    c.wait_timeout_s = 86_400.0
    c.progress = True
    c.runner = "local"  # local (this process, one of num_workers) | beam (Apache Beam: cluster/runners/beam.py)
    c.beam_options = ""  # runner=beam: Beam pipeline options, e.g. "--runner=DataflowRunner --project=P ..."
    c.dry_run = False  # print the plan (with runner=beam: the pipeline options) and exit; nothing is written
    return c


def complete(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
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
    if full.decode_processes < 0 or full.decode_threads < 0:
        raise ClusterError("decode_threads and decode_processes must be >= 0")
    if full.shard_size < 1 or full.kmeans_iters < 1:
        raise ClusterError("shard_size and kmeans_iters must be >= 1")
    if full.kmeans_stream_rows < 1:
        raise ClusterError(f"kmeans_stream_rows={full.kmeans_stream_rows} must be >= 1")
    if full.kmeans_method not in KMEANS_METHODS:
        raise ClusterError(f"kmeans_method={full.kmeans_method!r}: choose {' or '.join(KMEANS_METHODS)}")
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
    if full.teacher_dtype not in teachers.TEACHER_DTYPES:
        raise ClusterError(f"teacher_dtype={full.teacher_dtype!r}: choose one of {teachers.TEACHER_DTYPES}")
    return full


def parse_stages(spec: str) -> tuple[str, ...]:
    """The stages of ``config.stages`` (``all`` or a comma list of ``STAGES``), in the order given."""
    chosen = STAGES if spec == "all" else tuple(s.strip() for s in spec.split(",") if s.strip())
    bad = [s for s in chosen if s not in STAGES]
    if bad or not chosen:
        raise ClusterError(f"stages={spec!r}: use all or a comma list of {', '.join(STAGES)}")
    return chosen
