"""Spherical k-means (faiss, one resumable Lloyd iteration at a time) and top-l prototype assignment.

Two k-means methods (the job's ``kmeans_method``):

- ``flat``: Lloyd iterations on the whole sample, checkpointed per iteration: faiss ``Clustering`` on
  the sample in memory, or (``block_rows``) streamed: each iteration reads the sample a block of rows
  at a time, assigns each row to its nearest centroid and accumulates per-centroid sums and sizes, so
  only one block is in memory (other initialisation than faiss: different, equally good centroids).
- ``hierarchical`` (the two-level scheme UNICOM describes): the sample is cut into ``parts`` contiguous
  parts, each clustered to k on its own, then the union of the parts' ``parts * k`` centroids is
  clustered to k, each weighted by how many sample points it holds. Per Lloyd iteration it costs the
  same FLOPs as ``flat`` (parts x (N/parts) x k x d) plus ``parts * k * k * d`` for the second level; what
  it buys is that each part fits one accelerator (or one machine) on its own and parts are
  independent: ``kmeans_part`` reads one part (only it is in memory) and clusters it, in any process;
  ``merge_parts`` is the second level. ``hierarchical_kmeans`` runs them one after another.

The sample is a unit float32 array or a ``ChunkedSample`` (rows read from the embedding chunk files on
demand, as ``sample[a:b]``), so every function here streams when given one.

Checkpoints (this module's format, ``state_paths``): one ``.npz`` per level with the centroids after the
last finished Lloyd iteration, how many iterations are done, the objectives so far and the seconds since
the run started; a run given the same files resumes after the last finished iteration. A finished part
also has ``part_sizes_paths``' file (its centroids' sizes), written last: its presence marks the part done.

On a GPU build of faiss every index (k-means assignment and top-l search) is spread over all visible
GPUs (centroids sharded when there are several), optionally storing the centroids in float16
(``fp16``: half the GPU memory of a 1M x 768 index, a little precision).
"""

from __future__ import annotations

import functools
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence

import faiss
import numpy as np
import scipy.sparse

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


class ChunkedSample:
    """A sample of the rows of embedding chunk files that reads rows only when they are asked for.

    Row ``i`` is row ``picks[i]`` of all the files' rows in order (``counts``: rows per file, array
    ``embeddings``). ``sample[a:b]`` or ``sample[indices]`` returns those rows as unit float32,
    gathered one chunk file at a time, so a process holds the rows it asked for plus one chunk file,
    never the whole sample; the rows equal those of the sample gathered whole, bit for bit.
    """

    def __init__(self, paths: Sequence[str], counts: Sequence[int], picks: np.ndarray) -> None:
        self.paths = list(paths)
        self.offsets = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        self.picks = np.asarray(picks, np.int64)

    def __len__(self) -> int:
        return len(self.picks)

    @functools.cached_property
    def shape(self) -> tuple[int, int]:
        return len(self), self[:1].shape[1]

    def __getitem__(self, key: slice | np.ndarray) -> np.ndarray:
        rows = self.picks[key]
        if not len(rows):
            return np.zeros((0, self.shape[1]), np.float32)
        order = np.argsort(rows, kind="stable")
        rows = rows[order]
        chunks = np.searchsorted(self.offsets, rows, side="right") - 1
        starts = np.flatnonzero(np.diff(chunks, prepend=-1))
        out: np.ndarray | None = None
        for start, stop in zip(starts, [*starts[1:], len(rows)]):
            chunk = chunks[start]
            with storage.load_npz(self.paths[chunk]) as z:
                unit = l2_normalize(z["embeddings"][rows[start:stop] - self.offsets[chunk]])
            if out is None:
                out = np.empty((len(rows), unit.shape[1]), np.float32)
            out[order[start:stop]] = unit
        return out


Rows = np.ndarray | ChunkedSample  # unit rows: in memory, or read from the chunk files on demand
SEARCH_BATCH = 65_536  # rows per faiss search (and per update of the streamed centroid sums)


def _for_each_batch(x: Rows, block_rows: int, fn: Callable[[np.ndarray], None]) -> None:
    """``fn`` on ``x``'s rows in order, as contiguous float32 batches of at most ``SEARCH_BATCH`` rows,
    reading ``x`` ``block_rows`` rows at a time. A block is dropped before the next is read (a callback,
    not a generator: a caller's loop variable would keep the last block alive meanwhile)."""
    for start in range(0, len(x), block_rows):
        block = x[start : start + block_rows]
        for b in range(0, len(block), SEARCH_BATCH):
            fn(np.ascontiguousarray(block[b : b + SEARCH_BATCH], np.float32))
        del block


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


