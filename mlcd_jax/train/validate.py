"""Config errors in one line before anything compiles: the mesh, the model, the objective's settings."""

from __future__ import annotations

import logging

import jax
import ml_collections
from jax.sharding import Mesh

from mlcd_jax import objectives, sharding
from mlcd_jax.config_lib import ConfigError, eval_batch_size
from mlcd_jax.data.augment import BLUR_TAPS
from mlcd_jax.runs import check_dtype, sharding_rules, vit_config
from mlcd_jax.train.optimizer import PROTO_UPDATES


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
    check_dtype("model.dtype", config.model.dtype, optional=False)
    for key in ("learning_rate", "batch_size"):
        if not config[key] > 0:
            raise ConfigError(f"{key}={config[key]} must be positive")
    eval_batch_size(config)  # raises for a value below 1
    if config.data.get("light_augment") and not config.data.augment:
        raise ConfigError("data.light_augment adds to the training augmentation: it needs data.augment=True")
    if config.data.get("light_augment") and config.data.image_size <= BLUR_TAPS // 2:
        raise ConfigError(f"data.light_augment blurs with {BLUR_TAPS} taps: data.image_size must exceed "
                          f"{BLUR_TAPS // 2} (got {config.data.image_size})")
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
    if config.mesh.get("fsdp", 1) != 1 and mesh.shape.get("fsdp", 1) > 1 and not config.model.get("scan_layers"):
        logging.warning("mesh.fsdp=%d without model.scan_layers: XLA:TPU keeps more of the unrolled blocks' "
                        "gathered weights alive (L/14 on v5p-64: 6.6 GiB against data parallelism's 1.5 GiB "
                        "per chip); set model.scan_layers=True", mesh.shape["fsdp"])
    check_dtype("mu_dtype", config.get("mu_dtype", ""))
    goal = objectives.get(config.loss.kind)  # an unknown kind: ConfigError
    if not 0.0 <= float(config.data.get("patch_drop", 0.0)) < 1.0:
        raise ConfigError(f"data.patch_drop={config.data.patch_drop} must be in [0, 1)")
    check_patch_drop_phase(config, config.num_train_steps if config.num_train_steps > 0 else None)
    check_proto_update(config, goal)
    goal.validate(config)


def check_proto_update(config: ml_collections.ConfigDict, goal: type[objectives.Objective]) -> None:
    """One-line :class:`ConfigError` unless ``loss.proto_update`` is known and, when ``lazy``, has sampled
    rows to update (a prototype head) and one step per update (no gradient accumulation)."""
    update = config.loss.get("proto_update", "dense")
    if update not in PROTO_UPDATES:
        raise ConfigError(f"loss.proto_update={update!r}: choose one of {', '.join(PROTO_UPDATES)}")
    if update == "lazy" and not goal.sampled:
        raise ConfigError(f"loss.proto_update=lazy updates the prototype rows a step samples: loss.kind="
                          f"{config.loss.kind!r} samples none (use mlcd, mlc or softmax)")
    if update == "lazy" and config.get("grad_accum_steps", 1) > 1:
        raise ConfigError(f"loss.proto_update=lazy updates the rows each step samples: it cannot accumulate "
                          f"gradients over grad_accum_steps={config.grad_accum_steps} steps")


def check_patch_drop_phase(config: ml_collections.ConfigDict, total_steps: int | None) -> None:
    """One-line :class:`ConfigError` unless ``data.patch_drop_until_step`` is 0 or a step before the last
    of ``total_steps`` (None: not known yet, from num_epochs) with ``data.patch_drop`` > 0."""
    until = int(config.data.get("patch_drop_until_step", 0))
    if until and not (float(config.data.get("patch_drop", 0.0)) > 0 and until > 0
                      and (total_steps is None or until < total_steps)):
        raise ConfigError(f"data.patch_drop_until_step={until} needs data.patch_drop > 0 and a step in "
                          f"(0, {total_steps or 'the run'}'s last step), after which FLIP's unmasked tuning runs")
