"""Clustering throughput: spherical k-means N x d -> k and top-8 assignment against 100K / 1M centroids.

k-means runs on real embeddings (pixel-PCA of Fashion-MNIST, the job's own code path); assignment
speed of exact (flat) search does not depend on the values, so centroids and queries there are random
unit vectors of the full 768-d width. Prints measured rates and the extrapolation to the paper's
400M x 768 -> 1M. Also compares flat k-means with the hierarchical (two-level) variant on the same
embeddings: wall time and the objective (mean cosine of every point to its nearest centroid).
``python benchmarks/cluster.py [--queries 1000] [--ivf] [--parts 4 8]`` (~4 min, < 4 GB by default;
``--ivf`` adds an IVF index at k = 100K).

``--stream-rss N_ROWS [--stream-dir /tmp]`` measures instead the memory of the job's streamed k-means
stage: it writes N_ROWS fake unit embeddings (float16, 768-d, chunk files of 10,000) under a temporary
folder of ``--stream-dir``, runs the kmeans stage (all N_ROWS sampled, k = 1024) hierarchical (8 parts)
and flat streamed (blocks of N_ROWS / 8), ``--stream-iters`` iterations each, each in a child process,
prints each child's peak RSS against the float32 sample's size, and deletes the files.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

import faiss
import ml_collections
import numpy as np

from mlcd_jax.cluster import kmeans, stages, storage
from mlcd_jax.cluster.context import Context
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


STREAM_K, STREAM_D, STREAM_CHUNK, STREAM_PARTS = 1024, 768, 10_000, 8


def write_fake_embeddings(folder: str, rows: int) -> int:
    """``rows`` random unit embeddings (float16, ``STREAM_D``-d) as the job's chunk files; returns their number."""
    rng = np.random.default_rng(0)
    chunks = math.ceil(rows / STREAM_CHUNK)
    layout = storage.Layout(folder, chunks)
    for chunk in range(chunks):
        index = np.arange(chunk * STREAM_CHUNK, min((chunk + 1) * STREAM_CHUNK, rows))
        storage.save_npz(layout.embeddings(chunk), index=index,
                         embeddings=unit(rng, len(index), STREAM_D).astype(np.float16))
    return chunks


def stream_child(spec: str) -> None:
    """The kmeans stage on the fake chunk files (a child process): ``spec`` is JSON, the config's
    overrides and ``num_chunks``; an empty spec only imports (the interpreter's own footprint)."""
    overrides = json.loads(spec)
    if not overrides:
        return
    num_chunks = overrides.pop("num_chunks")
    ctx = Context(ml_collections.ConfigDict(overrides))  # source digits: any source with >= k images
    ctx.layout = storage.Layout(overrides["output_dir"], num_chunks)  # the fake chunks, not digits' own
    stages.KMeans(ctx).run()


def peak_rss(spec: dict) -> tuple[float, float]:
    """Peak RSS (bytes) and seconds of ``stream_child(spec)`` in a child process."""
    t0 = time.perf_counter()
    child = subprocess.Popen([sys.executable, __file__, "--stream-child", json.dumps(spec)])
    _, status, usage = os.wait4(child.pid, 0)  # this child's own rusage (RUSAGE_CHILDREN: the max of all)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        raise SystemExit(f"the k-means child failed: {spec}")
    return usage.ru_maxrss * 1024.0, time.perf_counter() - t0


def bench_stream_rss(rows: int, iters: int, parent: str) -> None:
    """Writes ``rows`` fake embeddings under ``parent``, prints the streamed kmeans stage's peak RSS, cleans up."""
    gib = 2.0**30
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    sample, block = rows * STREAM_D * 4, math.ceil(rows / STREAM_PARTS)
    folder = tempfile.mkdtemp(prefix="mlcd_stream_rss_", dir=parent)
    try:
        t0 = time.perf_counter()
        chunks = write_fake_embeddings(os.path.join(folder, "data"), rows)
        print(f"sample: {rows:,} x {STREAM_D} = {sample / gib:.2f} GiB float32 ({sample / ram:.0%} of this box's "
              f"{ram / gib:.1f} GiB RAM; RAM/4 = {ram / 4 / gib:.2f} GiB), on disk as {chunks} float16 chunk files "
              f"({rows * STREAM_D * 2 / gib:.2f} GiB, written in {time.perf_counter() - t0:.0f} s); k = {STREAM_K}, "
              f"{iters} iterations per level; one part/block = {block:,} rows = {block * STREAM_D * 4 / gib:.2f} GiB "
              f"float32; faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads, {os.cpu_count()} cores")
        common = dict(source="digits", num_clusters=STREAM_K, max_points_per_centroid=math.ceil(rows / STREAM_K),
                      kmeans_iters=iters, shard_size=STREAM_CHUNK, progress=False, num_chunks=chunks)
        runs = {
            "imports only (no k-means)": {},
            f"hierarchical, {STREAM_PARTS} parts, streamed": dict(kmeans_method="hierarchical",
                                                                  kmeans_parts=STREAM_PARTS),
            f"flat, streamed {block:,} rows at a time": dict(kmeans_method="flat", kmeans_stream_rows=block),
        }
        print("| run | child's peak RSS | of the sample | seconds |\n| --- | --- | --- | --- |")
        for name, settings in runs.items():
            spec = {}
            if settings:
                out = os.path.join(folder, name.split(",")[0])
                os.makedirs(out)
                os.symlink(os.path.join(folder, "data", "embeddings"), os.path.join(out, "embeddings"))
                spec = {**common, **settings, "output_dir": out}
            rss, seconds = peak_rss(spec)
            print(f"| {name} | {rss / gib:.2f} GiB | {rss / sample:.0%} | {seconds:.0f} |", flush=True)
    finally:
        shutil.rmtree(folder)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--kmeans-k", type=int, default=1024)
    parser.add_argument("--kmeans-iters", type=int, default=5)
    parser.add_argument("--ivf", action="store_true")
    parser.add_argument("--parts", type=int, nargs="*", default=[4, 8], help="hierarchical k-means part counts")
    parser.add_argument("--stream-rss", type=int, metavar="N_ROWS", help="measure the streamed kmeans stage's memory")
    parser.add_argument("--stream-iters", type=int, default=2)
    parser.add_argument("--stream-dir", default=tempfile.gettempdir(), help="where --stream-rss writes its files")
    parser.add_argument("--stream-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stream_child is not None:
        stream_child(args.stream_child)
        return
    if args.stream_rss:
        bench_stream_rss(args.stream_rss, args.stream_iters, args.stream_dir)
        return
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
