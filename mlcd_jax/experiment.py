"""One run of the whole method: shards (clustered on first use) -> training -> evaluation table.

``run(config, workdir)`` is what ``python -m mlcd_jax.main`` calls; it is importable so tests and
notebooks drive the same path.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
from etils import epath
from flax import nnx

from mlcd_jax import identity, objectives, runs, train, workdir_lock
from mlcd_jax.config_lib import ConfigError, eval_batch_size
from mlcd_jax.data.source_base import cache_root
from mlcd_jax.evaluate.evaluators import HELDOUT, Target, build_evaluators, eval_split, evaluate

# The baselines of ``config.eval.baselines`` that need no training, in table order, and their row names.
BASELINE_MODELS = {"pixels": "raw pixels", "teacher": "teacher (clustering)", "random_init": "random-init ViT"}
# The baseline that trains a second model (loss.kind = softmax) in workdir/single_label, and its row name.
SINGLE_LABEL, SINGLE_LABEL_ROW = "single_label", "single-label ViT (UNICOM)"


# Bumped when what a clustering job writes for the same settings changes, so a cache written before is not
# reused (2: records carry captions, for the image-text objectives).
CACHE_VERSION = 2


def cluster_cache_dir(config: ml_collections.ConfigDict) -> str:
    """Where the clustering job's output for ``config.data.cluster`` lives (keyed by its settings)."""
    if config.data.cache_dir:
        return config.data.cache_dir
    settings = config.data.cluster.to_json(sort_keys=True) + f"\nrecords v{CACHE_VERSION}"
    key = hashlib.sha256(settings.encode()).hexdigest()[:16]
    return os.path.join(cache_root(), "clusters", key)


