"""Benchmark of the evaluation library on this machine (one device; the CPU box has 2 cores).

Prints wall times (and accuracies where the data is real):
  * kNN (k = 20, T = 0.07) on Fashion-MNIST raw pixels, 60K train x 10K test x 784;
  * kNN at the size the issue names, 60K x 10K x 512 random features (time only);
  * linear probe (CLIP protocol) on 10K x 512 features: Fashion-MNIST pixels through a fixed Gaussian
    projection 784 -> 512 (real labels, realistic difficulty), tested on the 10K test images;
  * patch PCA on ViT-L/14 @ 448-sized tokens (8 images x (1 + 32x32) x 1024), and the Fashion-MNIST
    pixel-patch PCA sheet and a cosine-curve figure written to ``--out``.

Usage: python benchmarks/evaluate.py [--out /tmp/evaluate_bench]
       python benchmarks/evaluate.py --quick      (seconds; a smoke run on 1/10 of the data)
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from mlcd_jax.data.sources import fashion_mnist
from mlcd_jax.evaluate import knn, linear_probe, pictures

def _timed(label: str, fn: Callable[[], Any]) -> Any:
    """Runs ``fn`` and prints its wall time and the CPU time of this process (all threads) during it.

    Both, because the shared 2-core box is often busy with other jobs: then wall time overstates cost.
    """
    start, cpu = time.perf_counter(), time.process_time()
    out = fn()
    print(f"{label}: wall {time.perf_counter() - start:.2f} s, CPU {time.process_time() - cpu:.2f} s", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1/10 of every size")
    parser.add_argument("--out", default="/tmp/evaluate_bench", help="folder for the PNGs")
    args = parser.parse_args()
    div = 10 if args.quick else 1
    os.makedirs(args.out, exist_ok=True)
    rng = np.random.default_rng(0)

    (train_x, train_y), (test_x, test_y) = (fashion_mnist.arrays(fashion_mnist.FASHION_MNIST_DIR, split)
                                            for split in ("train", "test"))
    train_x, test_x = train_x[: 60000 // div, ..., 0], test_x[: 10000 // div, ..., 0]
    train_y, test_y = train_y[: len(train_x)], test_y[: len(test_x)]
    train_f, test_f = (x.reshape(len(x), -1).astype(np.float32) / 255 for x in (train_x, test_x))

    # Compile once outside the timings (one program per (batch, N_train, d, k)).
    knn.knn_classify(train_f, train_y, test_f[:1024], k=20)
    acc = _timed(
        f"kNN Fashion-MNIST pixels {len(train_f)}x{len(test_f)}x{train_f.shape[1]}",
        lambda: knn.knn_accuracy(train_f, train_y, test_f, test_y, k=20),
    )
    print(f"  kNN top-1 = {acc:.4f}")

    feats = rng.standard_normal((60000 // div + 10000 // div, 512), dtype=np.float32)
    labels = rng.integers(0, 1000, 60000 // div)
    knn.knn_classify(feats[: 60000 // div], labels, feats[:1024], k=20)
    _timed(
        f"kNN random {60000 // div}x{10000 // div}x512, 1000 classes",
        lambda: knn.knn_classify(feats[: 60000 // div], labels, feats[60000 // div :], k=20),
    )

    projection = rng.standard_normal((784, 512)).astype(np.float32) / 28
    n_probe = 10000 // div
    result = _timed(
        f"linear probe {n_probe}x512 (Fashion-MNIST pixels x Gaussian projection), 10 classes",
        lambda: linear_probe.linear_probe(
            train_f[:n_probe] @ projection, train_y[:n_probe], test_f @ projection, test_y
        ),
    )
    print(
        f"  linear top-1 = {result['top1']:.4f}, best C = {result['best_c']}, {len(result['val_top1'])} C values tried"
    )
    print("  val top-1 per C: " + json.dumps({f"{c:g}": round(a, 4) for c, a in result["val_top1"].items()}))

    tokens = rng.standard_normal((8 // (2 if args.quick else 1), 1 + 32 * 32, 1024), dtype=np.float32)
    _timed(f"patch PCA {tokens.shape}", lambda: pictures.patch_pca_image(tokens, (32, 32)))

    # Raw-pixel "patch tokens" (4x4 patches, 16 values each): no learning, but real image structure.
    images = test_x[:8]
    patch_tokens = images.reshape(8, 7, 4, 7, 4).transpose(0, 1, 3, 2, 4).reshape(8, 49, 16).astype(np.float32)
    pca = pictures.patch_pca_image(patch_tokens, (7, 7), has_class_token=False, upscale=4)
    pictures.pca_grid_png(images[..., None], pca, os.path.join(args.out, "pixel_patch_pca.png"))

    metrics = os.path.join(args.out, "metrics.jsonl")
    with open(metrics, "w", encoding="utf-8") as f:
        for step in range(1, 1001):  # a synthetic run: positives drift towards their prototypes
            row: dict[str, Any] = {
                "step": step,
                "loss_pos": 3 * np.exp(-step / 300),
                "loss_neg": 1 + np.exp(-step / 500),
                "mean_pos_cos": 0.8 - 0.7 * np.exp(-step / 300),
                "mean_neg_cos": 0.05 * np.exp(-step / 200),
            }
            if step % 50 == 0:
                pos = rng.normal(row["mean_pos_cos"], 0.1, 4096).clip(-1, 1)
                neg = rng.normal(row["mean_neg_cos"], 0.05, 40960).clip(-1, 1)
                row["pos_cos_hist"] = np.histogram(pos, pictures.COS_HIST_EDGES)[0].tolist()
                row["neg_cos_hist"] = np.histogram(neg, pictures.COS_HIST_EDGES)[0].tolist()
            f.write(json.dumps(row) + "\n")
    _timed(
        "cosine curves (1000 rows)",
        lambda: pictures.cosine_curves_png(metrics, os.path.join(args.out, "cosine_curves.png")),
    )
    print(f"pictures in {args.out}")


if __name__ == "__main__":
    main()
