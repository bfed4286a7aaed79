"""The full training step (ViT + sharded MLCD head + AdamW, ``train.make_train_step``) on all local devices.

The step is compiled ahead of time for the run's mesh (compile and one warm-up step excluded from the
timings), its compiled memory is checked against the device's free memory (a batch that does not fit,
or fails with RESOURCE_EXHAUSTED, is halved and retried), then ``--iters`` steps are timed on one
synthetic batch made on the devices (normal images, labels uniform in [0, k)). Reported: step time,
images/s, model FLOPs per step (``TrainSetup.flops_per_step``: 3 x the backbone's matmul FLOPs, the head
not counted), MFU against ``metrics.device_peak_flops``, XLA's own FLOP count, compiled memory, and the
head's share of the step: the same step with a tiny head (k = 8 x devices) gives
``(full - tiny) / full``; the head alone (``benchmarks/head.py``: PartialFC loss + grads + AdamW of W, at
the same k, d and batch) gives ``head_only / full``.

Usage:  python benchmarks/train_step.py --model L/14 --k 1000000 --bf16 --attention cudnn --json out.json
        python benchmarks/train_step.py --quick        (tiny ViT, k = 65,536: about a minute on 2 idle cores)
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

import head  # benchmarks/head.py; on CPU it asks for 8 fake devices unless XLA_FLAGS sets a count
import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh
from vit import GIB, _free_bytes, _time

from mlcd_jax import config_lib, metrics, sharding, train
from mlcd_jax.models import flops_per_image, get_preset
from mlcd_jax.models.vit import REMAT_POLICIES

TINY_ROWS_PER_DEVICE = 8  # prototype rows per device of the "tiny head" reference step


class DoesNotFit(RuntimeError):
    """The compiled step needs more memory than the device has free."""


def make_config(a: argparse.Namespace, num_classes: int, batch_size: int) -> ml_collections.ConfigDict:
    """The trainer's config for preset ``a.model`` with this benchmark's options."""
    return config_lib.model_config(a.model, **{
        "model.dtype": "bfloat16" if a.bf16 else "float32",
        "model.attention": a.attention or "",
        "model.remat": a.remat,
        "model.scan_layers": a.scan,
        "data.image_size": a.image_size,
        "loss.num_classes": num_classes,
        "loss.top_l": a.top_l,
        "loss.sample_ratio": a.ratio,
        "batch_size": batch_size,
    })


def batch_maker(config: ml_collections.ConfigDict, mesh: Mesh) -> Callable[[jax.Array], dict[str, jax.Array]]:
    """A jitted ``key -> batch`` that makes the synthetic global batch directly in its sharding."""
    b, size = config.batch_size, config.data.image_size

    def make(key: jax.Array) -> dict[str, jax.Array]:
        images, labels = jax.random.split(key)
        return {
            "image": jax.random.normal(images, (b, size, size, 3), jnp.float32),
            "labels": jax.random.randint(labels, (b, config.loss.top_l), 0, config.loss.num_classes, jnp.int32),
        }

    return jax.jit(make, out_shardings=sharding.batch_sharding(mesh))


def measure(config: ml_collections.ConfigDict, mesh: Mesh, iters: int) -> dict[str, Any]:
    """Compiles the train step for ``config``; raises :class:`DoesNotFit` or times ``iters`` steps."""
    train.validate(config, mesh)
    setup = train.TrainSetup.create(config, mesh, num_train_steps=10_000)
    make_batch = batch_maker(config, mesh)
    key = jax.random.key(config.seed)
    t0 = time.perf_counter()
    compiled = train.make_train_step(setup).lower(setup.abstract_state, jax.eval_shape(make_batch, key)).compile()
    compile_s = time.perf_counter() - t0
    m = compiled.memory_analysis()
    need = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
    free = _free_bytes(jax.devices()[0])
    if need > 0.9 * free:
        raise DoesNotFit(f"compiled step needs {need / GIB:.1f} GiB per device, {free / GIB:.1f} GiB free")
    xla_flops = (compiled.cost_analysis() or {}).get("flops")
    box = {"state": setup.init_state(config.seed), "batch": make_batch(key)}

    def step() -> Any:
        box["state"], box["metrics"] = compiled(box["state"], box["batch"])
        return box["state"]

    step_s = _time(step, iters)
    return {
        "k": setup.num_classes,
        "compile_s": compile_s,
        "step_s": step_s,
        "loss": float(box["metrics"]["loss"]),
        "memory_per_device_gib": need / GIB,
        "argument_gib": m.argument_size_in_bytes / GIB,
        "temp_gib": m.temp_size_in_bytes / GIB,
        "xla_flops_per_step": None if xla_flops is None else float(xla_flops) * mesh.size,
        "model_flops_per_step": setup.flops_per_step,
        "embed_dim": setup.embed_dim,
    }


def largest_fitting(a: argparse.Namespace, mesh: Mesh) -> tuple[int, dict[str, Any], list[dict[str, Any]]]:
    """Measures the full step at ``a.batch_per_device``, halving it until the step fits in memory."""
    dp = sharding.data_parallel_size(mesh)
    per_device, refused = a.batch_per_device, []
    while per_device >= 1:
        try:
            return per_device, measure(make_config(a, a.k, per_device * dp), mesh, a.iters), refused
        except (DoesNotFit, jax.errors.JaxRuntimeError) as err:
            if not isinstance(err, DoesNotFit) and "RESOURCE_EXHAUSTED" not in str(err):
                raise
            reason = str(err).strip().splitlines()[0][:300]
            print(f"batch {per_device}/device does not fit: {reason}; halving", flush=True)
            refused.append({"batch_per_device": per_device, "reason": reason})
            per_device //= 2
    raise SystemExit("not even one image per device fits")


def run(a: argparse.Namespace) -> dict[str, Any]:
    """All measurements, each printed as it lands: full step at the largest fitting batch, head alone, tiny head."""
    mesh = sharding.make_mesh()
    per_device, full, refused = largest_fitting(a, mesh)
    global_batch = per_device * sharding.data_parallel_size(mesh)
    print(f"full step, batch {per_device}/device: {1e3 * full['step_s']:.1f} ms "
          f"(compiled in {full['compile_s']:.1f} s)", flush=True)
    head_only = head.sharded(a.k, full["embed_dim"], global_batch, a.top_l, a.ratio, a.iters, run=True)
    print(f"head alone: {1e3 * head_only['step_s']:.1f} ms", flush=True)
    tiny = measure(make_config(a, TINY_ROWS_PER_DEVICE * mesh.size, global_batch), mesh, a.iters)
    print(f"tiny-head step: {1e3 * tiny['step_s']:.1f} ms (compiled in {tiny['compile_s']:.1f} s)", flush=True)
    peak = metrics.device_peak_flops()
    achieved = full["model_flops_per_step"] / full["step_s"]
    return {
        "device": jax.devices()[0].device_kind, "num_devices": mesh.size, "backend": jax.default_backend(),
        "jax": jax.__version__, "model": a.model, "image_size": a.image_size,
        "dtype": "bfloat16" if a.bf16 else "float32", "attention": a.attention or "default",
        "remat": a.remat, "scan": a.scan, "k": a.k, "top_l": a.top_l, "ratio": a.ratio,
        "batch_per_device": per_device, "global_batch": global_batch, "did_not_fit": refused,
        "gflops_per_image": flops_per_image(get_preset(a.model, image_size=a.image_size)) / 1e9,
        "step_s": full["step_s"],
        "images_per_s": global_batch / full["step_s"],
        "model_flops_per_step": full["model_flops_per_step"],
        "model_tflops_per_s": achieved / 1e12,
        "peak_tflops_per_device": None if peak is None else peak / 1e12,
        "mfu": None if peak is None else achieved / (peak * mesh.size),
        "xla_flops_per_step": full["xla_flops_per_step"],
        "full": full,
        "tiny_head": tiny,
        # clipped to [0, 1]: on a noisy host the tiny-head step can time slower; the raw times are above
        "head_share": min(max((full["step_s"] - tiny["step_s"]) / full["step_s"], 0.0), 1.0),
        "head_only": head_only,
        "head_only_share": head_only["step_s"] / full["step_s"],
    }


def _flop(x: float) -> str:
    """FLOPs in TFLOP, or GFLOP below 0.1 TFLOP."""
    return f"{x / 1e12:.2f} TFLOP" if x >= 1e11 else f"{x / 1e9:.3f} GFLOP"


def print_table(r: dict[str, Any]) -> None:
    """One row per figure."""
    full, tiny, ho = r["full"], r["tiny_head"], r["head_only"]
    mfu = "n/a (no peak known for this device)" if r["mfu"] is None else f"{100 * r['mfu']:.1f} %"
    xla = "n/a" if r["xla_flops_per_step"] is None else _flop(r["xla_flops_per_step"])
    if r["scan"] and r["xla_flops_per_step"] is not None:
        xla += " (scan: XLA counts the layer loop's body once)"
    rows = [
        ("device", f"{r['num_devices']} x {r['device']} ({r['backend']}), jax {r['jax']}"),
        ("model", f"{r['model']} @ {r['image_size']} px, {r['dtype']}, attention {r['attention']}, "
                  f"remat {r['remat']}, scan {r['scan']}"),
        ("head", f"k = {r['k']:,}, l = {r['top_l']}, r = {r['ratio']}"),
        ("batch", f"{r['batch_per_device']} / device, {r['global_batch']} global"
                  + "".join(f"; {d['batch_per_device']}/device did not fit" for d in r["did_not_fit"])),
        ("compile (full step)", f"{full['compile_s']:.1f} s"),
        ("step time", f"{1e3 * r['step_s']:.1f} ms"),
        ("images/s", f"{r['images_per_s']:.1f}"),
        ("model FLOPs / step", f"{_flop(r['model_flops_per_step'])} (backbone, 3 x forward)"),
        ("achieved model FLOP/s", f"{_flop(r['model_flops_per_step'] / r['step_s'])}/s"),
        ("MFU", mfu),
        ("XLA FLOPs / step", xla),
        ("compiled memory / device", f"{full['memory_per_device_gib']:.2f} GiB (arguments "
                                     f"{full['argument_gib']:.2f}, temp {full['temp_gib']:.2f})"),
        ("tiny-head step", f"{1e3 * tiny['step_s']:.1f} ms (k = {tiny['k']})"),
        ("head share of step", f"{100 * r['head_share']:.1f} % = (full - tiny) / full"),
        ("head alone (head.py)", f"{1e3 * ho['step_s']:.1f} ms = {100 * r['head_only_share']:.1f} % of the step "
                                 "(fp32 embeddings)"),
        ("final loss", f"{full['loss']:.4f}"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}} | {value}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="L/14", help="ViT preset")
    parser.add_argument("--image-size", type=int, help="default: the preset's resolution")
    parser.add_argument("--k", type=int, default=1_000_000, help="prototypes")
    parser.add_argument("--top-l", type=int, default=8, help="positive labels per image")
    parser.add_argument("--ratio", type=float, default=0.1, help="PartialFC sample ratio r")
    parser.add_argument("--batch-per-device", type=int, default=64, help="halved until it fits")
    parser.add_argument("--iters", type=int, default=10, help="timed steps (after one warm-up)")
    parser.add_argument("--bf16", action="store_true", help="bf16 compute (fp32 parameters)")
    parser.add_argument("--attention", choices=["xla", "cudnn"], help="jax.nn.dot_product_attention impl")
    parser.add_argument("--remat", default="none", choices=sorted(REMAT_POLICIES))
    parser.add_argument("--scan", action="store_true", help="scan over layers")
    parser.add_argument("--quick", action="store_true", help="tiny ViT, k=65,536, batch 8/device: a smoke run")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    a = parser.parse_args()
    if a.quick:
        a.model, a.k, a.batch_per_device, a.iters = "tiny", 65_536, 8, 2
    a.image_size = a.image_size or get_preset(a.model).image_size

    results = run(a)
    print_table(results)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
