"""Benchmark of the sharded prototype head (PartialFC + MLCD loss + AdamW update of W).

Measures, in one process, on all local devices (on CPU: 8 fake devices unless XLA_FLAGS says otherwise):
  * step time of loss + grad + AdamW update of the k x d prototype matrix, sharded over all devices;
  * per-device memory from ``compiled.memory_analysis()`` and the bytes of W + AdamW state per device;
  * the dense head (all k prototypes, B x k logits, one device) at the largest k whose compiled step fits
    in the per-device memory the sharded head needs at the requested k, and its step time.

Usage: python benchmarks/head.py [--num-classes 1000000 --dim 768 --batch 1024 --ratio 0.1]
       python benchmarks/head.py --quick      (seconds; a smoke run)
"""

from __future__ import annotations

import os

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from mlcd_jax.losses import dense_loss, partial_fc_loss
from mlcd_jax.sharding import make_mesh

GIB = 1024**3


def _head_step(loss_fn: Callable[..., jax.Array], tx: optax.GradientTransformation):
    """One optimisation step of the head alone: loss + grads w.r.t. e and W, AdamW update of W."""

    def step(w, opt_state, e, y, key):
        loss, (g_e, g_w) = jax.value_and_grad(loss_fn, argnums=(0, 1))(e, w, y, key)
        updates, opt_state = tx.update(g_w, opt_state, w)
        return optax.apply_updates(w, updates), opt_state, loss, g_e

    return step


def _time(fn: Callable[[], Any], iters: int) -> float:
    jax.block_until_ready(fn())  # warm-up (compile excluded)
    start = time.perf_counter()
    for _ in range(iters):
        jax.block_until_ready(fn())
    return (time.perf_counter() - start) / iters


def _memory(compiled: Any) -> dict[str, float]:
    m = compiled.memory_analysis()
    return {
        "argument_gib": m.argument_size_in_bytes / GIB,
        "output_gib": m.output_size_in_bytes / GIB,
        "temp_gib": m.temp_size_in_bytes / GIB,
        "peak_gib": (m.argument_size_in_bytes + m.temp_size_in_bytes) / GIB,
    }


def sharded(k: int, d: int, b: int, l: int, ratio: float, iters: int, run: bool) -> dict[str, Any]:
    """Compiles (and optionally runs) the sharded head step over all local devices."""
    mesh = make_mesh({"proto": -1})
    n = mesh.size
    tx = optax.adamw(1e-3, weight_decay=0.2)
    w_sh = NamedSharding(mesh, P(("proto",), None))
    b_sh = NamedSharding(mesh, P("proto"))
    rep = NamedSharding(mesh, P())

    def loss_fn(e, w, y, key):
        return partial_fc_loss(e, w, y, key, mesh=mesh, sample_ratio=ratio)

    step = jax.jit(_head_step(loss_fn, tx), donate_argnums=(0, 1))
    w_abs = jax.ShapeDtypeStruct((k, d), jnp.float32, sharding=w_sh)
    opt_abs = jax.eval_shape(tx.init, w_abs)
    opt_sh = jax.tree.map(lambda x: w_sh if x.ndim == 2 else rep, opt_abs)
    opt_abs = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), opt_abs, opt_sh)
    args = (
        w_abs,
        opt_abs,
        jax.ShapeDtypeStruct((b, d), jnp.float32, sharding=b_sh),
        jax.ShapeDtypeStruct((b, l), jnp.int32, sharding=b_sh),
        jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=rep),
    )
    t0 = time.perf_counter()
    compiled = step.lower(*args).compile()
    out: dict[str, Any] = {
        "k": k, "d": d, "batch": b, "ratio": ratio, "devices": n,
        "compile_s": time.perf_counter() - t0,
        "w_adamw_bytes_per_device": 12 * k * d // n,
        **{f"per_device_{key}": v for key, v in _memory(compiled).items()},
    }
    if run:
        w = jax.jit(lambda key: jax.random.normal(key, (k, d), jnp.float32), out_shardings=w_sh)(
            jax.random.key(0)
        )
        opt = jax.jit(tx.init, out_shardings=opt_sh)(w)
        rng = np.random.default_rng(0)
        e = jax.device_put(rng.normal(size=(b, d)).astype(np.float32), b_sh)
        y = jax.device_put(rng.integers(0, k, size=(b, l)).astype(np.int32), b_sh)
        state = {"w": w, "opt": opt, "i": 0}

        def one():
            state["i"] += 1
            state["w"], state["opt"], loss, _ = compiled(
                state["w"], state["opt"], e, y, jax.random.key(state["i"])
            )
            return loss

        out["step_s"] = _time(one, iters)
    return out


