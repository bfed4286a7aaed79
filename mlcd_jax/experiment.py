"""One run of the whole method: shards (clustered on first use) -> training -> evaluation table.

``run(config, workdir)`` is what ``python -m mlcd_jax.main`` calls; it is importable so tests and
notebooks drive the same path.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath
from flax import nnx

from mlcd_jax import runs, train
from mlcd_jax.train import ConfigError

RESULT_COLUMNS = ("model", "knn_top1", "linear_top1")
# The baselines of ``config.eval.baselines`` that need no training, in table order, and their row names.
BASELINE_MODELS = {"pixels": "raw pixels", "teacher": "teacher (clustering)", "random_init": "random-init ViT"}


def cluster_cache_dir(config: ml_collections.ConfigDict) -> str:
    """Where the clustering job's output for ``config.data.cluster`` lives (keyed by its settings)."""
    if config.data.cache_dir:
        return config.data.cache_dir
    key = hashlib.sha256(config.data.cluster.to_json(sort_keys=True).encode()).hexdigest()[:16]
    root = os.environ.get("MLCD_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "mlcd_jax"))
    return os.path.join(root, "clusters", key)


def ensure_shards(config: ml_collections.ConfigDict) -> None:
    """Fills ``config.data.shards`` by running (or reusing) the clustering job when it is empty."""
    if config.data.shards:
        return
    if not config.data.cluster or not config.data.cluster.get("source"):
        raise ConfigError("data.shards is empty and data.cluster.source is not set: nothing to train on")
    from mlcd_jax import cluster

    cluster_config = copy.deepcopy(config.data.cluster)
    with cluster_config.unlocked():
        cluster_config.output_dir = cluster_cache_dir(config)
    if jax.process_index() == 0:
        print(f"clustering {cluster_config.source} into {cluster_config.output_dir} (cached)", flush=True)
        cluster.run(cluster_config)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("clustering done")
    config.data.shards = cluster_config.output_dir


def _single_label_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The same recipe with the single-label softmax loss on the top-1 cluster (the UNICOM baseline)."""
    other = copy.deepcopy(config)
    other.loss.kind = "softmax"
    other.eval.baselines = ""
    return other


def configured_baselines(config: ml_collections.ConfigDict) -> list[str]:
    """``config.eval.baselines`` as a list of names; an unknown name is a ConfigError."""
    baselines = [b for b in config.eval.baselines.split(",") if b]
    unknown = set(baselines) - {*BASELINE_MODELS, "single_label"}
    if unknown:
        raise ConfigError(f"eval.baselines has unknown entries {sorted(unknown)}")
    return baselines


def trained_model_name(config: ml_collections.ConfigDict) -> str:
    """The ``model`` of the trained run's row in ``results.json``, e.g. ``MLCD ViT``."""
    return f"{config.loss.kind.upper()} ViT"


def features_row(
    config: ml_collections.ConfigDict, name: str, embed: Callable[[np.ndarray], np.ndarray]
) -> dict[str, Any]:
    """kNN (and, with ``eval.linear_probe``, linear-probe) top-1 of ``embed``'s features on the eval split.

    Every results row is computed here, so baselines, trained runs and studies are measured alike.
    """
    from mlcd_jax.evaluate.knn import knn_accuracy
    from mlcd_jax.evaluate.linear_probe import linear_probe

    train_x, train_y, test_x, test_y = eval_arrays(config)
    f_train, f_test = embed(train_x), embed(test_x)
    result = {"model": name, "knn_top1": knn_accuracy(f_train, train_y, f_test, test_y, k=config.eval.knn_k)}
    if config.eval.linear_probe:
        result["linear_top1"] = linear_probe(f_train, train_y, f_test, test_y, seed=config.seed)["top1"]
    print(f"  {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in result.items() if k != "model"), flush=True)
    return result


def model_row(config: ml_collections.ConfigDict, name: str, model: nnx.Module) -> dict[str, Any]:
    """:func:`features_row` of a ViT's pooled features."""
    from mlcd_jax.evaluate.features import FeatureExtractor

    return features_row(config, name, FeatureExtractor(model, config.data.image_size))


def baseline_row(config: ml_collections.ConfigDict, baseline: str) -> dict[str, Any]:
    """The row of one of :data:`BASELINE_MODELS`: ``pixels``, ``teacher`` (the embedding that clustered
    ``config.data.shards``) or ``random_init`` (the ViT initialised with ``config.seed``)."""
    from mlcd_jax.cluster import load_teacher
    from mlcd_jax.evaluate.features import pixel_features

    name = BASELINE_MODELS[baseline]
    if baseline == "pixels":
        return features_row(config, name, pixel_features)
    if baseline == "teacher":
        return features_row(config, name, load_teacher(config.data.shards))
    return model_row(config, name, runs.build_model(config, config.seed))


def evaluate_workdir(config: ml_collections.ConfigDict, workdir: str) -> list[dict[str, Any]]:
    """kNN / linear-probe rows for the trained model in ``workdir`` and the configured baselines.

    Writes ``workdir/results.json`` and prints the table.
    """
    from mlcd_jax.evaluate.report import results_table, write_results

    baselines = configured_baselines(config)
    train_x, _, test_x, _ = eval_arrays(config)
    print(f"evaluating on {config.eval.source}: {len(train_x)} train / {len(test_x)} test images", flush=True)
    rows = [baseline_row(config, b) for b in BASELINE_MODELS if b in baselines]
    trained = runs.load_model(workdir, config)
    rows.append(model_row(config, trained_model_name(config), trained))
    if "single_label" in baselines:
        other_dir = str(epath.Path(workdir) / "single_label")
        other = _single_label_config(config)
        print("training the single-label (UNICOM-style softmax) baseline", flush=True)
        train.train_and_evaluate(other, other_dir)
        rows.append(model_row(config, "single-label ViT (UNICOM)", runs.load_model(other_dir, other)))
    if jax.process_index() == 0:
        write_pictures(config, workdir, trained, test_x[:8])
        write_results(rows, epath.Path(workdir) / "results.json")
        print(results_table(rows, [c for c in RESULT_COLUMNS if any(c in r for r in rows)]), flush=True)
    return rows


def write_pictures(config: ml_collections.ConfigDict, workdir: str, model, images: np.ndarray) -> None:
    """``patch_pca.png`` (paper Fig. 6: images beside their patch-feature PCA) and ``cosine_curves.png``
    (Fig. 3 analogue: loss terms, mean cosines and cosine histograms over training, single-label
    baseline overlaid when it was trained) in ``workdir``."""
    from mlcd_jax.evaluate.features import FeatureExtractor
    from mlcd_jax.evaluate.pictures import cosine_curves_png, patch_pca_image, pca_grid_png

    tokens = FeatureExtractor(model, config.data.image_size, batch_size=len(images), tokens=True)(images)
    grid = config.data.image_size // model.config.patch_size
    out = epath.Path(workdir)
    pca_grid_png(images, patch_pca_image(tokens, (grid, grid), upscale=1), out / "patch_pca.png")
    runs = {config.loss.kind.upper(): out / "metrics.jsonl", "single-label": out / "single_label" / "metrics.jsonl"}
    runs = {name: path for name, path in runs.items() if path.exists()}
    if runs:
        cosine_curves_png(runs, out / "cosine_curves.png")
    print(f"pictures: {out / 'patch_pca.png'}, {out / 'cosine_curves.png'}", flush=True)


@functools.cache
def _eval_split(source: str, split: str, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """One split's (images, labels), read once per process and shared read-only by every caller."""
    from mlcd_jax.data.sources import load_arrays

    arrays = load_arrays(source, split=split, limit=limit or None)
    for array in arrays:
        array.flags.writeable = False
    return arrays


def eval_arrays(config: ml_collections.ConfigDict) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train images, train labels, test images, test labels) of ``config.eval.source``, limits applied.

    Loaded once per process (read-only arrays): a study's runs and baselines all evaluate on them.
    """
    if not config.eval.source:
        raise ConfigError("eval.source is empty: name a labelled source, e.g. fashion_mnist or digits")
    train_x, train_y = _eval_split(config.eval.source, "train", config.eval.train_limit)
    test_x, test_y = _eval_split(config.eval.source, "test", config.eval.test_limit)
    return train_x, train_y, test_x, test_y


def knn_eval_fn(config: ml_collections.ConfigDict):
    """kNN top-1 of a model on ``config.eval.source``, for evaluation during training (arrays loaded once)."""
    from mlcd_jax.evaluate.features import FeatureExtractor
    from mlcd_jax.evaluate.knn import knn_accuracy

    train_x, train_y, test_x, test_y = eval_arrays(config)
    size = config.data.image_size

    def evaluate(model) -> dict[str, float]:
        embed = FeatureExtractor(model, size)  # one compiled forward for both splits
        return {"knn_top1": knn_accuracy(embed(train_x), train_y, embed(test_x), test_y, k=config.eval.knn_k)}

    return evaluate


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Dispatches on ``config.mode``: ``train`` (cluster if needed, train, evaluate) or ``eval``."""
    if config.mode not in ("train", "eval"):
        raise ConfigError(f"mode={config.mode!r}: choose train or eval")
    if config.mode == "train":
        train.checked_mesh(config)  # config mistakes surface before the clustering job runs
    clock = [("start", time.perf_counter())]
    ensure_shards(config)
    clock.append(("clustering", time.perf_counter()))  # seconds when cached
    out: dict[str, Any] = {}
    if config.mode == "train":
        eval_fn = knn_eval_fn(config) if config.eval.source and config.eval_every_steps > 0 else None
        out["train"] = train.train_and_evaluate(config, workdir, eval_fn)
        clock.append(("training", time.perf_counter()))
    if config.eval.source:
        out["eval"] = evaluate_workdir(config, workdir)
        clock.append(("evaluation" + (" and baselines" if config.eval.baselines else ""), time.perf_counter()))
    if jax.process_index() == 0:
        phases = ", ".join(f"{name} {_duration(t - t_prev)}" for (_, t_prev), (name, t) in zip(clock, clock[1:]))
        print(f"done in {_duration(clock[-1][1] - clock[0][1])}: {phases}", flush=True)
    logging.info("done: %s", json.dumps(out, default=float)[:2000])
    return out


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{int(seconds // 60)} min {seconds % 60:02.0f} s"
