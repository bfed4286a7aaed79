"""The clustering job's embed stage end to end on WebDataset tars: tar reading and JPEG decoding on host
threads overlapping a ViT teacher on this process's devices (``python -m mlcd_jax.cluster`` with
``stages=embed``), against its two bounds measured in the same process:

  * ``host``: read + decode + resize of the tars' 448-px JPEGs to the teacher's size, no teacher
    (``Context.chunk_batches``): on one thread, on a thread per core, and on a process per core
    (``decode_processes``); and the tar reading alone (the serial part);
  * ``teacher``: the teacher alone on decoded uint8 batches (``FeatureExtractor``, transfer included).

The job runs twice, decoding on threads and on processes; its rate is over the tars after the first
(the first holds the compilation). The teacher is a
preset with random weights saved as an HF checkpoint (``hf:DIR``): throughput does not depend on them.

Usage: python benchmarks/embed.py [--teacher L/14] [--dtype bfloat16] [--tars 6] [--per-tar 2048] [--json OUT]
       python benchmarks/embed.py --quick      (tiny teacher, a few hundred images, seconds)
"""

from __future__ import annotations

import argparse
import concurrent.futures
import io
import json
import os
import tarfile
import tempfile
import time

import jax
import ml_collections
import numpy as np
from flax import nnx

from data import jpeg_images
from mlcd_jax import cluster
from mlcd_jax.cluster import storage
from mlcd_jax.cluster.context import Context
from mlcd_jax.interop.hf import save_vision
from mlcd_jax.models import VisionTransformer, flops_per_image, get_preset
from mlcd_jax.models.features import FeatureExtractor
from mlcd_jax.runs import DTYPES

UNIQUE_JPEGS = 512  # distinct images, repeated under distinct keys (decoding costs the same)


