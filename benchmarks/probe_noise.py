"""How much of a linear-probe figure is the probe's own noise: one frozen checkpoint, many split seeds.

For every run of a study (``DIR/runs/<point>/seed<k>``) and the random-init ViT of each of those seeds,
the linear probe (``mlcd_jax/evaluate/linear_probe.py``: C chosen on one 20 % validation split of
train, CLIP's protocol) is fitted on the run's frozen features with validation-split seeds
0..S-1; kNN (deterministic) is printed beside it. Per checkpoint it prints the test top-1's mean and
sample std over the split seeds, and the figure at the run's own seed (what the study reports); kNN
uses the study's configured k.

The spread over split seeds is noise of the measurement, not of training: where it is as large as the
spread between training seeds, a study's mean ± std over seeds is mostly probe noise. Features are
computed as the study computes them: on a CPU-only machine on the run's ``cpu_devices`` fake devices
(features from another device count differ in the last bits, which can move a probe's choice of C).

``--heldout F`` scores both probes on a stratified fraction F of the *train* images instead (fitted on
the rest; the test split is never read): the figures a recipe can be chosen on without touching the
evaluation data.

Usage: python benchmarks/probe_noise.py --study DIR [--split-seeds 10] [--heldout F] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import ml_collections
import numpy as np
from etils import epath
from sklearn.model_selection import train_test_split

from mlcd_jax import cli
from mlcd_jax import runs
from mlcd_jax import experiment
from mlcd_jax.evaluate.evaluators import Knn, Target, build_evaluators, eval_features, labelled_features
from mlcd_jax.evaluate.knn import knn_accuracy
from mlcd_jax.evaluate.linear_probe import linear_probe


def _targets(study: epath.Path) -> list[tuple[str, object, int, Callable]]:
    """(name, run config, seed, model factory) for each trained run and one random-init ViT per seed."""
    out = []
    for workdir in sorted(study.glob("runs/*/seed*")):
        config = runs.load_run_config(str(workdir))
        out.append((f"{workdir.parent.name}/{workdir.name}", config, config.seed,
                    lambda w=str(workdir), c=config: runs.load_model(w, c)))
    if not out:
        raise SystemExit(f"error: {study} holds no runs (runs/<point>/seed<k>); give a study's --workdir")
    config = out[0][1]
    for seed in sorted({seed for _, _, seed, _ in out}):
        out.append((f"random-init/seed{seed}", config, seed, lambda s=seed, c=config: runs.build_model(c, s)))
    return out


def _features(
    config: ml_collections.ConfigDict, target: Target, heldout: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(fit features, labels, scored features, labels) of ``target``: the study's train / test, or with
    ``heldout`` > 0 a stratified split of train alone (fixed seed), the test split left unread."""
    if not heldout:
        return eval_features(config, target)
    x, y = labelled_features(config, target, "train")
    fit, held = train_test_split(np.arange(len(y)), test_size=heldout, random_state=0, stratify=y)
    return x[fit], y[fit], x[held], y[held]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", required=True, help="a study's --workdir (python -m mlcd_jax.study)")
    parser.add_argument("--split-seeds", type=int, default=10, help="validation-split seeds per checkpoint")
    parser.add_argument("--heldout", type=float, default=0.0,
                        help="score on this stratified fraction of the train images, not on the test split")
    parser.add_argument("--json", default="", help="also write the per-checkpoint figures here")
    args = parser.parse_args()
    if args.split_seeds < 2:
        raise SystemExit(f"error: --split-seeds={args.split_seeds}: a spread needs at least 2")
    if not 0 <= args.heldout < 1:
        raise SystemExit(f"error: --heldout={args.heldout} must be in [0, 1)")
    targets = _targets(epath.Path(args.study))
    cli.prepare_process(targets[0][1])  # the study's fake CPU devices, before JAX starts
    scored = "held-out train" if args.heldout else "test"
    knn = next((e for e in build_evaluators(targets[0][1]) if isinstance(e, Knn)), None)  # the study's, if on
    record = {}
    for name, config, seed, make in targets:
        target = experiment.model_target(config, name, make())  # features computed once, for both probes
        f_train, train_y, f_test, test_y = _features(config, target, args.heldout)
        if not record:
            print(f"{len(targets)} checkpoints; probe on {len(f_train)} train / {len(f_test)} {scored} images; split "
                  f"seeds 0..{args.split_seeds - 1}; linear top-1 % as mean ± sample std over the split seeds",
                  flush=True)
        start = time.perf_counter()
        top1 = [linear_probe(f_train, train_y, f_test, test_y, seed=s)["top1"] for s in range(args.split_seeds)]
        seconds = (time.perf_counter() - start) / args.split_seeds
        knn_top1 = {"knn_top1": knn_accuracy(f_train, train_y, f_test, test_y, k=knn.k)} if knn else {}
        record[name] = {**knn_top1, "linear_top1": top1}
        own = f"{100 * top1[seed]:.1f}" if seed < len(top1) else "-"
        knn_cell = f"kNN {100 * record[name]['knn_top1']:.1f} | " if knn else ""
        print(f"{name}: {knn_cell}linear {100 * np.mean(top1):.2f} ± "
              f"{100 * np.std(top1, ddof=1):.2f} (range {100 * min(top1):.1f}-{100 * max(top1):.1f}, at the run's "
              f"seed {own}) | {seconds:.2f} s per probe", flush=True)
    if args.json:
        epath.Path(args.json).write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