def with_shards(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``config`` with ``data.shards`` filled in by running (or reusing) the clustering job when it is
    empty; a copy, the caller's config is left as it was."""
    if config.data.shards:
        return config
    if not config.data.cluster or not config.data.cluster.get("source"):
        raise ConfigError("nothing to train on: set --config.data.shards=DIR_OR_GLOB (a clustering job's "
                          "ArrayRecord shards, e.g. gs://BUCKET/mlcd_cluster) or --config.data.cluster.source=SPEC "
                          "(images to cluster first); from LAION to shards to a run: launch/README.md, "
                          "\"At scale: LAION to a trained L/14\"")
    if (jax.process_count() > 1 and config.data.cluster.get("teacher", "").startswith("checkpoint:")
            and not epath.Path(cluster_cache_dir(config), "manifest.json").exists()):  # not a finished cache
        raise ConfigError(f"data.cluster.teacher={config.data.cluster.teacher}: a run's checkpoint cannot be read by "
                          "process 0 alone; run `python -m mlcd_jax.cluster` first and set data.shards")
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
    config = copy.deepcopy(config)
    config.data.shards = cluster_config.output_dir
    return config


def single_label_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The same recipe with the single-label softmax loss on the top-1 cluster (the UNICOM baseline)."""
    other = copy.deepcopy(config)
    other.loss.kind = "softmax"
    other.eval.baselines = ""
    return other


def configured_baselines(config: ml_collections.ConfigDict) -> list[str]:
    """``config.eval.baselines`` as a list of names; an unknown name is a ConfigError."""
    baselines = [b for b in config.eval.baselines.split(",") if b]
    unknown = set(baselines) - {*BASELINE_MODELS, SINGLE_LABEL}
    if unknown:
        raise ConfigError(f"eval.baselines has unknown entries {sorted(unknown)}")
    return baselines


def trained_model_name(config: ml_collections.ConfigDict) -> str:
    """The ``model`` of the trained run's row in ``results.json``, e.g. ``MLCD ViT``, ``LiT ViT``,
    ``FLIP ViT`` (CLIP with patch drop): its objective's name for it."""
    return objectives.get(config.loss.kind).row_name(config)


def model_target(
    config: ml_collections.ConfigDict, name: str, model: nnx.Module, workdir: str | None = None,
    text_model: nnx.Module | None = None,
) -> Target:
    """A ViT's pooled features as an evaluation target (with its workdir when it is a trained run, and
    its text tower when it has one)."""
    from mlcd_jax.models.features import FeatureExtractor, TextEncoder

    encode_text = TextEncoder(text_model) if text_model is not None else None
    extractor = FeatureExtractor(model, config.data.image_size, batch_size=eval_batch_size(config))
    return Target(name, extractor, model, workdir, encode_text)


def baseline_row(config: ml_collections.ConfigDict, baseline: str) -> dict[str, Any]:
    """The results row of one of :data:`BASELINE_MODELS`: ``pixels``, ``teacher`` (the embedding that
    clustered ``config.data.shards``) or ``random_init`` (the ViT initialised with ``config.seed``)."""
    from mlcd_jax.cluster import load_teacher
    from mlcd_jax.models.features import pixel_features

    name = BASELINE_MODELS[baseline]
    if baseline == "pixels":
        target = Target(name, pixel_features)
    elif baseline == "teacher":
        target = Target(name, load_teacher(config.data.shards))
    else:
        target = model_target(config, name, runs.build_model(config, config.seed))
    return evaluate(build_evaluators(config), target)


def periodic_evals(config: ml_collections.ConfigDict, workdir: str) -> list[train.PeriodicEval]:
    """The evaluators of ``config.evals`` with ``every > 0`` as the trainer's ``(every, fn)`` pairs; those
    sharing a cadence share one forward pass over the eval images."""
    if not config.eval.source:
        return []
    by_every: dict[int, list] = {}
    for evaluator in build_evaluators(config):
        if evaluator.every > 0:
            by_every.setdefault(evaluator.every, []).append(evaluator)

    def run_all(evaluators: list) -> Callable[[nnx.Module, nnx.Module | None], dict[str, float]]:
        def fn(model: nnx.Module, text_model: nnx.Module | None) -> dict[str, float]:
            target = model_target(config, trained_model_name(config), model, workdir, text_model)
            return {f"{HELDOUT}{k}": v for e in evaluators for k, v in e(target, heldout=True).items()}

        return fn

    return [(every, run_all(evaluators)) for every, evaluators in by_every.items()]


def evaluate_workdir(config: ml_collections.ConfigDict, workdir: str) -> list[dict[str, Any]]:
    """Results rows of the configured evaluators: the baselines that need no training, the trained model
    in ``workdir`` and, when ``eval.baselines`` has it and it was trained, the single-label run in
    ``workdir/single_label``. Writes ``workdir/results.json`` and prints the table."""
    baselines = configured_baselines(config)
    evaluators = build_evaluators(config)
    if any(e.labelled for e in evaluators):
        (_, num_train), (_, num_test) = eval_split(config, "train"), eval_split(config, "test")
        print(f"evaluating on {config.eval.source}: {num_train} train / {num_test} test images", flush=True)
    if "teacher" in baselines and not config.data.shards:
        print("notice: no clustering output (data.shards, or a finished cluster cache): no teacher row", flush=True)
        baselines.remove("teacher")
    rows = [baseline_row(config, b) for b in BASELINE_MODELS if b in baselines]
    trained = runs.load_model(workdir, config)
    text = runs.load_model(workdir, config, text=True) if objectives.get(config.loss.kind).text else None
    rows.append(evaluate(evaluators, model_target(config, trained_model_name(config), trained, workdir, text)))
    single_dir = str(epath.Path(workdir) / SINGLE_LABEL)
    if SINGLE_LABEL in baselines and (epath.Path(single_dir) / "config.json").exists():
        model = runs.load_model(single_dir, single_label_config(config))
        rows.append(evaluate(evaluators, model_target(config, SINGLE_LABEL_ROW, model)))  # no pictures
    return _reported(rows, workdir)


def evaluate_model(config: ml_collections.ConfigDict, spec: str, workdir: str) -> list[dict[str, Any]]:
    """The results row of the configured evaluators for a released model, no training run: ``spec`` is
    ``hf:DIR`` or ``hf-hub:ORG/NAME[@REV]`` (an HF CLIP / MLCD checkpoint, through the hub cache), at
    ``data.image_size`` (0: the checkpoint's own), with its text tower when it has one (a ``CLIPModel``:
    zero-shot and retrieval). Writes ``workdir/results.json`` and prints the table."""
    from mlcd_jax import interop
    from mlcd_jax.interop import hub
    from mlcd_jax.models.features import FeatureExtractor, TextEncoder

    if not config.eval.source:
        raise ConfigError("eval.source is empty: name the labelled images to evaluate on "
                          "(--config=configs/released.py:SOURCE, e.g. fashion_mnist or tfds:imagenet2012)")
    try:
        path = hub.snapshot_dir(spec)
        model = interop.load_vision(path, image_size=config.data.image_size or None)[0]
    except (OSError, ValueError, KeyError) as err:  # not cached offline, no such directory, not a checkpoint
        raise ConfigError(f"--model={spec}: cannot load it ({str(err)[:300]})") from None
    try:
        text = interop.load_text(path)[0]
    except (OSError, ValueError, KeyError):  # a vision-only checkpoint: no zero-shot or retrieval
        text = None
    config = copy.deepcopy(config)
    config.data.image_size = model.config.image_size
    print(f"evaluating {spec} ({model.config.image_size} px, width {model.config.width}, "
          f"{'with' if text is not None else 'without'} a text tower) on {config.eval.source}", flush=True)
    target = Target(spec, FeatureExtractor(model, model.config.image_size, batch_size=eval_batch_size(config)), model,
                    encode_text=TextEncoder(text) if text is not None else None)
    return _reported([evaluate(build_evaluators(config), target)], workdir)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Dispatches on ``config.mode``: ``train`` (cluster if needed, train, evaluate) or ``eval`` (of the run
    in ``workdir`` as its config.json says, see :func:`eval_config`)."""
    if config.mode not in ("train", "eval"):
        raise ConfigError(f"mode={config.mode!r}: choose train or eval")
    if config.mode == "train":
        train.checked_mesh(config)  # config mistakes surface before the clustering job runs
        workdir_lock.check_writable(workdir)
        identity.check_rerun(config, workdir)  # a resume: the run's identity holds
    clock = [("start", time.perf_counter())]
    if config.mode == "train":
        config = with_shards(config)
        clock.append(("clustering", time.perf_counter()))  # seconds when cached
    else:  # evaluation never clusters, and evaluates the run as its config.json says
        config = eval_config(config, workdir)
    out: dict[str, Any] = {}
    if config.mode == "train":
        out["train"] = train.train_and_evaluate(config, workdir, periodic_evals(config, workdir))
        if config.eval.source and SINGLE_LABEL in configured_baselines(config):
            print("training the single-label (UNICOM-style softmax) baseline", flush=True)
            train.train_and_evaluate(single_label_config(config), str(epath.Path(workdir) / SINGLE_LABEL))
        clock.append(("training", time.perf_counter()))
    if config.eval.source:
        out["eval"] = evaluate_workdir(config, workdir)
        clock.append(("evaluation" + (" and baselines" if config.eval.baselines else ""), time.perf_counter()))
    if jax.process_index() == 0:
        phases = ", ".join(f"{name} {_duration(t - t_prev)}" for (_, t_prev), (name, t) in zip(clock, clock[1:]))
        print(f"done in {_duration(clock[-1][1] - clock[0][1])}: {phases}", flush=True)
    logging.info("done: %s", json.dumps(out, default=float)[:2000])
    return out


def eval_config(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
    """The config that evaluates ``workdir``: the run's config.json with the evaluation keys of ``config``
    (a ``--config``, or the run's own); a workdir without a finished checkpoint, a ``config`` that changes the
    run, or no evaluation images are one ConfigError line each."""
    if not identity.has_checkpoints(workdir):
        raise ConfigError(f"--workdir={workdir} holds no checkpoints: nothing to evaluate (train there first)")
    if identity.read(workdir) is None:
        raise ConfigError(f"--workdir={workdir} holds no config.json: not a mlcd_jax training workdir")
    config = identity.eval_config(workdir, config)
    if not config.eval.source:
        raise ConfigError(f"eval.source is empty: the run in {workdir} names no labelled images to evaluate on; "
                          "add --config=<its config file> --config.eval.source=NAME (e.g. digits, fashion_mnist)")
    cache = cluster_cache_dir(config)
    if not config.data.shards and epath.Path(cache, "manifest.json").exists():
        config.data.shards = cache
    return config


def _reported(rows: list[dict[str, Any]], workdir: str) -> list[dict[str, Any]]:
    """``rows``, written to ``workdir/results.json`` and printed as a table (by process 0)."""
    from mlcd_jax.evaluate.report import results_table, write_results

    if jax.process_index() == 0:
        write_results(rows, epath.Path(workdir) / "results.json")
        columns = ["model"] + list(dict.fromkeys(k for r in rows for k in r if k != "model"))
        print(results_table(rows, columns), flush=True)
    return rows


def _duration(seconds: float) -> str:
    whole = round(seconds)
    return f"{whole} s" if whole < 90 else f"{whole // 60} min {whole % 60:02d} s"