def write_tars(root: str, jpegs: list[bytes], tars: int, per_tar: int) -> str:
    """``tars`` WebDataset tars of ``per_tar`` samples (``.jpg`` + ``.txt``); returns the brace pattern."""
    for t in range(tars):
        with tarfile.open(os.path.join(root, f"{t:05d}.tar"), "w") as tar:
            for i in range(per_tar):
                for ext, data in ((".jpg", jpegs[(t * per_tar + i) % len(jpegs)]), (".txt", b"a photo")):
                    info = tarfile.TarInfo(f"{t * per_tar + i:09d}{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return os.path.join(root, f"{{00000..{tars - 1:05d}}}.tar")


def host_rate(config: ml_collections.ConfigDict, size: int, threads: int, processes: int = 0) -> float:
    """Images/s of reading + decoding the first tar to ``size`` px (threads or processes), no teacher."""
    ctx = Context(ml_collections.ConfigDict({**config.to_dict(), "decode_threads": threads,
                                             "decode_processes": processes}))
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        if processes:  # start the workers outside the timing
            next(ctx.chunk_batches(0, pool, size, 3))
        start, n = time.perf_counter(), 0
        for positions, _ in ctx.chunk_batches(0, pool, size, 3):
            n += len(positions)
    return n / (time.perf_counter() - start)


def read_rate(config: ml_collections.ConfigDict) -> float:
    """Samples/s of reading the first tar alone (the one serial part of the host path)."""
    ctx = Context(config)
    start = time.perf_counter()
    n = sum(len(positions) for positions, _ in ctx.chunks.batches(0, 256))  # the stream, nothing decoded
    return n / (time.perf_counter() - start)


def job_rate(config: ml_collections.ConfigDict, tars: int) -> tuple[float, float]:
    """(images/s of the embed stage over tars 2.., wall seconds of the whole run)."""
    start = time.perf_counter()
    cluster.run(config)
    wall = time.perf_counter() - start
    chunks = []
    for t in range(tars):
        with storage.load_npz(os.path.join(config.output_dir, "embeddings", f"{t:05d}.npz")) as z:
            chunks.append((len(z["index"]), float(z["seconds"])))
    return sum(n for n, _ in chunks[1:]) / sum(s for _, s in chunks[1:]), wall


def teacher_rate(extractor: FeatureExtractor, images: np.ndarray, iters: int) -> float:
    extractor(images[: extractor.batch_size])  # compile
    start = time.perf_counter()
    for _ in range(iters):
        extractor(images)
    return iters * len(images) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="L/14")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--tars", type=int, default=6)
    parser.add_argument("--per-tar", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--json", default="")
    parser.add_argument("--quick", action="store_true", help="a tiny teacher on 3 tars of 128 images")
    args = parser.parse_args()
    overrides = {}
    if args.quick:
        args.teacher, args.tars, args.per_tar, args.batch = "B/32", 3, 128, 64
        overrides = dict(width=64, depth=2, num_heads=2, mlp_dim=128, proj_dim=32)
    cores = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as tmp:
        pattern = write_tars(tmp, jpeg_images(UNIQUE_JPEGS), args.tars, args.per_tar)
        cfg = get_preset(args.teacher, **overrides)
        model = VisionTransformer(cfg, rngs=nnx.Rngs(0))
        save_vision(model, os.path.join(tmp, "teacher"))
        del model
        config = ml_collections.ConfigDict(dict(
            source=f"wds:{pattern}", output_dir=os.path.join(tmp, "out"), teacher=f"hf:{tmp}/teacher",
            teacher_dtype=args.dtype, num_clusters=8, stages="embed", batch_size=args.batch, progress=False,
        ))
        size = cfg.image_size
        host = {"tar read only, no decode": read_rate(config), "one thread": host_rate(config, size, 1), f"{cores} threads": host_rate(config, size, cores),
                f"{cores} processes": host_rate(config, size, cores, cores)}
        images = np.random.default_rng(0).integers(0, 256, (4 * args.batch, size, size, 3), np.uint8)
        from mlcd_jax.interop.hf import load_vision

        teacher, _ = load_vision(f"{tmp}/teacher", dtype=DTYPES[args.dtype])
        device_rate = teacher_rate(FeatureExtractor(teacher, size, batch_size=args.batch), images, 3)
        del teacher
        jobs = {}
        for name, processes in ((f"{cores} threads", 0), (f"{cores} processes", cores)):
            run = ml_collections.ConfigDict({**config.to_dict(), "decode_processes": processes,
                                             "output_dir": os.path.join(tmp, f"out{processes}")})
            jobs[name] = job_rate(run, args.tars)
    gflops = flops_per_image(cfg) / 1e9
    result = {
        "teacher": args.teacher, "dtype": args.dtype, "gflops_per_image": gflops, "device": str(jax.devices()[0]),
        "devices": jax.device_count(), "host_cores": cores, "images": args.tars * args.per_tar,
        "host_images_per_s": host, "teacher_images_per_s": device_rate,
        "job_embed_images_per_s": {name: rate for name, (rate, _) in jobs.items()},
        "job_wall_s": {name: wall for name, (_, wall) in jobs.items()},
    }
    print(f"{args.teacher} teacher ({gflops:.1f} GFLOPs/image, {args.dtype}) on {jax.device_count()} x "
          f"{jax.devices()[0].device_kind}, {cores} host cores; {args.tars} tars x {args.per_tar} 448-px JPEGs")
    print("| path | images/s | vs the teacher alone |\n| --- | --- | --- |")
    for name, rate in host.items():
        print(f"| host ({name}): read + decode + resize to {size} px | {rate:.0f} | {rate / device_rate:.2f}x |")
    print(f"| teacher alone on decoded batches | {device_rate:.0f} | 1.00x |")
    for name, (rate, _) in jobs.items():
        print(f"| embed stage end to end (tars 2..{args.tars}), decoding on {name} | {rate:.0f} | "
              f"{rate / device_rate:.2f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
