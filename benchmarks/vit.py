"""ViT forward and forward+backward time per image, and achieved FLOP/s from ``flops_per_image``.

For each preset: the model is created by a jitted init, both programs are compiled ahead of time
(compile and one warm-up run excluded from the timings), then timed over ``--iters`` runs on one
device. Forward+backward = gradients of a scalar of the pooled features w.r.t. every parameter.
FLOPs are the model's matmul FLOPs (2 x MACs; x3 for forward+backward), so "achieved FLOP/s" is
model FLOP/s (MFU's numerator), not hardware counters. A preset whose compiled forward+backward
needs more memory than the device has free is skipped (reported), so large models fail politely.

Usage:  python benchmarks/vit.py                       (CPU default: B/32, B/16, L/14, small batches)
        python benchmarks/vit.py --models B/16 L/14 --batch 64 --bf16 --attention=cudnn  (GPU)
        python benchmarks/vit.py --quick               (tiny model, seconds: a smoke run)
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mlcd_jax.models import VisionTransformer, flops_per_image, get_preset
from mlcd_jax.models.presets import num_params

GIB = 1024**3
CPU_BATCH = {"B/32": 8, "B/16": 4, "L/14": 1}  # keeps the default CPU run at ~3 minutes on 2 cores


def _free_bytes(device: jax.Device) -> float:
    """Memory the benchmark may use on ``device``: the allocator limit on accelerators, free RAM on CPU."""
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and "bytes_limit" in stats:
        return float(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def _time(fn: Callable[[], Any], iters: int) -> float:
    jax.block_until_ready(fn())  # warm-up run, excluded
    start = time.perf_counter()
    for _ in range(iters):
        jax.block_until_ready(fn())
    return (time.perf_counter() - start) / iters


def bench(name: str, batch: int, iters: int, args: argparse.Namespace) -> dict[str, Any]:
    """Times forward and forward+backward of preset ``name`` at ``batch`` images."""
    cfg = get_preset(name, **({"image_size": args.image_size} if args.image_size else {}))
    dtype = jnp.bfloat16 if args.bf16 else jnp.float32

    def create() -> VisionTransformer:
        return VisionTransformer(
            cfg, rngs=nnx.Rngs(0), dtype=dtype, attention_impl=args.attention,
            remat=args.remat, scan_layers=args.scan,
        )

    graphdef, abstract = nnx.split(nnx.eval_shape(create))
    params = jax.jit(lambda: nnx.state(create()))()
    pixels = jnp.asarray(
        np.random.default_rng(0).normal(size=(batch, cfg.image_size, cfg.image_size, cfg.num_channels)),
        dtype,
    )

    def forward(state: Any, x: jax.Array) -> jax.Array:
        return nnx.merge(graphdef, state)(x)[0]

    def loss(state: Any, x: jax.Array) -> jax.Array:
        return jnp.mean(jnp.square(forward(state, x).astype(jnp.float32)))

    fwd = jax.jit(forward).lower(params, pixels).compile()
    t0 = time.perf_counter()
    fwd_bwd = jax.jit(jax.value_and_grad(loss)).lower(params, pixels).compile()
    mem = fwd_bwd.memory_analysis()
    need = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
    out: dict[str, Any] = {
        "model": name, "image_size": cfg.image_size, "batch": batch, "params_m": num_params(cfg) / 1e6,
        "dtype": jnp.dtype(dtype).name, "attention": args.attention or "default", "remat": args.remat,
        "scan": args.scan, "gflops_per_image": flops_per_image(cfg) / 1e9,
        "fwd_bwd_compile_s": time.perf_counter() - t0, "fwd_bwd_memory_gib": need / GIB,
    }
    free = _free_bytes(jax.devices()[0])
    if need > 0.9 * free:
        out["skipped"] = f"needs {need / GIB:.1f} GiB, {free / GIB:.1f} GiB free"
        return out
    load_before = os.getloadavg()[0]
    fwd_s = _time(lambda: fwd(params, pixels), iters)
    fwd_bwd_s = _time(lambda: fwd_bwd(params, pixels), iters)
    out["load_avg_1m"] = (load_before, os.getloadavg()[0])  # other processes on the host skew CPU timings
    flops = flops_per_image(cfg) * batch
    out.update(
        fwd_ms_per_image=1e3 * fwd_s / batch,
        fwd_bwd_ms_per_image=1e3 * fwd_bwd_s / batch,
        fwd_tflops=flops / fwd_s / 1e12,
        fwd_bwd_tflops=3 * flops / fwd_bwd_s / 1e12,
    )
    if args.peak_tflops:
        out["fwd_bwd_mfu"] = out["fwd_bwd_tflops"] / args.peak_tflops
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(CPU_BATCH))
    parser.add_argument("--batch", type=int, help="images per step (default: per model, small for CPU)")
    parser.add_argument("--iters", type=int, default=2)
    parser.add_argument("--image-size", type=int, help="override the presets' resolution")
    parser.add_argument("--bf16", action="store_true", help="bf16 compute (fp32 parameters)")
    parser.add_argument("--attention", choices=["xla", "cudnn"], help="jax.nn.dot_product_attention impl")
    parser.add_argument("--remat", default="none", choices=["none", "full", "dots", "dots_all"])
    parser.add_argument("--scan", action="store_true", help="scan over layers")
    parser.add_argument("--peak-tflops", type=float, help="device peak, to print MFU (e.g. 989 for H100 bf16)")
    parser.add_argument("--quick", action="store_true", help="tiny preset, batch 4: a smoke run")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    a = parser.parse_args()
    if a.quick:
        a.models, a.batch, a.iters = ["tiny"], 4, 2

    dev = jax.devices()[0]
    print(f"device: {jax.device_count()} x {dev.device_kind} ({jax.default_backend()}), "
          f"benchmarking on 1; jax {jax.__version__}")
    results = []
    for name in a.models:
        r = bench(name, a.batch or CPU_BATCH.get(name, 8), a.iters, a)
        results.append(r)
        head = (f"{name:8s} {r['image_size']}px B={r['batch']:<3d} {r['dtype']:8s} "
                f"{r['gflops_per_image']:.2f} GFLOPs/img fwd")
        if "skipped" in r:
            print(f"{head} | skipped: {r['skipped']}")
            continue
        mfu = f" | MFU {100 * r['fwd_bwd_mfu']:.1f} %" if "fwd_bwd_mfu" in r else ""
        print(f"{head} | fwd {r['fwd_ms_per_image']:.1f} ms/img, {r['fwd_tflops'] * 1e3:.1f} GFLOP/s | "
              f"fwd+bwd {r['fwd_bwd_ms_per_image']:.1f} ms/img, {r['fwd_bwd_tflops'] * 1e3:.1f} GFLOP/s | "
              f"fwd+bwd program {r['fwd_bwd_memory_gib']:.2f} GiB{mfu} | "
              f"host load {r['load_avg_1m'][0]:.1f} -> {r['load_avg_1m'][1]:.1f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
