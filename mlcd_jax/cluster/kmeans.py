"""Spherical k-means (faiss, one resumable Lloyd iteration at a time) and top-l prototype assignment.

Two k-means methods (the job's ``kmeans_method``):

- ``flat``: Lloyd iterations on the whole sample (faiss ``Clustering``), checkpointed per iteration.
- ``hierarchical`` (the two-level scheme UNICOM describes): the sample is cut into ``parts`` contiguous
  parts, each clustered to k on its own, then the union of the parts' ``parts * k`` centroids is
  clustered to k, each weighted by how many sample points it holds. Per Lloyd iteration it costs the
  same FLOPs as ``flat`` (parts x (N/parts) x k x d) plus ``parts * k * k * d`` for the second level; what
  it buys is that each part fits one accelerator (or one machine) on its own and parts are
  independent. Parts run one after another here; each is checkpointed, so a killed job resumes.

Checkpoints (this module's format, ``state_paths``): one ``.npz`` per level with the centroids after the
last finished Lloyd iteration, how many iterations are done, the objectives so far and the seconds since
the run started; a run given the same files resumes after the last finished iteration.

On a GPU build of faiss every index (k-means assignment and top-l search) is spread over all visible
GPUs (centroids sharded when there are several), optionally storing the centroids in float16
(``fp16``: half the GPU memory of a 1M x 768 index, a little precision).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable

import faiss
import numpy as np

from mlcd_jax import fileio
from mlcd_jax.cluster import storage
from mlcd_jax.data import records


def gpu_available() -> bool:
    """True when the imported faiss is a GPU build that sees at least one GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _to_gpu(index: faiss.Index, fp16: bool = False) -> faiss.Index:
    """``index`` on all visible GPUs: sharded over them when there are several, float16 storage if asked."""
    options = faiss.GpuMultipleClonerOptions()
    options.useFloat16 = fp16
    options.shard = faiss.get_num_gpus() > 1
    return faiss.index_cpu_to_all_gpus(index, co=options)


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (all-zero rows stay zero), float32."""
    x = np.asarray(x, np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def lloyd_step(
    x: np.ndarray,
    centroids: np.ndarray | None,
    k: int,
    seed: int,
    use_gpu: bool,
    *,
    weights: np.ndarray | None = None,
    fp16: bool = False,
) -> tuple[np.ndarray, float]:
    """One spherical k-means iteration on unit rows ``x`` (faiss initialises from ``x`` when ``centroids`` is None).

    faiss also re-seeds empty clusters by splitting large ones, and re-normalises the centroids.
    ``weights`` (one per row) weight the centroid means. Returns the new unit centroids [k, d] and the
    objective (sum of cosines to the assigned centroid, unweighted).
    """
    d = x.shape[1]
    clus = faiss.Clustering(d, k)
    clus.niter, clus.seed, clus.spherical, clus.verbose = 1, seed, True, False
    clus.max_points_per_centroid = max(1, math.ceil(len(x) / k))  # the job already sampled: use every row
    clus.min_points_per_centroid = 1
    if centroids is not None:
        faiss.copy_array_to_vector(np.ascontiguousarray(centroids, np.float32).ravel(), clus.centroids)
    index = faiss.IndexFlatIP(d)
    w = None if weights is None else np.ascontiguousarray(weights, np.float32)
    clus.train(np.ascontiguousarray(x, np.float32), _to_gpu(index, fp16) if use_gpu else index, weights=w)
    new = faiss.vector_to_array(clus.centroids).reshape(k, d)
    return l2_normalize(new), float(clus.iteration_stats.at(0).obj)


def state_paths(state_dir: str, parts: int) -> list[str]:
    """The checkpoint files of a k-means run in ``state_dir``: one per part (``parts`` > 0 for the
    hierarchical method), then the last level's ``state.npz``."""
    return [os.path.join(state_dir, f"part-{p:04d}.npz") for p in range(parts)] + [os.path.join(state_dir, "state.npz")]


def _save_state(path: str, centroids: np.ndarray, iteration: int, objectives: list[float], seconds: float) -> None:
    """Checkpoints one level after ``iteration`` finished Lloyd iterations (atomically)."""
    storage.save_npz(path, centroids=centroids, iteration=np.int64(iteration),
                     objectives=np.asarray(objectives), seconds=np.float64(seconds))


def iterations_done(state_dir: str, parts: int) -> int:
    """Lloyd iterations, over all levels, that the checkpoints in ``state_dir`` hold (a resumed run's progress)."""
    done = 0
    for path in fileio.existing(state_paths(state_dir, parts)):
        with storage.load_npz(path) as z:
            done += int(z["iteration"])
    return done


def spherical_kmeans(
    x: np.ndarray,
    k: int,
    iters: int,
    seed: int,
    *,
    weights: np.ndarray | None = None,
    use_gpu: bool = False,
    fp16: bool = False,
    state_path: str | None = None,
    started: float | None = None,
    progress: Callable[[int, float], None] | None = None,
) -> tuple[np.ndarray, list[float]]:
    """``iters`` Lloyd iterations; resumes from / checkpoints to ``state_path`` after every iteration.

    Iteration ``i`` uses seed ``seed + i``, so a resumed run computes the same centroids as an
    uninterrupted one. A checkpoint's seconds count from ``started`` (a ``time.perf_counter()``; default:
    this call). ``progress(iterations done, objective)`` is called after every iteration.
    """
    if k > len(x):
        raise ValueError(f"num_clusters={k} is more than the {len(x)} sampled embeddings")
    started = time.perf_counter() if started is None else started
    centroids, objectives, start = None, [], 0
    if state_path and fileio.exists(state_path):
        with storage.load_npz(state_path) as z:
            centroids, start, objectives = z["centroids"], int(z["iteration"]), z["objectives"].tolist()
    for i in range(start, iters):
        centroids, obj = lloyd_step(x, centroids, k, seed + i, use_gpu, weights=weights, fp16=fp16)
        objectives.append(obj)
        if state_path:
            _save_state(state_path, centroids, i + 1, objectives, time.perf_counter() - started)
        if progress:
            progress(i + 1, obj)
    return centroids, objectives


