"""Input-pipeline throughput, today's path against the path it replaced, in one process.

Two workloads, each with real images:

* **224-px training from ~450-px JPEG shards** (Fashion-MNIST test images tiled 4x4, upscaled to
  448x448 RGB JPEGs at quality 90, ImageNet's size): per-core host rate of the old transform (full
  decode + PIL random-resized-crop + flip + normalise per image) against the new one (decode with
  JPEG draft mode into a canvas; crop, flip and normalise batched on the device), then whole grain
  loaders in the main process: the old one (per-image transform, grain's default read-ahead) against
  the new one's host side; the new path's on-device augmentation is timed on its own (on a CPU it
  competes with the host for the same cores; on an accelerator it is part of the step).
* **The demo** (28-px PNG records of Fashion-MNIST or digits, batch 256): the old per-image loader
  against the new decoded-once, batch-per-element loader, again including the device augmentation.

``python benchmarks/data.py [--images 512]``; pins the process to one core for the per-core rows.

``python benchmarks/data.py --order-records 400000000`` instead measures the memory of the epoch order
at that many records: the per-position bijection (``order.EpochOrder``, read through the sampler and
in batches) against the materialised permutation it replaced.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import resource
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Iterator
from typing import Any

import grain
import jax
import numpy as np
from PIL import Image

from mlcd_jax.cluster.writer import write_shard
from mlcd_jax.data import augment, order, records
from mlcd_jax.data.pipeline import ToCanvas, SkipLog, make_train_loader
from mlcd_jax.data.sampling import GlobalOrderSampler
from mlcd_jax.data.sources import fashion_mnist, load_arrays

SOURCE = "fashion_mnist" if fashion_mnist.installed() else "digits"


def jpeg_images(n: int) -> list[bytes]:
    """n 448x448 JPEGs (q90, ~31 KiB) made of real images (16 tiled per JPEG)."""
    images, _ = load_arrays(SOURCE, split="all", limit=16 * n)
    side = images.shape[1]
    out = []
    for i in range(n):
        tiles = images[np.arange(16 * i, 16 * i + 16) % len(images), :, :, 0]
        tiles = tiles.reshape(4, 4, side, side).transpose(0, 2, 1, 3).reshape(4 * side, 4 * side)
        img = Image.fromarray(tiles).resize((448, 448), Image.Resampling.BICUBIC).convert("RGB")
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def jpeg_records(n: int) -> list[bytes]:
    """n records holding the JPEGs of ``jpeg_images``."""
    return [records.encode(jpeg, np.arange(8), np.linspace(1, 0, 8), f"bench/{i}")
            for i, jpeg in enumerate(jpeg_images(n))]


def png_records(n: int) -> list[bytes]:
    """The demo's records: n small real images stored as lossless PNG, as the clustering job writes them."""
    images, _ = load_arrays(SOURCE, split="train", limit=n)
    return [records.encode(augment.encode_png(im), np.arange(8), np.linspace(1, 0, 8), f"demo/{i}")
            for i, im in enumerate(images)]


class OldTransform(grain.transforms.RandomMap):
    """The replaced path: full decode, PIL random-resized-crop (torchvision's algorithm), flip and
    CLIP normalisation per image on the host, float32 out."""

    def __init__(self, image_size: int) -> None:
        self.image_size = image_size

    def random_map(self, element: bytes, rng: np.random.Generator) -> dict[str, Any]:
        rec = records.decode(element)
        image = augment.to_channels(augment.decode_image(rec["image"]), 3)
        h, w, _ = image.shape
        box = None
        for _ in range(10):
            target = h * w * rng.uniform(0.08, 1.0)
            aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
            cw, ch = math.sqrt(target * aspect), math.sqrt(target / aspect)
            if cw <= w and ch <= h:
                left, top = rng.uniform(0, w - cw), rng.uniform(0, h - ch)
                box = (left, top, left + cw, top + ch)
                break
        box = box or (0, 0, w, h)
        out = np.asarray(Image.fromarray(image).resize((self.image_size,) * 2, Image.Resampling.BILINEAR, box=box))
        if rng.random() < 0.5:
            out = out[:, ::-1]
        return {"image": augment.normalize(out), "labels": records.pad_labels(rec["labels"], 8)}


def old_loader(path: str, batch: int, image_size: int) -> grain.DataLoader:
    """The replaced loader: per-image host transform, grain's default read-ahead (16 threads, 500)."""
    source = grain.sources.ArrayRecordDataSource([path])
    return grain.DataLoader(
        data_source=source,
        sampler=GlobalOrderSampler(len(source), batch, 0, 1, None),
        operations=[OldTransform(image_size), grain.transforms.Batch(batch, drop_remainder=True)],
        shard_options=grain.sharding.NoSharding(),
    )


def per_image_rate(fn: Callable[[bytes, np.random.Generator], Any], recs: list[bytes]) -> float:
    rng = np.random.default_rng(0)
    fn(recs[0], rng)
    start = time.perf_counter()
    for r in recs:
        fn(r, rng)
    return len(recs) / (time.perf_counter() - start)


