"""Teacher throughput of the clustering job's embed stage: images/s of a ViT teacher, per device and over
all of this process's devices, and the FLOPs per image it runs.

Measured in one process, as ratios to the one-device baseline:
  * ``forward``: the jitted forward (CLIP normalisation included) on uint8 batches already on the
    device: the device's rate;
  * ``extractor``: ``FeatureExtractor`` end to end on uint8 host images of the teacher's size (the
    transfer overlapped with the device), what the embed stage calls per batch after decoding.
``--teacher`` names a preset (random weights: throughput does not depend on them). FLOPs per image are the
model's count (``flops_per_image``) and XLA's for the compiled forward.

``--topology v5p-8`` (or any slice ``python -m mlcd_jax.aot`` takes) instead compiles the data-parallel
forward for that TPU slice with libtpu on this machine (no TPU needed) and prints XLA's FLOPs per image
and the program's memory per chip: what the embed stage would run there.

Usage: python benchmarks/teacher.py [--teacher L/14] [--batch 256] [--iters 10] [--dtype bfloat16] [--json OUT]
       python benchmarks/teacher.py --teacher L/14 --topology v5p-8 [--batch 1024]
       python benchmarks/teacher.py --quick     (tiny teacher, seconds)
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mlcd_jax.data.pipeline import eval_pixels
from mlcd_jax.models import VisionTransformer, features, flops_per_image, get_preset
from mlcd_jax.runs import DTYPES


def _forward_rate(model: VisionTransformer, batch: np.ndarray, devices: list[jax.Device], iters: int) -> tuple[float, float | None]:
    """(images/s of the compiled forward over ``devices``, XLA's FLOPs per image or None)."""
    mesh = Mesh(np.asarray(devices), ("batch",))
    graphdef, state = nnx.split(model)
    state = jax.device_put(state, NamedSharding(mesh, P()))
    x = jax.device_put(batch, NamedSharding(mesh, P("batch")))
    compiled = features._forward.lower(graphdef, state, x, False, NamedSharding(mesh, P())).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    xla_flops = float(cost["flops"]) * len(devices) / len(batch) if cost and "flops" in cost else None
    compiled(state, x).block_until_ready()
    start = time.perf_counter()
    for _ in range(iters):
        out = compiled(state, x)
    out.block_until_ready()
    return iters * len(batch) / (time.perf_counter() - start), xla_flops


def _extractor_rate(model: VisionTransformer, images: np.ndarray, size: int, batch: int,
                    devices: list[jax.Device]) -> float:
    extractor = features.FeatureExtractor(model, size, batch_size=batch, devices=devices)
    extractor(images[:batch])  # compile
    start = time.perf_counter()
    extractor(images)
    return len(images) / (time.perf_counter() - start)


def tpu_plan(teacher: str, topology: str, batch: int, dtype: str) -> dict[str, Any]:
    """XLA's FLOPs per image and the memory per chip of the teacher's forward compiled for ``topology``."""
    from mlcd_jax import aot

    aot.quiet_libtpu()  # before JAX starts a backend
    chips = aot.devices(aot.parse_topology(topology))
    mesh = Mesh(np.asarray(chips), ("batch",))
    cfg = get_preset(teacher)
    abstract = nnx.eval_shape(lambda: VisionTransformer(cfg, rngs=nnx.Rngs(0), dtype=DTYPES[dtype]))
    graphdef, state = nnx.split(abstract)
    replicated = NamedSharding(mesh, P())
    state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), state)
    x = jax.ShapeDtypeStruct((batch, cfg.image_size, cfg.image_size, 3), np.uint8, sharding=NamedSharding(mesh, P("batch")))
    compiled = features._forward.lower(graphdef, state, x, False, replicated).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    memory = compiled.memory_analysis()
    return {
        "teacher": teacher, "topology": topology, "chips": len(chips), "device": chips[0].device_kind,
        "dtype": dtype, "batch": batch, "model_flops_per_image": flops_per_image(cfg),
        # the per-chip program's FLOPs x chips / images
        "xla_flops_per_image": float(cost["flops"]) * len(chips) / batch,
        "memory_per_chip_bytes": int(memory.argument_size_in_bytes + memory.output_size_in_bytes
                                     + memory.temp_size_in_bytes - memory.alias_size_in_bytes),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="L/14", help="a ViT preset name")
    parser.add_argument("--batch", type=int, default=256, help="images per forward (all devices together)")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--dtype", default=None, help="compute dtype (default bfloat16 on GPU/TPU, float32 on CPU)")
    parser.add_argument("--quick", action="store_true", help="tiny teacher at 32 px, batch 64")
    parser.add_argument("--json", default=None, help="write the figures here")
    parser.add_argument("--topology", default=None, help="compile for this TPU slice (libtpu) instead of timing")
    args = parser.parse_args()
    if args.topology:
        plan = tpu_plan(args.teacher, args.topology, args.batch, args.dtype or "bfloat16")
        print(f"{args.teacher} forward on {plan['topology']} ({plan['chips']} x {plan['device']}), batch {args.batch}, "
              f"{plan['dtype']}: {plan['xla_flops_per_image'] / 1e9:.1f} GFLOPs/image (XLA, TPU) against "
              f"{plan['model_flops_per_image'] / 1e9:.1f} (model count); "
              f"{plan['memory_per_chip_bytes'] / 2**30:.2f} GiB per chip", flush=True)
        if args.json:
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump(plan, f, indent=1)
        return
    if args.quick:
        args.teacher, args.batch, args.iters = "tiny", 64, 3
    on_cpu = jax.default_backend() == "cpu"
    dtype = args.dtype or ("float32" if on_cpu else "bfloat16")
    cfg = get_preset(args.teacher, **({"image_size": 32} if args.quick else {}))
    model = VisionTransformer(cfg, rngs=nnx.Rngs(0), dtype=DTYPES[dtype])
    devices = jax.local_devices()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.batch * max(args.iters // 2, 2), cfg.image_size, cfg.image_size, 3), np.uint8)
    batch = eval_pixels(images[: args.batch], cfg.image_size)

    result: dict[str, Any] = {
        "teacher": args.teacher, "image_size": cfg.image_size, "dtype": dtype, "batch": args.batch,
        "device": devices[0].device_kind, "num_devices": len(devices), "backend": jax.default_backend(),
        "model_flops_per_image": flops_per_image(cfg),
    }
    one, result["xla_flops_per_image"] = _forward_rate(model, batch, devices[:1], args.iters)
    result["forward_images_per_s_1_device"] = one
    result["extractor_images_per_s_1_device"] = _extractor_rate(model, images, cfg.image_size, args.batch, devices[:1])
    print(f"{args.teacher} @ {cfg.image_size} px, {dtype}, {devices[0].device_kind}: "
          f"{flops_per_image(cfg) / 1e9:.3g} GFLOPs/image (model count), "
          f"{(result['xla_flops_per_image'] or 0) / 1e9:.3g} (XLA)", flush=True)
    print(f"  forward, 1 device: {one:.1f} images/s", flush=True)
    print(f"  extractor (host -> device overlapped), 1 device: "
          f"{result['extractor_images_per_s_1_device']:.1f} images/s", flush=True)
    if len(devices) > 1 and args.batch % len(devices) == 0:
        every, _ = _forward_rate(model, batch, devices, args.iters)
        result["forward_images_per_s_all_devices"] = every
        result["extractor_images_per_s_all_devices"] = _extractor_rate(model, images, cfg.image_size, args.batch,
                                                                       devices)
        print(f"  forward, {len(devices)} devices: {every:.1f} images/s ({every / one:.2f}x one device)", flush=True)
        print(f"  extractor, {len(devices)} devices: {result['extractor_images_per_s_all_devices']:.1f} images/s "
              f"({result['extractor_images_per_s_all_devices'] / result['extractor_images_per_s_1_device']:.2f}x)",
              flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