def hierarchical_kmeans(
    x: np.ndarray,
    k: int,
    iters: int,
    seed: int,
    parts: int,
    *,
    use_gpu: bool = False,
    fp16: bool = False,
    state_dir: str | None = None,
    started: float | None = None,
    progress: Callable[[int, float], None] | None = None,
) -> tuple[np.ndarray, list[float]]:
    """Two-level k-means: each of ``parts`` contiguous parts of ``x`` to k, then the weighted union to k.

    Part ``p`` uses seeds from ``seed + (p + 1) * iters``; the second level uses ``seed``. Each level
    checkpoints to its file of ``state_paths(state_dir, parts)``. ``progress`` is called once per Lloyd
    iteration of either level (``(parts + 1) * iters`` calls in all). Returns the unit centroids [k, d]
    and the second level's objectives.
    """
    if parts < 1 or len(x) // parts < k:
        raise ValueError(
            f"hierarchical k-means with {parts} parts of {len(x)} points leaves {len(x) // max(parts, 1)} "
            f"per part, fewer than k={k}: lower the number of parts or sample more points"
        )
    started = time.perf_counter() if started is None else started
    bounds = np.linspace(0, len(x), parts + 1).astype(int)
    paths = state_paths(state_dir, parts) if state_dir else [None] * (parts + 1)
    union, counts = [], []
    for p in range(parts):
        part = x[bounds[p] : bounds[p + 1]]
        centroids, _ = spherical_kmeans(
            part, k, iters, seed + (p + 1) * iters, use_gpu=use_gpu, fp16=fp16,
            state_path=paths[p], started=started, progress=progress,
        )
        _, nearest = build_index(centroids, "flat", use_gpu=use_gpu, fp16=fp16).search(part, 1)
        union.append(centroids)
        counts.append(np.bincount(nearest[:, 0], minlength=k))
    weights = np.concatenate(counts).astype(np.float32)
    keep = weights > 0  # a centroid that holds no point carries no information
    return spherical_kmeans(
        np.concatenate(union)[keep], k, iters, seed, weights=weights[keep], use_gpu=use_gpu, fp16=fp16,
        state_path=paths[-1], started=started, progress=progress,
    )


def mean_cosine_to_nearest(x: np.ndarray, centroids: np.ndarray, *, use_gpu: bool = False, batch: int = 65_536) -> float:
    """The spherical k-means objective per point: mean cosine of unit rows ``x`` to their nearest centroid."""
    index = build_index(centroids, "flat", use_gpu=use_gpu)
    total = 0.0
    for s in range(0, len(x), batch):
        scores, _ = index.search(np.ascontiguousarray(x[s : s + batch], np.float32), 1)
        total += float(scores.sum())
    return total / max(len(x), 1)


def build_index(
    centroids: np.ndarray, kind: str, *, nprobe: int = 64, seed: int = 0, use_gpu: bool = False, fp16: bool = False
) -> faiss.Index:
    """Inner-product index over unit centroids: ``flat`` (exact) or ``ivf`` (IVF-Flat, nlist = 4·√k)."""
    k, d = centroids.shape
    centroids = np.ascontiguousarray(centroids, np.float32)
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "ivf":
        nlist = max(1, min(k // 39 or 1, int(4 * math.sqrt(k))))  # faiss wants >= 39 points per list
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed, index.cp.spherical = seed, True
        index.train(centroids)
        index.nprobe = min(nprobe, nlist)
    else:
        raise ValueError(f"index kind {kind!r}: choose flat or ivf")
    index.add(centroids)
    return _to_gpu(index, fp16) if use_gpu else index


def write_index(index: faiss.Index, path: str) -> None:
    """Saves a CPU ``index`` (the job's IVF index) to the local file ``path``."""
    faiss.write_index(index, path)


def read_index(path: str, *, use_gpu: bool = False, fp16: bool = False) -> faiss.Index:
    """An index saved by ``write_index``, optionally moved to the GPU(s)."""
    index = faiss.read_index(path)
    return _to_gpu(index, fp16) if use_gpu else index


def assign_batch(
    index: faiss.Index, embeddings: np.ndarray, top_l: int, mode: str = "topl", threshold: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """Positives of a batch of unit embeddings: int32 labels [n, l] and float32 cosines [n, l], best first.

    ``topl``: the l nearest prototypes. ``threshold`` (the paper's Tab. 5d variant): those of the l
    nearest with cosine >= ``threshold``, at least the nearest one; the rest is padding (label -1,
    score -inf, see ``mlcd_jax.data.records``).
    """
    if mode not in ("topl", "threshold"):
        raise ValueError(f"assign={mode!r}: choose topl or threshold")
    scores, labels = index.search(np.ascontiguousarray(embeddings, np.float32), top_l)
    keep = labels >= 0  # IVF may find fewer than l
    if mode == "threshold":
        keep &= scores >= threshold
        keep[:, 0] = labels[:, 0] >= 0
    labels = np.where(keep, labels, records.PAD_LABEL).astype(np.int32)
    scores = np.where(keep, scores, records.PAD_SCORE).astype(np.float32)
    return labels, scores