def streamed_lloyd_step(
    x: Rows, centroids: np.ndarray | None, k: int, seed: int, use_gpu: bool, *, block_rows: int, fp16: bool = False
) -> tuple[np.ndarray, float]:
    """``lloyd_step`` reading ``x`` ``block_rows`` rows at a time, so one block is all of ``x`` in memory.

    Each row goes to its nearest centroid (exact inner-product search); a centroid becomes the
    normalised sum of its rows. ``centroids`` None: k rows of ``x`` drawn with ``seed`` (not faiss's
    draw: other, equally good centroids than ``lloyd_step``). Empty clusters: ``_split_empty``.
    """
    if centroids is None:
        centroids = x[np.sort(np.random.default_rng(seed).choice(len(x), k, replace=False))]
    index = build_index(centroids, "flat", use_gpu=use_gpu, fp16=fp16)
    sums, sizes, objective = np.zeros((k, centroids.shape[1])), np.zeros(k, np.int64), 0.0

    def accumulate(batch: np.ndarray) -> None:
        nonlocal objective
        scores, nearest = index.search(batch, 1)
        nearest = nearest[:, 0]
        one_hot = scipy.sparse.csr_array((np.ones(len(batch), np.float32), (nearest, np.arange(len(batch)))),
                                         shape=(k, len(batch)))
        sums[:] += one_hot @ batch
        sizes[:] += np.bincount(nearest, minlength=k)
        objective += float(scores.sum(dtype=np.float64))

    _for_each_batch(x, block_rows, accumulate)
    return l2_normalize(_split_empty(sums, sizes, seed)), objective


def _split_empty(sums: np.ndarray, sizes: np.ndarray, seed: int) -> np.ndarray:
    """``sums`` (updated in place) with each empty cluster re-seeded as faiss's ``Clustering`` does: a
    copy of a cluster drawn with probability proportional to its size - 1, the two pushed apart by
    +-1/1024 on alternate coordinates, the size shared. Deterministic for ``seed``."""
    rng = np.random.default_rng(seed)
    sizes = sizes.copy()
    push = np.where(np.arange(sums.shape[1]) % 2 == 0, 1.0, -1.0) / 1024
    for empty in np.flatnonzero(sizes == 0):
        spare = np.maximum(sizes - 1, 0)
        big = rng.choice(len(sizes), p=spare / spare.sum())
        sums[empty], sums[big] = sums[big] * (1 + push), sums[big] * (1 - push)
        sizes[empty] = sizes[big] // 2
        sizes[big] -= sizes[empty]
    return sums


def state_paths(state_dir: str, parts: int) -> list[str]:
    """The checkpoint files of a k-means run in ``state_dir``: one per part (``parts`` > 0 for the
    hierarchical method), then the last level's ``state.npz``."""
    return [os.path.join(state_dir, f"part-{p:04d}.npz") for p in range(parts)] + [os.path.join(state_dir, "state.npz")]


def part_sizes_paths(state_dir: str, parts: int) -> list[str]:
    """Per part of a hierarchical run in ``state_dir``: its centroids' sizes, written when the part is
    finished (so its presence marks the part done, for the worker that merges)."""
    return [os.path.join(state_dir, f"part-{p:04d}-sizes.npy") for p in range(parts)]


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
    x: Rows,
    k: int,
    iters: int,
    seed: int,
    *,
    weights: np.ndarray | None = None,
    use_gpu: bool = False,
    fp16: bool = False,
    block_rows: int | None = None,
    state_path: str | None = None,
    started: float | None = None,
    progress: Callable[[int, float], None] | None = None,
) -> tuple[np.ndarray, list[float]]:
    """``iters`` Lloyd iterations; resumes from / checkpoints to ``state_path`` after every iteration.

    ``block_rows`` None: faiss on the array ``x`` (``lloyd_step``); else streamed, ``x`` read that many
    rows at a time (``streamed_lloyd_step``, unweighted). Iteration ``i`` uses seed ``seed + i``, so a
    resumed run computes the same centroids as an uninterrupted one. A checkpoint's seconds count from
    ``started`` (a ``time.perf_counter()``; default: this call). ``progress(iterations done, objective)``
    is called after every iteration.
    """
    if k > len(x):
        raise ValueError(f"num_clusters={k} is more than the {len(x)} sampled embeddings")
    if weights is not None and block_rows is not None:
        raise ValueError("weighted k-means runs in memory: leave block_rows None")
    started = time.perf_counter() if started is None else started
    centroids, objectives, start = None, [], 0
    if state_path and fileio.exists(state_path):
        with storage.load_npz(state_path) as z:
            centroids, start, objectives = z["centroids"], int(z["iteration"]), z["objectives"].tolist()
    for i in range(start, iters):
        if block_rows is None:
            centroids, obj = lloyd_step(x, centroids, k, seed + i, use_gpu, weights=weights, fp16=fp16)
        else:
            centroids, obj = streamed_lloyd_step(x, centroids, k, seed + i, use_gpu, block_rows=block_rows, fp16=fp16)
        objectives.append(obj)
        if state_path:
            _save_state(state_path, centroids, i + 1, objectives, time.perf_counter() - started)
        if progress:
            progress(i + 1, obj)
    return centroids, objectives


