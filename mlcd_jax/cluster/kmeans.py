"""Spherical k-means (faiss, one resumable Lloyd iteration at a time) and top-l prototype assignment."""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import faiss
import numpy as np

from mlcd_jax.data import records


def gpu_available() -> bool:
    """True when the imported faiss is a GPU build that sees at least one GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _to_gpu(index: faiss.Index) -> faiss.Index:
    return faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (all-zero rows stay zero), float32."""
    x = np.asarray(x, np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def lloyd_step(x: np.ndarray, centroids: np.ndarray | None, k: int, seed: int, use_gpu: bool) -> tuple[np.ndarray, float]:
    """One spherical k-means iteration on unit rows ``x`` (faiss initialises from ``x`` when ``centroids`` is None).

    faiss also re-seeds empty clusters by splitting large ones, and re-normalises the centroids.
    Returns the new unit centroids [k, d] and the objective (sum of cosines to the assigned centroid).
    """
    d = x.shape[1]
    clus = faiss.Clustering(d, k)
    clus.niter, clus.seed, clus.spherical, clus.verbose = 1, seed, True, False
    clus.max_points_per_centroid = max(1, math.ceil(len(x) / k))  # the job already sampled: use every row
    clus.min_points_per_centroid = 1
    if centroids is not None:
        faiss.copy_array_to_vector(np.ascontiguousarray(centroids, np.float32).ravel(), clus.centroids)
    index = faiss.IndexFlatIP(d)
    clus.train(np.ascontiguousarray(x, np.float32), _to_gpu(index) if use_gpu else index)
    new = faiss.vector_to_array(clus.centroids).reshape(k, d)
    return l2_normalize(new), float(clus.iteration_stats.at(0).obj)


def spherical_kmeans(
    x: np.ndarray,
    k: int,
    iters: int,
    seed: int,
    *,
    use_gpu: bool = False,
    state_path: str | None = None,
    save_state: Callable[[str, np.ndarray, int, list[float]], None] | None = None,
    progress: Callable[[int, float], None] | None = None,
) -> tuple[np.ndarray, list[float]]:
    """``iters`` Lloyd iterations; resumes from / checkpoints to ``state_path`` after every iteration.

    Iteration ``i`` uses seed ``seed + i``, so a resumed run computes the same centroids as an
    uninterrupted one.
    """
    if k > len(x):
        raise ValueError(f"num_clusters={k} is more than the {len(x)} sampled embeddings")
    centroids, objectives, start = None, [], 0
    if state_path and os.path.exists(state_path):
        with np.load(state_path) as z:
            centroids, start, objectives = z["centroids"], int(z["iteration"]), z["objectives"].tolist()
    for i in range(start, iters):
        centroids, obj = lloyd_step(x, centroids, k, seed + i, use_gpu)
        objectives.append(obj)
        if state_path and save_state:
            save_state(state_path, centroids, i + 1, objectives)
        if progress:
            progress(i + 1, obj)
    return centroids, objectives


def build_index(
    centroids: np.ndarray, kind: str, *, nprobe: int = 64, seed: int = 0, use_gpu: bool = False
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
    return _to_gpu(index) if use_gpu else index


def read_index(path: str, *, use_gpu: bool = False) -> faiss.Index:
    """An index saved by ``faiss.write_index`` (the job's IVF index), optionally moved to the GPU."""
    index = faiss.read_index(path)
    return _to_gpu(index) if use_gpu else index


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
