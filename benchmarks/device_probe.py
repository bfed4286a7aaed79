"""The on-device linear probe (``mlcd_jax.evaluate.device_probe``) against scikit-learn's
(``mlcd_jax.evaluate.linear_probe``) on a trained demo run's features: test top-1 of both, per seed (the
seed picks the held-out part of train that chooses C), their difference, the chosen C and wall times.

``python benchmarks/device_probe.py --workdir=RUN [--seeds 0 1 2]``: the run's eval split (its
``config.json``: ``eval.source``, limits), features of its trained ViT, of the random-init ViT of its
seed, and raw pixels.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from mlcd_jax import runs
from mlcd_jax.evaluate.device_probe import device_linear_probe
from mlcd_jax.evaluate.evaluators import Target, eval_features
from mlcd_jax.evaluate.linear_probe import linear_probe
from mlcd_jax.models.features import FeatureExtractor, pixel_features


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    config = runs.load_run_config(args.workdir)
    encoders = {
        "trained ViT": FeatureExtractor(runs.load_model(args.workdir, config), config.data.image_size),
        "random-init ViT": FeatureExtractor(runs.build_model(config, config.seed), config.data.image_size),
        "raw pixels": pixel_features,
    }
    print("| features | seed | scikit-learn top-1 | device top-1 | difference (points) | C (sklearn / device) "
          "| seconds (sklearn / device) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, encode in encoders.items():
        train_f, train_y, test_f, test_y = eval_features(config, Target(name, encode))
        print(f"{config.eval.source}: {len(train_f)} train / {len(test_f)} test images")
        for seed in args.seeds:
            start = time.perf_counter()
            reference = linear_probe(train_f, train_y, test_f, test_y, seed=seed)
            middle = time.perf_counter()
            device = device_linear_probe(train_f, train_y, test_f, test_y, seed=seed)
            end = time.perf_counter()
            diff = 100 * (device["top1"] - reference["top1"])
            print(f"| {name} | {seed} | {100 * reference['top1']:.2f} | {100 * device['top1']:.2f} | {diff:+.2f} "
                  f"| {reference['best_c']:g} / {device['best_c']:g} | {middle - start:.1f} / {end - middle:.1f} |",
                  flush=True)


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
