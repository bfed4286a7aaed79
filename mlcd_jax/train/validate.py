"""Config errors in one line before anything compiles: the mesh, the model, the objective's settings."""

from __future__ import annotations

import logging

import jax
import ml_collections
from jax.sharding import Mesh

from mlcd_jax import sharding
from mlcd_jax.config_lib import ConfigError
from mlcd_jax.losses.partial_fc import SAMPLING_MODES, ratio_ignored_warning
from mlcd_jax.objectives import OBJECTIVES, objective
from mlcd_jax.runs import DTYPES, check_tower_spec, sharding_rules, text_config, vit_config


def checked_mesh(config: ml_collections.ConfigDict) -> Mesh:
    """The run's mesh, after :func:`validate`: what a run calls before any expensive stage (clustering)."""
    try:
        mesh = sharding.make_mesh(dict(config.mesh))
    except ValueError as err:
        raise ConfigError(f"mesh: {err}") from None
    validate(config, mesh)
    return mesh


def validate(config: ml_collections.ConfigDict, mesh: Mesh) -> None:
    """Config errors reported in one line before anything compiles."""
    if config.model.dtype not in DTYPES:
        raise ConfigError(f"model.dtype={config.model.dtype!r}: choose one of {', '.join(DTYPES)}")
    for key in ("learning_rate", "batch_size"):
        if not config[key] > 0:
            raise ConfigError(f"{key}={config[key]} must be positive")
    if config.keep_checkpoints < 1:  # 0 deleted every checkpoint, the final one included
        raise ConfigError(f"keep_checkpoints={config.keep_checkpoints} must be >= 1 (how many of the newest "
                          "checkpoints are kept; the final one is among them)")
    if config.weight_decay < 0:
        raise ConfigError(f"weight_decay={config.weight_decay} must be >= 0")
    try:
        rules = sharding_rules(config)
    except ValueError as err:
        raise ConfigError(f"mesh_rules: {err}") from None
    dp = sharding.data_parallel_size(mesh, rules)
    if config.batch_size % dp:
        raise ConfigError(
            f"batch_size={config.batch_size} is not divisible by the {dp} data-parallel devices "
            f"(mesh {dict(mesh.shape)}); use a multiple of {dp}"
        )
    if config.batch_size % jax.process_count():
        raise ConfigError(f"batch_size={config.batch_size} must split over {jax.process_count()} processes")
    try:
        vit_config(config)  # the preset, its overrides and data.image_size: a patch-size mismatch raises
    except (KeyError, TypeError, ValueError) as err:
        raise ConfigError(f"model {config.model.name!r} with data.image_size={config.data.image_size}: {err}") from None
    if config.loss.kind not in OBJECTIVES:
        raise ConfigError(f"loss.kind={config.loss.kind!r}: choose one of {', '.join(OBJECTIVES)}")
    goal = objective(config.loss.kind)
    if not 0.0 <= float(config.data.get("patch_drop", 0.0)) < 1.0:
        raise ConfigError(f"data.patch_drop={config.data.patch_drop} must be in [0, 1)")
    if goal.text:
        _validate_text(config)
    if goal.episodes:
        _validate_episodes(config)
    if not goal.clusters:
        return
    if not 0 < config.loss.sample_ratio <= 1:
        raise ConfigError(f"loss.sample_ratio={config.loss.sample_ratio} must be in (0, 1]")
    sampling = config.loss.get("sampling", "paper")
    if sampling not in SAMPLING_MODES:
        raise ConfigError(f"loss.sampling={sampling!r}: choose one of {', '.join(SAMPLING_MODES)}")
    labels_per_sample = 1 if config.loss.kind == "softmax" else config.loss.top_l
    warning = ratio_ignored_warning(
        config.loss.num_classes, config.loss.sample_ratio, config.batch_size * labels_per_sample, sampling
    )
    if warning:
        logging.warning(warning)


def _validate_episodes(config: ml_collections.ConfigDict) -> None:
    """ProtoCLIP's episode sizes (whole batches, enough pairs to cluster) and teacher."""
    p = config.protoclip
    if p.episode_size <= 0 or p.episode_size % config.batch_size:
        raise ConfigError(f"protoclip.episode_size={p.episode_size} must be a positive multiple of "
                          f"batch_size={config.batch_size}")
    if not 0 < p.num_clusters <= p.episode_size:
        raise ConfigError(f"protoclip.num_clusters={p.num_clusters} must be in [1, episode_size={p.episode_size}]")
    if p.external not in ("", "tfidf"):
        raise ConfigError(f"protoclip.external={p.external!r}: use tfidf or '' (none)")
    if jax.process_count() > 1:
        raise ConfigError("loss.kind=protoclip runs in one process (its episode pass reads the whole episode)")


def _validate_text(config: ml_collections.ConfigDict) -> None:
    """The text tower's preset and its embedding width (it must equal the image tower's)."""
    try:
        text_cfg = text_config(config)
    except (KeyError, TypeError, ValueError) as err:
        raise ConfigError(f"text {config.text.name!r}: {err}") from None
    image_dim = vit_config(config).embed_dim
    if text_cfg.embed_dim != image_dim:
        raise ConfigError(
            f"text.overrides.proj_dim={text_cfg.proj_dim} but the image tower embeds into {image_dim}: "
            "the contrastive loss compares them, make them equal"
        )
    for key in ("image_tower", "text_tower"):
        spec = config.loss.get(key, "")
        if spec:
            check_tower_spec(spec, key)