def check_parts(n: int, k: int, parts: int) -> None:
    """``ValueError`` unless each of ``parts`` parts of ``n`` sample points holds at least ``k``."""
    if parts < 1 or n // parts < k:
        raise ValueError(
            f"hierarchical k-means with {parts} parts of {n} points leaves {n // max(parts, 1)} "
            f"per part, fewer than k={k}: lower the number of parts or sample more points"
        )


def part_bounds(n: int, parts: int) -> np.ndarray:
    """Part ``p`` of hierarchical k-means on ``n`` sample points is rows [bounds[p], bounds[p + 1])."""
    return np.linspace(0, n, parts + 1).astype(int)


def kmeans_part(
    x: Rows,
    part: int,
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
) -> tuple[np.ndarray, np.ndarray]:
    """Part ``part`` of ``parts`` of hierarchical k-means: its rows of ``x`` (read now; no other rows of
    ``x`` are in memory) clustered to k, and each centroid's size (the part's points nearest to it).

    Seeds from ``seed + (part + 1) * iters``. With ``state_dir`` the part resumes from / checkpoints to
    its ``state_paths`` file and writes its ``part_sizes_paths`` file last; a part with that file is
    loaded, not recomputed, so any process (the one that merges) may ask for any part.
    """
    state = state_paths(state_dir, parts)[part] if state_dir else None
    sizes_path = part_sizes_paths(state_dir, parts)[part] if state_dir else None
    if state and sizes_path and fileio.exists(sizes_path):
        with storage.load_npz(state) as z:
            return z["centroids"], storage.load_npy(sizes_path)
    bounds = part_bounds(len(x), parts)
    rows = x[bounds[part] : bounds[part + 1]]
    centroids, _ = spherical_kmeans(rows, k, iters, seed + (part + 1) * iters, use_gpu=use_gpu, fp16=fp16,
                                    state_path=state, started=started, progress=progress)
    _, nearest = build_index(centroids, "flat", use_gpu=use_gpu, fp16=fp16).search(rows, 1)
    sizes = np.bincount(nearest[:, 0], minlength=k)
    if sizes_path:
        storage.save_npy(sizes_path, sizes)
    return centroids, sizes


def merge_parts(
    parts: Sequence[tuple[np.ndarray, np.ndarray]],
    k: int,
    iters: int,
    seed: int,
    *,
    use_gpu: bool = False,
    fp16: bool = False,
    state_path: str | None = None,
    started: float | None = None,
    progress: Callable[[int, float], None] | None = None,
) -> tuple[np.ndarray, list[float]]:
    """The second level of hierarchical k-means: the union of the parts' centroids (``kmeans_part``'s
    results) clustered to k with seeds from ``seed``, each weighted by its size (a centroid that holds
    no point carries no information and is left out)."""
    weights = np.concatenate([sizes for _, sizes in parts]).astype(np.float32)
    keep = weights > 0
    return spherical_kmeans(
        np.concatenate([centroids for centroids, _ in parts])[keep], k, iters, seed, weights=weights[keep],
        use_gpu=use_gpu, fp16=fp16, state_path=state_path, started=started, progress=progress,
    )


def hierarchical_kmeans(
    x: Rows,
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
    """Two-level k-means in this process: each of ``parts`` contiguous parts of ``x`` to k, one after
    another (``kmeans_part``: one part in memory at a time), then their weighted union to k (``merge_parts``).

    Each level checkpoints to its file of ``state_paths(state_dir, parts)``. ``progress`` is called once
    per Lloyd iteration of either level (``(parts + 1) * iters`` calls in all). Returns the unit
    centroids [k, d] and the second level's objectives.
    """
    check_parts(len(x), k, parts)
    common = dict(use_gpu=use_gpu, fp16=fp16, started=time.perf_counter() if started is None else started,
                  progress=progress)
    results = [kmeans_part(x, p, k, iters, seed, parts, state_dir=state_dir, **common) for p in range(parts)]
    return merge_parts(results, k, iters, seed, state_path=state_paths(state_dir, parts)[-1] if state_dir else None,
                       **common)


def mean_cosine_to_nearest(
    x: Rows, centroids: np.ndarray, *, use_gpu: bool = False, block_rows: int = SEARCH_BATCH
) -> float:
    """The spherical k-means objective per point: mean cosine of unit rows ``x`` to their nearest
    centroid (``x`` read ``block_rows`` rows at a time)."""
    index = build_index(centroids, "flat", use_gpu=use_gpu)
    total = 0.0

    def add(batch: np.ndarray) -> None:
        nonlocal total
        total += float(index.search(batch, 1)[0].sum())

    _for_each_batch(x, block_rows, add)
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
