"""The clustering job's GEMM-bound stages on an accelerator, written in JAX: a spherical k-means Lloyd
iteration (similarities, arg-max, per-centroid sums) and the top-l assignment against k centroids.

faiss-gpu (what the job uses on GPUs) has no wheel for this project's lent machines, so this measures the
same arithmetic (a points x centroids similarity GEMM dominates both stages) with XLA on the device: the
per-device rates the 400M extrapolation in RESULTS.md uses for those stages. Rates are points/s; FLOP/s
count the GEMM only (2 * n * k * d).

Usage: python benchmarks/kmeans_device.py [--k 1000000] [--d 768] [--block 8192] [--dtype bfloat16] [--json OUT]
       python benchmarks/kmeans_device.py --quick
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np


@functools.partial(jax.jit, static_argnames=("dtype",))
def lloyd_block(x: jax.Array, centroids: jax.Array, dtype: str) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One block of a Lloyd iteration: each row's nearest centroid, and the block's per-centroid sums,
    counts and summed cosine (the objective)."""
    sims = jnp.dot(x.astype(dtype), centroids.astype(dtype).T, preferred_element_type=jnp.float32)
    nearest = jnp.argmax(sims, axis=1)
    k = centroids.shape[0]
    sums = jax.ops.segment_sum(x, nearest, num_segments=k)
    counts = jax.ops.segment_sum(jnp.ones(x.shape[0], jnp.float32), nearest, num_segments=k)
    return sums, counts, jnp.max(sims, axis=1).sum()


@functools.partial(jax.jit, static_argnames=("dtype", "top_l"))
def assign_block(x: jax.Array, centroids: jax.Array, dtype: str, top_l: int) -> tuple[jax.Array, jax.Array]:
    """Top-l prototypes (cosines and ids) of a block of unit embeddings."""
    sims = jnp.dot(x.astype(dtype), centroids.astype(dtype).T, preferred_element_type=jnp.float32)
    return jax.lax.top_k(sims, top_l)


def _rate(fn, x: jax.Array, iters: int) -> float:
    """Rows/s of ``fn(x)`` (compile and one warm-up excluded)."""
    jax.block_until_ready(fn(x))
    start = time.perf_counter()
    for _ in range(iters):
        out = fn(x)
    jax.block_until_ready(out)
    return iters * x.shape[0] / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=int, default=1_000_000)
    parser.add_argument("--d", type=int, default=768)
    parser.add_argument("--block", type=int, default=8192, help="points per device call (the block x k similarities live at once)")
    parser.add_argument("--top-l", type=int, default=8)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--json", default="")
    parser.add_argument("--quick", action="store_true", help="k = 4096, d = 64, block 1024")
    args = parser.parse_args()
    if args.quick:
        args.k, args.d, args.block, args.iters = 4096, 64, 1024, 2
    rng = np.random.default_rng(0)

    def unit(n: int) -> jax.Array:
        x = jnp.asarray(rng.standard_normal((n, args.d), np.float32))
        return x / jnp.linalg.norm(x, axis=1, keepdims=True)

    centroids, x = unit(args.k), unit(args.block)
    device = jax.devices()[0]
    rows = []
    for dtype in args.dtypes.split(","):
        lloyd = _rate(lambda b, dt=dtype: lloyd_block(b, centroids, dt), x, args.iters)
        assign = _rate(lambda b, dt=dtype: assign_block(b, centroids, dt, args.top_l), x, args.iters)
        gemm = 2.0 * args.k * args.d / 1e12
        rows.append({"dtype": dtype, "lloyd_points_per_s": lloyd, "lloyd_gemm_tflops": lloyd * gemm,
                     "assign_points_per_s": assign, "assign_gemm_tflops": assign * gemm})
    print(f"k = {args.k:,} x d = {args.d}, blocks of {args.block:,} points, on {device.device_kind} ({device.platform})")
    print("| GEMM dtype | Lloyd iteration points/s | its GEMM TFLOP/s | top-8 assignment points/s | its GEMM TFLOP/s |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['dtype']} | {r['lloyd_points_per_s']:,.0f} | {r['lloyd_gemm_tflops']:.1f} | "
              f"{r['assign_points_per_s']:,.0f} | {r['assign_gemm_tflops']:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"k": args.k, "d": args.d, "block": args.block, "device": device.device_kind, "rows": rows},
                      f, indent=2)


if __name__ == "__main__":
    main()