def loader_rate(batches: Iterator[dict[str, Any]], finish: Callable[[dict[str, Any]], Any], n: int, batch: int) -> float:
    """Images/s of ``n`` batches, each passed through ``finish`` (the device step) and waited for."""
    jax.block_until_ready(finish(next(batches)))  # start-up and compilation excluded
    start = time.perf_counter()
    for _ in range(n):
        jax.block_until_ready(finish(next(batches)))
    return n * batch / (time.perf_counter() - start)


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _measure(fn: Callable[[], Any]) -> tuple[float, float, float]:
    """(seconds, tracemalloc peak MiB, growth of the process's peak RSS in MiB) of ``fn()``."""
    rss = _peak_rss_mib()
    tracemalloc.start()
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return seconds, peak, _peak_rss_mib() - rss


def order_memory(num_records: int, batch: int = 256, batches: int = 2000, sampler_reads: int = 20_000) -> None:
    """Memory and time of one epoch's order at ``num_records``: ``batches`` batches of ``batch`` positions
    spread over the epoch (the in-memory loader's gather) and ``sampler_reads`` single positions through
    ``GlobalOrderSampler`` (the streamed loader), new bijection first (the peak RSS only grows), then the
    old way: ``np.random.default_rng([seed, epoch]).permutation(num_records)``."""
    starts = np.linspace(0, num_records - batch, batches).astype(np.int64)
    indices = np.linspace(0, num_records - 1, sampler_reads).astype(np.int64)

    def new() -> None:
        epoch_order = order.EpochOrder(num_records, 0, 0)
        for start in starts:
            epoch_order.records(np.arange(start, start + batch))
        sampler = GlobalOrderSampler(num_records, 32_768, 0, 1, None)
        for i in indices:
            sampler[int(i)]

    def old() -> None:
        permutation = np.random.default_rng([0, 0]).permutation(num_records)
        for start in starts:
            permutation[start:start + batch]
        for i in indices:
            int(permutation[i])

    rows = [("per-position bijection (EpochOrder)", *_measure(new)),
            ("materialised permutation (old)", *_measure(old))]
    print(f"epoch order of {num_records:,} records: {batches} batches of {batch} positions and "
          f"{sampler_reads} sampler reads across the epoch; numpy {np.__version__}")
    print("| order | time s | tracemalloc peak MiB | peak RSS growth MiB |\n| --- | --- | --- | --- |")
    for name, seconds, peak, rss in rows:
        print(f"| {name} | {seconds:.1f} | {peak:.2f} | {rss:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=512, help="JPEG records for the 224-px workload")
    parser.add_argument("--demo-images", type=int, default=10_000, help="PNG records for the demo workload")
    parser.add_argument("--order-records", type=int, default=0,
                        help="measure the epoch order's memory at this many records instead (e.g. 400000000)")
    args = parser.parse_args()
    if args.order_records:
        order_memory(args.order_records)
        return
    jpegs = jpeg_records(args.images)
    mean_kb = np.mean([len(r) for r in jpegs]) / 1024
    new = ToCanvas(8, 224, 448, 3, SkipLog(tempfile.mkdtemp()))
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # per-core rows: one core
    old_rate = per_image_rate(OldTransform(224).random_map, jpegs)
    new_rate = per_image_rate(lambda record, rng: new.random_map(("benchmark", record), rng), jpegs)
    rows = [("224 px from 448-px JPEGs, host work per image, 1 core", old_rate, new_rate)]
    os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "jpeg.array_record")
        write_shard(path, jpegs)
        batches = max(1, args.images // 64 - 2)
        loader = make_train_loader([path], global_batch_size=64, image_size=224, top_l=8, seed=0)
        rows.append((
            "224 px from 448-px JPEGs, grain loader batch 64 (host side), all cores",
            loader_rate(iter(old_loader(path, 64, 224)), lambda b: b, batches, 64),
            loader_rate(iter(loader), lambda b: b, batches, 64),
        ))
        batch = next(iter(loader))
        augment_rate = loader_rate(iter(lambda: batch, None), jax.jit(loader.augment), 3, 64)
        path = os.path.join(tmp, "demo.array_record")
        write_shard(path, png_records(args.demo_images))
        size = load_arrays(SOURCE, split="test", limit=1)[0].shape[1]
        loader = make_train_loader([path], global_batch_size=256, image_size=size, top_l=8, seed=0)
        batches = args.demo_images // 256 - 2
        rows.append((
            f"the demo ({SOURCE}, {size} px PNG records), loader batch 256 (+ device augment), all cores",
            loader_rate(iter(old_loader(path, 256, size)), lambda b: b, batches, 256),
            loader_rate(iter(loader), jax.jit(loader.augment), batches, 256),
        ))
    print(f"cores: {len(os.sched_getaffinity(0))}; {args.images} JPEG records, 448x448, mean {mean_kb:.0f} KiB; "
          f"jax {jax.__version__} on {jax.devices()[0].platform}")
    print("| workload | old path img/s | new path img/s | new / old |\n| --- | --- | --- | --- |")
    for name, old, new_ in rows:
        print(f"| {name} | {old:.0f} | {new_:.0f} | {new_ / old:.2f}x |")
    print(f"on-device augmentation of 224-px crops from 448-px canvases, on this machine's "
          f"{jax.devices()[0].platform} devices: {augment_rate:.0f} images/s (part of the train step)")


if __name__ == "__main__":
    main()
