"""Clustering throughput: spherical k-means N x d -> k and top-8 assignment against 100K / 1M centroids.

k-means runs on real embeddings (pixel-PCA of Fashion-MNIST, the job's own code path); assignment
speed of exact (flat) search does not depend on the values, so centroids and queries there are random
unit vectors of the full 768-d width. Prints measured rates and the extrapolation to the paper's
400M x 768 -> 1M. Also compares flat k-means with the hierarchical (two-level) variant on the same
embeddings: wall time and the objective (mean cosine of every point to its nearest centroid).
``python benchmarks/cluster.py [--queries 1000] [--ivf] [--parts 4 8]`` (~4 min, < 4 GB by default;
``--ivf`` adds an IVF index at k = 100K).
"""

from __future__ import annotations

import argparse
import os
import time

import faiss
import numpy as np

from mlcd_jax.cluster import kmeans
from mlcd_jax.cluster.teachers import PixelsTeacher
from mlcd_jax.data.sources import load_arrays

PAPER_N, PAPER_D, PAPER_K = 400_000_000, 768, 1_000_000


def unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    return kmeans.l2_normalize(rng.standard_normal((n, d), dtype=np.float32))


def embeddings() -> np.ndarray:
    """Unit pixel-PCA (256-d) embeddings of all 70,000 Fashion-MNIST images."""
    images, _ = load_arrays("fashion_mnist", split="all")
    teacher = PixelsTeacher.fit(images[:10_000], 28, 256, seed=0)
    return kmeans.l2_normalize(np.concatenate([teacher(images[s : s + 10_000]) for s in range(0, len(images), 10_000)]))


def bench_kmeans(x: np.ndarray, k: int, iters: int, parts: int = 0) -> tuple[float, float]:
    """Seconds for ``iters`` iterations (per level) of flat (``parts`` = 0) or hierarchical k-means, and
    the resulting mean cosine of every row of ``x`` to its nearest centroid."""
    t0 = time.perf_counter()
    if parts:
        centroids, _ = kmeans.hierarchical_kmeans(x, k, iters, seed=0, parts=parts)
    else:
        centroids, _ = kmeans.spherical_kmeans(x, k, iters, seed=0)
    return time.perf_counter() - t0, kmeans.mean_cosine_to_nearest(x, centroids)


def bench_search(index: faiss.Index, queries: np.ndarray, top_l: int = 8) -> float:
    index.search(queries[:16], top_l)  # warm-up
    t0 = time.perf_counter()
    kmeans.assign_batch(index, queries, top_l)
    return len(queries) / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--kmeans-k", type=int, default=1024)
    parser.add_argument("--kmeans-iters", type=int, default=5)
    parser.add_argument("--ivf", action="store_true")
    parser.add_argument("--parts", type=int, nargs="*", default=[4, 8], help="hierarchical k-means part counts")
    args = parser.parse_args()
    threads = faiss.omp_get_max_threads()
    rng = np.random.default_rng(0)
    x = embeddings()
    (n, d), k, iters = x.shape, args.kmeans_k, args.kmeans_iters
    seconds, quality = bench_kmeans(x, k, iters)
    per_iter = seconds / iters
    kmeans_flops = 2.0 * n * k * d / per_iter
    print(f"machine: {os.cpu_count()} cores, faiss {faiss.__version__} with {threads} threads")
    print(f"k-means {n} x {d} -> {k}: {per_iter:.2f} s/iteration ({kmeans_flops / 1e9:.0f} GFLOP/s)")
    print(f"  flat, {iters} iterations: {seconds:.1f} s, mean cosine to nearest centroid {quality:.4f}")
    for parts in args.parts:
        h_seconds, h_quality = bench_kmeans(x, k, iters, parts)
        print(f"  hierarchical, {parts} parts x {iters} iterations + {iters} on the {parts * k} centroids: "
              f"{h_seconds:.1f} s ({h_seconds / seconds:.2f}x flat), mean cosine {h_quality:.4f} "
              f"({h_quality - quality:+.4f})")

    queries = unit(rng, args.queries, PAPER_D)
    rates = {}
    for k in (100_000, 1_000_000):
        centroids = unit(rng, k, PAPER_D)
        rates[k] = bench_search(kmeans.build_index(centroids, "flat"), queries)
        print(f"top-8 flat search, k={k:,} x {PAPER_D}: {rates[k]:.0f} queries/s "
              f"({rates[k] / threads:.0f} per core)")
        if args.ivf and k == 100_000:
            t0 = time.perf_counter()
            ivf = kmeans.build_index(centroids, "ivf", nprobe=64)
            build = time.perf_counter() - t0
            print(f"top-8 IVF search (nlist {ivf.nlist}, nprobe 64), k={k:,}: {bench_search(ivf, queries):.0f} "
                  f"queries/s (index built in {build:.0f} s)")
        del centroids

    assign_hours = PAPER_N / rates[1_000_000] / 3600
    sample = PAPER_K * 64  # max_points_per_centroid = 64 at that scale
    kmeans_hours = 2.0 * sample * PAPER_K * PAPER_D * 20 / kmeans_flops / 3600
    print("extrapolation to 400M x 768 -> k = 1M, l = 8 (linear in N, k, d; flat = exact search):")
    print(f"  assignment: 400M / {rates[1_000_000]:.0f} q/s = {assign_hours:,.0f} hours on this "
          f"{os.cpu_count()}-core box ({assign_hours * threads:,.0f} core-hours)")
    print(f"  k-means on a 64M sample (64 per centroid), 20 iterations: {kmeans_hours:,.0f} hours here "
          f"({kmeans_hours * threads:,.0f} core-hours) at the measured {kmeans_flops / 1e9:.0f} GFLOP/s")
    parts = 8
    print(f"  hierarchical with {parts} parts: the same GEMM FLOPs per iteration plus {parts}x{PAPER_K:,}x{PAPER_K:,}x"
          f"{PAPER_D} for the second level ({parts * PAPER_K / sample:.2f}x one flat iteration); what it buys is "
          f"memory: a part of the 64M sample is {sample // parts * PAPER_D * 4 / 2**30:.0f} GiB fp32 (the whole "
          f"sample {sample * PAPER_D * 4 / 2**30:.0f} GiB), so each part fits one 80 GB GPU beside the "
          f"{PAPER_K * PAPER_D * 2 / 2**30:.1f} GiB fp16 centroids, and parts run on separate GPUs or machines")
    print(f"  both are GEMM-bound: at 50 TFLOP/s fp32 (one H100 with faiss-gpu) assignment takes "
          f"{2.0 * PAPER_N * PAPER_K * PAPER_D / 50e12 / 3600:.1f} h and k-means "
          f"{2.0 * sample * PAPER_K * PAPER_D * 20 / 50e12 / 3600:.1f} h")


if __name__ == "__main__":
    main()
