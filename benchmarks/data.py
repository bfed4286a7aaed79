"""Input-pipeline throughput: JPEG decode + random-resized-crop + flip + normalise at 224 px, per core.

Images are real (Fashion-MNIST test images, tiled 4x4 and upscaled to 448x448 RGB-converted JPEGs at
quality 90, ~ImageNet's size), wrapped in MLCD records. Measures the training transform alone on one
core (images/s per core), the eval transform, and the whole grain loader (shards -> batches) with
0 and 2 worker processes. ``python benchmarks/data.py [--images 1024]``.
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time

import numpy as np
from PIL import Image

from mlcd_jax.cluster.writer import write_shard
from mlcd_jax.data import records
from mlcd_jax.data.pipeline import DecodeAndAugment, SkipLog, make_train_loader
from mlcd_jax.data.sources import load_arrays


def jpeg_records(n: int) -> list[bytes]:
    """n records holding 448x448 JPEGs made of real Fashion-MNIST images."""
    images, _ = load_arrays("fashion_mnist", split="test", limit=16 * n)
    out = []
    for i in range(n):
        tiles = images[16 * i : 16 * i + 16, :, :, 0].reshape(4, 4, 28, 28).transpose(0, 2, 1, 3).reshape(112, 112)
        img = Image.fromarray(tiles).resize((448, 448), Image.Resampling.BICUBIC).convert("RGB")
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        out.append(records.encode(buf.getvalue(), np.arange(8), np.linspace(1, 0, 8), f"bench/{i}"))
    return out


def transform_rate(recs: list[bytes], augment: bool, tmp: str) -> float:
    op = DecodeAndAugment(224, 8, augment, 3, (0.08, 1.0), SkipLog(tmp))
    rng = np.random.default_rng(0)
    op.random_map(recs[0], rng)
    t0 = time.perf_counter()
    for r in recs:
        op.random_map(r, rng)
    return len(recs) / (time.perf_counter() - t0)


def loader_rate(path: str, workers: int, batches: int) -> float:
    loader = make_train_loader([path], global_batch_size=64, image_size=224, top_l=8, seed=0, num_workers=workers)
    it = iter(loader)
    next(it)  # start-up (worker spawn) excluded
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * 64 / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=512)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    recs = jpeg_records(args.images)
    mean_kb = np.mean([len(r) for r in recs]) / 1024
    with tempfile.TemporaryDirectory() as tmp:
        train = transform_rate(recs, True, tmp)
        evaluation = transform_rate(recs, False, tmp)
        path = os.path.join(tmp, "bench.array_record")
        write_shard(path, recs)
        batches = max(1, args.images // 64 - 1)
        in_process = loader_rate(path, 0, batches)
        two_workers = loader_rate(path, 2, batches)
    print(f"cores: {os.cpu_count()}; {args.images} JPEG records, 448x448, mean {mean_kb:.0f} KiB")
    print(f"train transform (decode + random resized crop 224 + flip + normalise), 1 core: {train:.0f} images/s")
    print(f"eval transform (decode + resize + centre crop 224 + normalise), 1 core: {evaluation:.0f} images/s")
    print(f"grain loader, batch 64, in-process: {in_process:.0f} images/s")
    print(f"grain loader, batch 64, 2 worker processes: {two_workers:.0f} images/s")


if __name__ == "__main__":
    main()