def dense(k: int, d: int, b: int, l: int, iters: int) -> dict[str, Any]:
    """Dense head (all k rows, B x k logits) on one device: compile, memory, step time."""
    tx = optax.adamw(1e-3, weight_decay=0.2)

    def loss_fn(e, w, y, key):
        del key
        return dense_loss(e, w, y)

    step = jax.jit(_head_step(loss_fn, tx), donate_argnums=(0, 1))
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(size=(k, d)).astype(np.float32))
    opt = tx.init(w)
    e = jnp.asarray(rng.normal(size=(b, d)).astype(np.float32))
    y = jnp.asarray(rng.integers(0, k, size=(b, l)).astype(np.int32))
    compiled = step.lower(w, opt, e, y, jax.random.key(0)).compile()
    state = {"w": w, "opt": opt}

    def one():
        state["w"], state["opt"], loss, _ = compiled(state["w"], state["opt"], e, y, jax.random.key(0))
        return loss

    return {"k": k, **{f"{key}": v for key, v in _memory(compiled).items()}, "step_s": _time(one, iters)}


def largest_dense_k(d: int, b: int, l: int, budget_bytes: float, k_max: int) -> int:
    """Largest k (multiple of 1024) whose dense step compiles to ≤ budget bytes (args + temp), by bisection."""
    tx = optax.adamw(1e-3, weight_decay=0.2)
    step = jax.jit(_head_step(lambda e, w, y, key: dense_loss(e, w, y), tx), donate_argnums=(0, 1))

    def need(k: int) -> int:
        w = jax.ShapeDtypeStruct((k, d), jnp.float32)
        m = step.lower(
            w, jax.eval_shape(tx.init, w), jax.ShapeDtypeStruct((b, d), jnp.float32),
            jax.ShapeDtypeStruct((b, l), jnp.int32), jax.ShapeDtypeStruct((), jax.random.key(0).dtype),
        ).compile().memory_analysis()
        return m.argument_size_in_bytes + m.temp_size_in_bytes

    lo, hi = 1, k_max // 1024
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if need(mid * 1024) <= budget_bytes else (lo, mid - 1)
    return lo * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-classes", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--top-l", type=int, default=8)
    parser.add_argument("--ratio", type=float, default=0.1)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--aot-batch", type=int, nargs="*", default=[4096],
                        help="extra global batch sizes to compile ahead of time only (memory per device)")
    parser.add_argument("--quick", action="store_true", help="k=64K, d=128, batch 256: a smoke run")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    a = parser.parse_args()
    if a.quick:
        a.num_classes, a.dim, a.batch, a.aot_batch, a.iters = 65_536, 128, 256, [], 2

    print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind} ({jax.default_backend()})")
    results: dict[str, Any] = {}
    sh = sharded(a.num_classes, a.dim, a.batch, a.top_l, a.ratio, a.iters, run=True)
    results["sharded"] = sh
    print(
        f"sharded head  k={sh['k']:,} d={sh['d']} B={sh['batch']} r={sh['ratio']} on {sh['devices']} devices: "
        f"step {sh['step_s'] * 1e3:.1f} ms | per device: args {sh['per_device_argument_gib']:.3f} GiB, "
        f"temp {sh['per_device_temp_gib']:.3f} GiB | W+AdamW {sh['w_adamw_bytes_per_device'] / GIB:.3f} GiB "
        f"(= 12*k*d/N)"
    )
    for b in a.aot_batch:
        aot = sharded(a.num_classes, a.dim, b, a.top_l, a.ratio, 1, run=False)
        results[f"sharded_aot_batch{b}"] = aot
        print(f"  ahead-of-time, B={b}: per device args {aot['per_device_argument_gib']:.3f} GiB, "
              f"temp {aot['per_device_temp_gib']:.3f} GiB")
    budget = sh["per_device_peak_gib"] * GIB
    k_dense = largest_dense_k(a.dim, a.batch, a.top_l, budget, a.num_classes)
    dn = dense(k_dense, a.dim, a.batch, a.top_l, a.iters)
    results["dense"] = dn
    print(
        f"dense head    largest k in the same per-device memory ({budget / GIB:.3f} GiB): k={k_dense:,}, "
        f"step {dn['step_s'] * 1e3:.1f} ms, temp {dn['temp_gib']:.3f} GiB (B x k logits and their grads)"
    )
    print(
        f"=> the sharded head holds {a.num_classes / k_dense:.1f}x more prototypes in the same per-device "
        f"memory; time per prototype-row: sharded {sh['step_s'] / a.num_classes * 1e9:.1f} ns, "
        f"dense {dn['step_s'] / k_dense * 1e9:.1f} ns"
    )
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
