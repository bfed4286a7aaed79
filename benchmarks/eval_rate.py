"""How fast the evaluation runs on this machine (issue 30): (a) streamed feature extraction, images/s,
(b) the on-device linear probe's L-BFGS, seconds per iteration and per probe, extrapolated to an
ImageNet-1K probe (1.28M x 1,024 features, 1,000 classes), and (c) the eval transform of ImageNet-sized
images (shorter side to 224, centre crop) on the host by PIL against the device's share of it.

(a) A folder of 224 px JPEGs (smooth noise) streamed through a random-init tiny ViT (patch 32, one block,
width 64: the model of tests/test_eval_memory.py) by :func:`mlcd_jax.evaluate.stream.split_features`
(decode + embed), and the same images embedded from memory (embed only).

(b) :func:`mlcd_jax.evaluate.device_probe.device_linear_probe` on synthetic features (Gaussian class
means + noise). Seconds per L-BFGS iteration: one C fitted with ``tol=0`` at two ``max_iter`` values (search
fit + refit each, timed after a compiling run), the difference divided by the extra iterations (setup
cancels). Iterations
per probe: the whole CLIP search at a smaller size (its fits' counts, the refit counted as the best C's).
Extrapolation assumes an iteration costs in proportion to N * d * C (the logits' matmul and its
gradient dominate) and that the ImageNet probe needs as many iterations as the synthetic one.

(c) Decoded images of ImageNet's common sizes (500 x 375, 375 x 500, 500 x 333, 500 x 500): host
seconds per image of :func:`~mlcd_jax.data.augment.resize_center_crop` (the whole transform in PIL)
against :func:`~mlcd_jax.data.eval_resize.plan` + ``pack`` (the host's share when the device resizes),
and the device's rate for :func:`~mlcd_jax.data.eval_resize.resize` in batches of 256 (here the "device"
is this CPU).

``python benchmarks/eval_rate.py [--images 2048]`` (about 2 minutes on a 2-core CPU; progress bars on stderr).
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from PIL import Image

from mlcd_jax import experiment, runs
from mlcd_jax.config_lib import base_config
from mlcd_jax.data import augment, eval_resize
from mlcd_jax.data.sources import FolderSource
from mlcd_jax.evaluate.device_probe import device_linear_probe
from mlcd_jax.evaluate.linear_probe import COARSE_C_GRID, REFINE_ROUNDS
from mlcd_jax.evaluate.stream import read_images, split_features

IMAGENET = (1_281_167, 1024, 1000)  # train rows, feature width, classes


def _folder(root: Path, count: int) -> FolderSource:
    """``count`` 224 px JPEGs (quality 75) in 10 class folders."""
    rng = np.random.default_rng(0)
    for i in range(count):
        noise = rng.integers(0, 256, (14, 14, 3), np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(noise).resize((224, 224), Image.Resampling.BILINEAR).save(buffer, "JPEG", quality=75)
        (root / f"c{i % 10}").mkdir(exist_ok=True)
        (root / f"c{i % 10}" / f"{i:06d}.jpg").write_bytes(buffer.getvalue())
    return FolderSource(str(root))


def extraction_rate(count: int) -> tuple[float, float]:
    """(streamed decode + embed, embed from memory) images per second of the tiny ViT at 224 px."""
    c = base_config()
    c.model.name, c.model.dtype, c.data.image_size = "tiny", "float32", 224
    c.model.overrides = {"patch_size": 32, "depth": 1}
    embed = experiment.model_target(c, "random-init", runs.build_model(c, 0)).embed
    with tempfile.TemporaryDirectory() as tmp:
        source = _folder(Path(tmp), count)
        images = read_images(source, np.arange(count), 224)[0]
        embed(images[:256])  # compile
        start = time.perf_counter()
        split_features(embed, source, count, 224, "benchmark")
        streamed = count / (time.perf_counter() - start)
        start = time.perf_counter()
        embed(images)
        return streamed, count / (time.perf_counter() - start)


def _features(n: int, d: int, classes: int, seed: int = 0) -> tuple[np.ndarray, ...]:
    """Train and test (a fifth of ``n``) features: class means (std 0.1) plus unit noise, learnable but
    far from separable, and their labels."""
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((classes, d)).astype(np.float32) * 0.1
    out = []
    for rows in (n, n // 5):
        labels = rng.integers(0, classes, rows)
        out += [means[labels] + rng.standard_normal((rows, d), np.float32), labels]
    return tuple(out)


def seconds_per_iteration(n: int, d: int, classes: int, iterations: tuple[int, int] = (5, 25)) -> float:
    """Seconds per L-BFGS iteration at N x d x C: one C, ``tol=0``, two iteration budgets differenced."""
    data = _features(n, d, classes)
    times = []
    for max_iter in iterations:
        device_linear_probe(*data, c_grid=[1.0], max_iter=max_iter, tol=0.0)  # compiles (max_iter is static)
        start = time.perf_counter()
        device_linear_probe(*data, c_grid=[1.0], max_iter=max_iter, tol=0.0)
        times.append(time.perf_counter() - start)
    return (times[1] - times[0]) / (2 * (iterations[1] - iterations[0]))  # a search fit and a refit each


def probe_iterations(n: int, d: int, classes: int) -> tuple[int, float]:
    """L-BFGS iterations of one whole probe (CLIP's C search + refit) and its seconds, at N x d x C."""
    start = time.perf_counter()
    result = device_linear_probe(*_features(n, d, classes))
    seconds = time.perf_counter() - start
    return sum(result["iterations"].values()) + result["iterations"][result["best_c"]], seconds


def transform_rates(count: int = 256, size: int = 224) -> tuple[float, float, float]:
    """(c): images per second of the eval transform of ``count`` decoded ImageNet-sized images: all of it
    on the host by PIL, the host's share of the device path, and the device's resize."""
    rng = np.random.default_rng(0)
    shapes = [(500, 375), (375, 500), (500, 333), (500, 500)]
    images = [rng.integers(0, 256, (*shapes[i % 4], 3), np.uint8) for i in range(count)]
    start = time.perf_counter()
    for image in images:
        augment.resize_center_crop(image, size)
    host = count / (time.perf_counter() - start)
    side, taps = eval_resize.canvas_side([eval_resize.plan(image, size) for image in images], size)
    canvas = np.empty((count, side, side, 3), np.uint8)
    for _ in range(2):  # the second pass as the extractor runs: its canvas memory reused, taps cached
        start = time.perf_counter()
        plans = [eval_resize.plan(image, size) for image in images]
        arrays = eval_resize.pack(plans, count, size, side, taps, out=canvas)
        share = count / (time.perf_counter() - start)
    resize = jax.jit(eval_resize.resize)
    on_device = [jax.device_put(a) for a in arrays]
    resize(*on_device).block_until_ready()  # compile
    start = time.perf_counter()
    resize(*on_device).block_until_ready()
    return host, share, count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2048, help="JPEGs for the extraction rate")
    args = parser.parse_args()
    print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind}", flush=True)
    streamed, in_memory = extraction_rate(args.images)
    print(f"(a) tiny ViT 224/32, depth 1: {streamed:,.0f} img/s streamed from JPEGs (decode + embed), "
          f"{in_memory:,.0f} img/s embedding decoded images; ImageNet-1K train at the streamed rate: "
          f"{IMAGENET[0] / streamed / 60:,.0f} min", flush=True)
    small = (5_000, 128, 50)
    iterations, seconds = probe_iterations(*small)
    print(f"(b) whole probe at N x d x C = {small}: {iterations} L-BFGS iterations, {seconds:.1f} s "
          f"(at most {2 * REFINE_ROUNDS + len(COARSE_C_GRID) + 1} fits x 1,000)", flush=True)
    for measured in ((10_000, 256, 100), (20_000, 512, 200)):  # 8x the work: is the cost linear?
        per_iteration = seconds_per_iteration(*measured)
        scale = np.prod(IMAGENET, dtype=np.float64) / np.prod(measured, dtype=np.float64)
        print(f"    {per_iteration * 1e3:.1f} ms per iteration at {measured}; x {scale:,.0f} (N*d*C) = "
              f"{per_iteration * scale:.1f} s per iteration at ImageNet-1K {IMAGENET}", flush=True)
    print(f"    ImageNet-1K probe on this machine: {iterations} iterations x {per_iteration * scale:.1f} s = "
          f"{iterations * per_iteration * scale / 3600:,.1f} h (assumes cost linear in N*d*C per iteration and "
          f"the synthetic probe's iteration count)", flush=True)
    host, share, device = transform_rates()
    print(f"(c) eval transform of 500 px images to 224: {host:,.0f} img/s all on the host (PIL), "
          f"{share:,.0f} img/s the host's share of the device path ({share / host:.1f}x), "
          f"{device:,.0f} img/s the resize on {jax.devices()[0].device_kind}", flush=True)


if __name__ == "__main__":
    main()
