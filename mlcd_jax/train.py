"""The training loop: sharded state, one jitted step, checkpoints, metrics. No model or loss details here.

State (a plain pytree, checkpointed whole): ``step``, ``rng`` (raw key data), ``params`` (the ViT's NNX
parameters as a pure dict), ``proto`` (the [k_pad, d] prototype matrix, rows split over the ``proto`` rule's mesh axes)
and ``opt_state``. The state is created directly sharded (``jax.jit(init, out_shardings=...)`` on
shardings derived from the abstract state), never as a full copy on one device.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from clu import parameter_overview
from etils import epath
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mlcd_jax import checkpointing, fileio, metrics as metrics_lib, periodic, sharding
from mlcd_jax.objectives import OBJECTIVES, Objective, objective
from mlcd_jax.config_lib import ConfigError, ResumeMismatch
from mlcd_jax.losses import l2_normalize, pad_num_classes, partial_fc_loss
from mlcd_jax.losses.contrastive import INIT_LOG_SCALE, contrastive_loss
from mlcd_jax.losses.protoclip import EpisodePrototypes, cluster_features, episode_prototypes, protoclip_loss
from mlcd_jax.losses.partial_fc import SAMPLING_MODES, ratio_ignored_warning
from mlcd_jax.models import VisionTransformer
from mlcd_jax.runs import (
    DTYPES, TOWER_PREFIXES, AbstractModel, ProtoHeads, build_model, build_text_model, flops_per_example, load_tower,
    sharding_rules, text_config, vit_config,
)


# ------------------------------------------------------------------------------------------ optimizer


# Leaf names (the last key of a parameter's path) that weight decay skips: biases (incl. the fused
# ``qkv_bias``), LayerNorm scales, class token and position tables. Matrix weights end in ``kernel``.
_NO_DECAY_SUFFIXES = ("bias", "scale", "embedding", "pos_embed", "pos_emb")


def weight_decay_mask(params: Any) -> Any:
    """True for the backbone leaves AdamW decays: matrix weights (names ending in ``kernel``), nothing else.

    Decided from the parameter's name, not its rank, so it holds for 3-D ``qkv_bias`` and for the
    ``layers``-stacked leaves of ``scan_layers``. A leaf with neither kind of name raises, so a new
    parameter cannot silently get the wrong role.
    """

    def decays(path: tuple[Any, ...], _) -> bool:
        name = str(getattr(path[-1], "key", path[-1]))
        if name.endswith("kernel"):
            return True
        if name.endswith(_NO_DECAY_SUFFIXES):
            return False
        raise ValueError(
            f"parameter {jax.tree_util.keystr(path)} has no weight-decay role: name matrix weights "
            f"'*kernel' or add its suffix to train._NO_DECAY_SUFFIXES"
        )

    return jax.tree_util.tree_map_with_path(decays, params)


# The optimizer group of each trainable state key: both towers are "backbone".
_GROUPS = {"params": "backbone", "text": "backbone", "heads": "backbone", "proto": "proto", "logit_scale": "scale",
           "logit_scale_proto": "scale"}


def make_optimizer(config: ml_collections.ConfigDict, num_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW on the objective's trainable state keys (:mod:`mlcd_jax.objectives`) in groups: the towers
    (``params``, ``text``), the prototypes (``proto``) and the temperature (``logit_scale``, no weight
    decay); warm-up + cosine schedule.

    Backbone: gradients clipped by their own global norm (``grad_clip``), weight decay on matrix weights
    only (:func:`weight_decay_mask`). Prototypes: learning rate x ``loss.proto_lr_mult``, weight decay
    ``loss.proto_weight_decay`` (None = ``weight_decay``), not clipped (as PartialFC, which clips only
    the backbone), so one step's head gradient never shrinks the backbone's update.

    With ``grad_accum_steps = a`` the optimizer updates every ``a`` of the ``num_steps`` train steps: the
    schedule counts updates (``num_steps // a`` of them, ``warmup_steps // a`` of warm-up, both given in
    train steps). The returned schedule maps a train step to the backbone learning rate of the update its
    gradient goes into (what the train step logs as ``lr``).
    """
    accum = max(int(config.get("grad_accum_steps", 1)), 1)
    num_updates = max(num_steps // accum, 1)
    warmup = min(config.warmup_steps // accum, num_updates - 1)
    update_schedule = optax.warmup_cosine_decay_schedule(
        0.0, config.learning_rate, warmup, max(num_updates, warmup + 1), end_value=0.0
    )
    loss_cfg = config.loss
    proto_lr_mult = float(loss_cfg.get("proto_lr_mult", 1.0))
    proto_wd = loss_cfg.get("proto_weight_decay")

    def adamw(
        learning_rate: optax.Schedule, weight_decay: float, mask: Any = None
    ) -> optax.GradientTransformation:
        return optax.adamw(
            learning_rate, b1=config.get("b1", 0.9), b2=config.get("b2", 0.98), eps=config.get("eps", 1e-6),
            weight_decay=weight_decay, mask=mask,
        )

    backbone = optax.chain(
        optax.clip_by_global_norm(config.grad_clip) if config.grad_clip > 0 else optax.identity(),
        adamw(update_schedule, config.weight_decay, weight_decay_mask),
    )
    proto = adamw(
        lambda count: proto_lr_mult * update_schedule(count),
        config.weight_decay if proto_wd is None else float(proto_wd),
    )
    # The temperature of the contrastive objectives: same schedule, no weight decay, not clipped.
    scale = adamw(update_schedule, 0.0)
    tx = optax.multi_transform(
        {"backbone": backbone, "proto": proto, "scale": scale},
        param_labels={key: _GROUPS[key] for key in objective(loss_cfg.kind).trainable},
    )
    if accum > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=accum)
    return tx, lambda step: update_schedule(step // accum)


# -------------------------------------------------------------------------------------------- state


@dataclasses.dataclass
class TrainSetup:
    """Everything derived from the config and the mesh before any array exists."""

    config: ml_collections.ConfigDict
    mesh: Mesh
    rules: sharding.Rules  # logical axis -> mesh axes, config.mesh_rules applied
    objective: Objective  # what loss.kind trains (mlcd_jax.objectives)
    proto_axes: tuple[str, ...]  # mesh axes the prototype rows are split over (the "proto" rule)
    model: AbstractModel
    text_model: AbstractModel | None  # the text tower of the image-text objectives
    heads: AbstractModel | None  # ProtoCLIP's projection heads
    abstract_state: Any  # pytree of ShapeDtypeStruct with shardings
    state_shardings: Any
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    num_classes: int  # k, the clusters (config.loss.num_classes); 0 without prototypes
    k_pad: int  # prototype rows, padded to a multiple of the prototype shards
    embed_dim: int
    flops_per_step: float
    init_fn: Callable[[int], dict[str, Any]]  # seed -> state (unsharded; see init_state)

    @classmethod
    def create(cls, config: ml_collections.ConfigDict, mesh: Mesh, num_train_steps: int) -> "TrainSetup":
        goal = objective(config.loss.kind)
        model_cfg = vit_config(config)
        model = AbstractModel.create(config, mesh)
        text_model = AbstractModel.create(config, mesh, text=True) if goal.text else None
        rules = sharding_rules(config)
        heads = AbstractModel.of(lambda: ProtoHeads(config, nnx.Rngs(0)), mesh, rules) if goal.episodes else None
        proto_axes = sharding.proto_axes(mesh, rules)
        num_classes = k_pad = 0
        if goal.clusters:
            shards = math.prod(mesh.shape[a] for a in proto_axes)
            num_classes = int(config.loss.num_classes)
            k_pad = pad_num_classes(num_classes, shards)
            if k_pad != num_classes:
                logging.info("prototype rows padded %d -> %d for %d shards (padding masked)",
                             num_classes, k_pad, shards)
        tx, schedule = make_optimizer(config, num_train_steps)
        replicated = NamedSharding(mesh, P())

        def init(seed: jax.Array) -> dict[str, Any]:
            model_key, proto_key, text_key, rng = jax.random.split(jax.random.key(seed), 4)
            state = {"params": nnx.state(build_model(config, model_key)).to_pure_dict()}
            if goal.clusters:
                state["proto"] = l2_normalize(jax.random.normal(proto_key, (k_pad, model_cfg.embed_dim), jnp.float32))
            if goal.text:
                state["text"] = nnx.state(build_text_model(config, text_key)).to_pure_dict()
                state["logit_scale"] = jnp.asarray(config.loss.get("init_logit_scale", INIT_LOG_SCALE), jnp.float32)
            if goal.episodes:
                state["heads"] = nnx.state(ProtoHeads(config, nnx.Rngs(proto_key))).to_pure_dict()
                state["logit_scale_proto"] = jnp.asarray(INIT_LOG_SCALE, jnp.float32)
                state["episode"] = empty_episode(config)
            trainable = {k: state[k] for k in goal.trainable}
            return {
                "step": jnp.zeros((), jnp.int32),
                "rng": jax.random.key_data(rng),
                **state,
                "opt_state": tx.init(trainable),
            }

        abstract_plain = jax.eval_shape(init, 0)
        key_shardings = {
            "params": model.shardings,
            "proto": NamedSharding(mesh, P(proto_axes or None, None)),
            "text": text_model.shardings if text_model else None,
            "logit_scale": replicated,
            "heads": heads.shardings if heads else None,
            "logit_scale_proto": replicated,
            "episode": jax.tree.map(lambda _: replicated, abstract_plain.get("episode")),
        }
        key_shardings = {k: key_shardings[k] for k in goal.state_keys}
        trainable_shardings = {k: key_shardings[k] for k in goal.trainable}

        def masked(x: Any) -> bool:  # each group's state holds the other group's leaves as MaskedNode
            return isinstance(x, optax.MaskedNode)

        opt_shardings = optax.tree_utils.tree_map_params(
            tx, lambda x, s: x if masked(x) else s, abstract_plain["opt_state"], trainable_shardings,
            transform_non_params=lambda _: replicated, is_leaf=masked,
        )
        shardings = {"step": replicated, "rng": replicated, **key_shardings, "opt_state": opt_shardings}
        abstract_state = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_plain, shardings
        )
        return cls(
            config=config, mesh=mesh, rules=rules, objective=goal, proto_axes=proto_axes, model=model,
            text_model=text_model, heads=heads, abstract_state=abstract_state, state_shardings=shardings, tx=tx,
            schedule=schedule, num_classes=num_classes, k_pad=k_pad, embed_dim=model_cfg.embed_dim,
            flops_per_step=config.batch_size * flops_per_example(config), init_fn=init,
        )

    def init_state(self, seed: int) -> Any:
        """The initial state, created directly in its shardings; LiT's locked image tower is read from
        ``loss.image_tower``, a text tower to start from from ``loss.text_tower``."""
        state = jax.jit(self.init_fn, out_shardings=self.state_shardings)(seed)
        loss = self.config.loss
        towers = [("params", "image_tower", False)] if "params" in self.objective.frozen else []
        towers += [("text", "text_tower", True)] if self.objective.text else []  # e.g. ProtoCLIP's final LiT phase
        for key, option, text in towers:
            if loss.get(option):
                params = nnx.state(load_tower(loss[option], self.config, text=text)).to_pure_dict()
                if jax.tree.structure(params) != jax.tree.structure(self.state_shardings[key]):
                    raise ConfigError(f"loss.{option}={loss[option]}: its layers are stored otherwise than this run's "
                                      "(model.scan_layers differs); set model.scan_layers to the tower's")
                state[key] = jax.device_put(params, self.state_shardings[key])
        return state

    def merge(self, params: Any) -> VisionTransformer:
        """A model object from pure-dict parameters (inside or outside jit)."""
        return self.model.merge(params)


def make_train_step(
    setup: TrainSetup, preprocess: Callable[[dict[str, jax.Array]], dict[str, jax.Array]] | None = None
) -> Callable[[Any, dict[str, jax.Array]], tuple[Any, dict[str, jax.Array]]]:
    """The pure train step ``(state, batch) -> (state, metrics)``, jitted with explicit shardings.

    ``batch`` is ``dict(image=float32 [B, S, S, C], labels=int32 [B, l])`` (cluster objectives) or
    ``dict(image=..., tokens=int32 [B, context])`` (image-text objectives), or whatever ``preprocess``
    (run first, inside the same program) turns into that: the trainer passes the data loader's
    on-device augmentation, so its canvases are cropped and flipped by the step itself.
    """
    config, mesh = setup.config, setup.mesh
    loss_cfg = config.loss
    compute_dtype = DTYPES[config.model.dtype]
    axes = sharding.batch_axes(mesh, setup.rules)
    histograms = bool(loss_cfg.get("histograms", True))
    patch_drop = float(config.data.get("patch_drop", 0.0))  # FLIP: drop this fraction of the patch tokens

    goal = setup.objective

    def step_fn(state: dict[str, Any], batch: dict[str, jax.Array]):
        if preprocess is not None:
            batch = preprocess(batch)
        rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
        sample_key, dropout_key, drop_key = jax.random.split(rng, 3)

        def loss_fn(trainable):
            tensors = {**{k: state[k] for k in goal.frozen}, **trainable}
            model = setup.merge(tensors["params"])
            # The models pin their activations on the mesh, through the run's rules.
            with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), sharding.use_rules(setup.rules):
                pooled, _ = model(
                    batch["image"].astype(compute_dtype), deterministic="params" in goal.frozen,
                    rngs=nnx.Rngs(dropout=dropout_key, patch_drop=drop_key), patch_drop=patch_drop,
                )
                if goal.text:
                    text = setup.text_model.merge(tensors["text"])(batch["tokens"])
            if goal.episodes:
                return _protoclip_loss(setup, tensors, pooled, text, batch["episode_pos"])
            if goal.text:
                return contrastive_loss(pooled, text, tensors["logit_scale"])
            return partial_fc_loss(
                pooled, tensors["proto"], batch["labels"], sample_key, mesh=mesh,
                sample_ratio=loss_cfg.sample_ratio, sampling=loss_cfg.get("sampling", "paper"),
                kind=loss_cfg.kind, scale=loss_cfg.scale,
                margin=loss_cfg.margin, margin_type=loss_cfg.get("margin_type") or None,
                num_classes=setup.num_classes, batch_axes=axes, proto_axes=setup.proto_axes,
                max_rows=loss_cfg.get("max_rows") or None, return_metrics=True, histograms=histograms,
            )

        trainable = {k: state[k] for k in goal.trainable}
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
        updates, opt_state = setup.tx.update(grads, state["opt_state"], trainable)
        trainable = optax.apply_updates(trainable, updates)
        new_state = {**state, **trainable, "opt_state": opt_state, "step": state["step"] + 1}
        metrics = {
            **metrics,
            "loss": loss,
            "grad_norm": optax.global_norm(grads),
            "lr": setup.schedule(state["step"]),
        }
        return new_state, metrics

    batch_sharding = sharding.batch_sharding(mesh, setup.rules)
    return jax.jit(
        step_fn,
        in_shardings=(setup.state_shardings, batch_sharding),  # every batch array: split over the batch axes
        out_shardings=(setup.state_shardings, NamedSharding(mesh, P())),
        donate_argnums=(0,),
    )


# ----------------------------------------------------------------------------------------- protoclip


# The episode state's per-cluster arrays, as EpisodePrototypes names them (the external ones only with a teacher).
_EPISODE_PROTOS = ("image_prototypes", "image_mask", "text_prototypes", "text_mask", "text_centroids",
                   "image_centroids")
_EPISODE_EXTERNAL = ("image_ext_prototypes", "image_ext_mask", "text_ext_prototypes", "text_ext_mask")


def empty_episode(config: ml_collections.ConfigDict) -> dict[str, jax.Array]:
    """ProtoCLIP's episode state before the first episode is built (``index`` -1: prototype losses off)."""
    p = config.protoclip
    k, d, n = p.num_clusters, p.head_dim, p.episode_size
    zeros = {"prototypes": jnp.zeros((k, d), jnp.float32), "mask": jnp.zeros((k,), bool),
             "centroids": jnp.zeros((k, d), jnp.float32)}
    names = _EPISODE_PROTOS + (_EPISODE_EXTERNAL if p.external else ())
    episode = {name: zeros[name.rsplit("_", 1)[1]] for name in names}
    labels = ("image_labels", "text_labels") + (("external_labels",) if p.external else ())
    return {"index": jnp.asarray(-1, jnp.int32), **{name: jnp.zeros((n,), jnp.int32) for name in labels}, **episode}


def _protoclip_loss(
    setup: TrainSetup, tensors: dict[str, Any], image: jax.Array, text: jax.Array, episode_pos: jax.Array
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """ProtoCLIP's loss for a batch: InfoNCE, plus the prototype terms once an episode is built."""
    p = setup.config.protoclip
    heads, ep = setup.heads.merge(tensors["heads"]), tensors["episode"]
    external = bool(p.external)
    protos = EpisodePrototypes(*(ep[name] for name in _EPISODE_PROTOS),
                               *((ep[name] for name in _EPISODE_EXTERNAL) if external else ()))
    loss, metrics = protoclip_loss(
        image, text, tensors["logit_scale"], heads.image(image), heads.text(text), tensors["logit_scale_proto"],
        protos, ep["image_labels"][episode_pos], ep["text_labels"][episode_pos],
        ep["external_labels"][episode_pos] if external else None,
        w_proto=p.w_proto, w_ext=p.w_external if external else 0.0, temperature=p.temperature,
    )
    active = (ep["index"] >= 0).astype(jnp.float32)  # the first episode trains InfoNCE only
    loss = metrics["loss_clip"] + active * (loss - metrics["loss_clip"])
    return loss, {**metrics, "loss": loss}


def make_episode_features(setup: TrainSetup) -> Callable[[Any, dict[str, jax.Array]], tuple[jax.Array, jax.Array]]:
    """The jitted feature pass of an episode: ``(state, canvas batch) -> (image, text)`` L2-normalised
    head outputs [B, head_dim], eval-time preprocessing (centre, no flip), no dropout."""
    from mlcd_jax.data.pipeline import canvas_to_inputs

    config, mesh = setup.config, setup.mesh
    compute_dtype = DTYPES[config.model.dtype]

    def features(state: dict[str, Any], batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        inputs = canvas_to_inputs({**batch, "seed": jnp.zeros((batch["image"].shape[0], 2), jnp.uint32)},
                                  image_size=config.data.image_size, augment=False)
        heads = setup.heads.merge(state["heads"])
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), sharding.use_rules(setup.rules):
            image, _ = setup.merge(state["params"])(inputs["image"].astype(compute_dtype))
            text = setup.text_model.merge(state["text"])(batch["tokens"])
        return l2_normalize(heads.image(image)), l2_normalize(heads.text(text))

    return jax.jit(features)


def build_episode(
    setup: TrainSetup, state: dict[str, Any], loader: Any, index: int, external: np.ndarray | None,
    features_fn: Callable[[Any, dict[str, jax.Array]], tuple[jax.Array, jax.Array]],
) -> dict[str, jax.Array]:
    """Episode ``index``'s state: its pairs' head features under the current weights, k-means of each
    modality (and of the external teacher's features), and the back-translated prototypes. A function of
    the state and the episode number, so a resumed run rebuilds the same episode."""
    p, b = setup.config.protoclip, setup.config.batch_size
    rows = loader.decoded.episode_rows(index)
    image_f, text_f = [], []
    for start in range(0, len(rows), b):  # one batch of the episode's records gathered at a time
        chunk = loader.decoded.gather(rows[start:start + b])
        fi, ft = features_fn(state, sharding.host_to_global(chunk, setup.mesh, setup.rules))
        image_f.append(np.asarray(fi))
        text_f.append(np.asarray(ft))
    image_f, text_f = np.concatenate(image_f), np.concatenate(text_f)
    seed = (setup.config.seed * 1_000_003 + index) % 2**30  # faiss takes a C int (restarts add to it)

    def kmeans(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return cluster_features(x.astype(np.float32), p.num_clusters, iterations=p.kmeans_iterations,
                                nredo=p.kmeans_nredo, seed=seed)

    (image_c, image_l), (text_c, text_l) = kmeans(image_f), kmeans(text_f)
    external_l = kmeans(external[rows])[1] if external is not None else None
    protos = episode_prototypes(image_f, text_f, image_l, text_l, image_c, text_c, p.num_clusters,
                                external_l, p.num_clusters if external is not None else None)
    episode = {"index": np.int32(index), "image_labels": image_l, "text_labels": text_l,
               **({"external_labels": external_l} if external is not None else {}),
               **{name: value for name, value in protos._asdict().items() if value is not None}}
    return jax.device_put(jax.tree.map(jnp.asarray, episode), setup.state_shardings["episode"])


# --------------------------------------------------------------------------------------------- loop


class _Preemption:
    """Whether to checkpoint and stop now: SIGTERM or SIGINT on one process, or agreed preemption on many.

    With several processes, every process must stop at the same step, so the decision comes from
    JAX's preemption sync point (through orbax), which the coordination service sets on SIGTERM; there
    SIGINT keeps Python's default (KeyboardInterrupt, no checkpoint). On one process a second Ctrl-C
    aborts at once, without the checkpoint.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, manager: Any) -> None:
        self._manager = manager
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}
        if jax.process_count() == 1:
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def _handle(self, signum, frame) -> None:
        del frame
        if self.signal_name == "SIGINT" and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name
        hint = " (Ctrl-C again aborts without one)" if signum == signal.SIGINT else ""
        print(f"{self.signal_name}: checkpointing and stopping after this step{hint}", file=sys.stderr, flush=True)

    def requested(self, step: int) -> bool:
        if jax.process_count() == 1:
            return self.signal_name is not None
        if self._manager.reached_preemption(step):
            self.signal_name = "SIGTERM"
            return True
        return False

    def restore(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)


class Preempted(RuntimeError):
    """Training stopped on SIGTERM / SIGINT with a checkpoint of ``step``; the run's evaluation and
    baselines are skipped. Entry points exit with :data:`PREEMPTED_EXIT_CODE`; re-running resumes."""

    def __init__(self, step: int, signal_name: str) -> None:
        super().__init__(f"{signal_name}: checkpoint of step {step} written; evaluation skipped; "
                         f"re-run the same command to resume")
        self.step, self.signal_name = step, signal_name


PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: schedulers (SLURM --requeue, Kubernetes, systemd) retry


class TrainingDiverged(RuntimeError):
    """The loss became NaN/Inf; the last good checkpoint is kept."""


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
        if spec and not spec.startswith(TOWER_PREFIXES):
            raise ConfigError(f"loss.{key}={spec!r}: use workdir:DIR, hf:DIR, or '' (random init)")


def _dataset_info(config: ml_collections.ConfigDict) -> tuple[list[str], dict[str, Any]]:
    """Shard paths and the clustering manifest for ``config.data.shards`` (a job's output dir or a glob)."""
    from mlcd_jax.data.pipeline import resolve_shards

    try:
        return resolve_shards(config.data.shards)
    except FileNotFoundError as err:
        raise ConfigError(f"data.shards: {err}") from None


def num_train_steps(config: ml_collections.ConfigDict, num_examples: int) -> int:
    """``num_train_steps`` if positive, else ``num_epochs`` over the dataset (rounded up)."""
    if config.num_train_steps > 0:
        return int(config.num_train_steps)
    return int(math.ceil(config.num_epochs * num_examples / config.batch_size))


def _log_step(
    config: ml_collections.ConfigDict, setup: TrainSetup, writer: Any, step: int, total_steps: int,
    metrics: dict[str, Any], timing: dict[str, float], peak: float | None,
) -> dict[str, Any]:
    """Writes one step's metrics (and throughput of the window) and prints its line; returns the scalars."""
    step_time = timing["step_time_s"]
    scalars = {k: v for k, v in metrics.items() if np.ndim(v) == 0}
    scalars.update(timing, images_per_s=config.batch_size / step_time,
                   flops_per_s=setup.flops_per_step / step_time)
    if peak:
        scalars["mfu"] = setup.flops_per_step / step_time / (peak * jax.device_count())
    writer.write_scalars(step, {**scalars, **{k: v for k, v in metrics.items() if np.ndim(v)}})
    terms = (f"pos {scalars['loss_pos']:.3f} neg {scalars['loss_neg']:.3f}" if "loss_pos" in scalars
             else f"i2t {scalars['loss_i2t']:.3f} t2i {scalars['loss_t2i']:.3f}, scale {scalars['logit_scale']:.1f}")
    if "loss_proto" in scalars:
        terms += f", proto {scalars['loss_proto']:.3f} ext {scalars['loss_ext']:.3f}"
    print(
        f"step {step}/{total_steps} loss {scalars['loss']:.4f} ({terms}) cos+ {scalars['mean_pos_cos']:.3f} cos- "
        f"{scalars['mean_neg_cos']:.3f} lr {scalars['lr']:.2e} | "
        f"{scalars['images_per_s']:.1f} img/s, data wait {100 * scalars['data_wait_frac']:.0f}%"
        + (f", MFU {100 * scalars['mfu']:.1f}%" if peak else f", {scalars['flops_per_s'] / 1e9:.1f} GFLOP/s"),
        flush=True,
    )
    return scalars


# (every, fn(image tower, text tower or None) -> scalars)
PeriodicEval = tuple[int, Callable[[VisionTransformer, nnx.Module | None], dict[str, float]]]


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    evals: Sequence[PeriodicEval] = (),
) -> dict[str, Any]:
    """Trains (resuming from ``workdir`` when it holds a checkpoint) and returns the last logged metrics.

    ``evals``: ``(every, fn)`` pairs; ``fn(image_model, text_model) -> scalars`` runs every ``every`` steps and its results
    are logged with the training metrics (the caller builds them from ``config.evals``).
    """
    from mlcd_jax.data.pipeline import make_train_loader

    fileio.makedirs(workdir)
    mesh = checked_mesh(config)
    shards, manifest = _dataset_info(config)
    goal = objective(config.loss.kind)
    if goal.clusters and manifest and manifest.get("top_l") and manifest["top_l"] < config.loss.top_l:
        raise ConfigError(
            f"loss.top_l={config.loss.top_l} but the shards carry only l={manifest['top_l']} "
            "(a smaller loss.top_l uses each image's best labels)"
        )
    if goal.clusters and manifest and manifest.get("num_clusters") and manifest["num_clusters"] != config.loss.num_classes:
        raise ConfigError(
            f"loss.num_classes={config.loss.num_classes} but the shards were clustered into "
            f"k={manifest['num_clusters']}"
        )
    total_steps = num_train_steps(config, int(manifest.get("num_images", 0)) if manifest else 0)
    if total_steps <= 0:
        raise ConfigError("set num_train_steps > 0, or num_epochs with shards that have a manifest")
    setup = TrainSetup.create(config, mesh, total_steps)
    if jax.process_index() == 0:
        head = (f"prototypes {setup.k_pad} x {setup.embed_dim}" if goal.clusters
                else f"text tower {config.text.name}, context {config.text.context_length}")
        print(f"training {config.model.name} with {config.loss.kind} on mesh {dict(mesh.shape)} "
              f"({jax.process_count()} process(es), {jax.device_count()} {jax.devices()[0].platform} devices): "
              f"{total_steps} steps of {config.batch_size}, {head}",
              flush=True)
    try:
        loader = make_train_loader(
            shards, global_batch_size=config.batch_size, image_size=config.data.image_size,
            top_l=config.loss.top_l, seed=config.seed, augment=config.data.augment,
            num_workers=config.data.num_workers, crop_scale=tuple(config.data.crop_scale),
            context_length=config.text.context_length if goal.text else 0,
            episode_size=config.protoclip.episode_size if goal.episodes else 0,
            # corrupt records: shard, position and reason per line (a gs:// workdir keeps them in a temp dir)
            skip_log_dir=None if fileio.is_remote(workdir) else os.path.join(workdir, "skipped_records"),
        )
    except ValueError as err:  # shards that cannot feed this objective (no captions)
        raise ConfigError(f"data.shards: {err}") from None
    iterator = iter(loader)
    manager = checkpointing.create_manager(workdir, keep=config.keep_checkpoints)
    try:
        restored = checkpointing.restore(manager, setup.abstract_state, iterator, num_classes=setup.num_classes)
    except (checkpointing.CheckpointMismatch, ResumeMismatch) as err:
        raise ConfigError(str(err)) from None
    state, start = (restored if restored else (setup.init_state(config.seed), 0))
    writer = metrics_lib.create_writer(workdir, resume_step=start)
    if start == 0 and jax.process_index() == 0:
        fileio.write_atomic(epath.Path(workdir) / "config.json", config.to_json_best_effort(indent=1))
        writer.write_hparams(config.to_dict())
        parameter_overview.log_parameter_overview(state["params"], msg="backbone parameters")
    step_fn = make_train_step(setup, loader.augment)  # crops, flips, normalisation inside the step
    if goal.episodes:
        from mlcd_jax.losses.protoclip import tfidf_teacher

        steps_per_episode = config.protoclip.episode_size // config.batch_size
        external = (tfidf_teacher(list(loader.decoded.captions), config.protoclip.external_dim, config.seed)
                    if config.protoclip.external else None)
        episode_features = make_episode_features(setup)
        built = int(state["episode"]["index"])  # the episode whose labels the state holds
    peak = metrics_lib.device_peak_flops()
    preemption = _Preemption(manager)
    stop_after = min(config.get("stop_after_steps", 0) or total_steps, total_steps)
    timer = periodic.StepTimer()
    profiler = periodic.Profiler(workdir, int(config.get("profile_steps", 0)), first=start + 5)
    last: dict[str, Any] = {}
    if start >= stop_after:
        print(f"{workdir} already holds step {start} (>= {stop_after}): nothing to train", flush=True)
    try:
        for step in range(start + 1, stop_after + 1):  # empty when the workdir is already there
            if goal.episodes and (step - 1) // steps_per_episode != built and step > steps_per_episode:
                built = (step - 1) // steps_per_episode  # episode 0 trains InfoNCE only
                t0 = time.perf_counter()
                state = {**state, "episode": build_episode(setup, state, loader, built, external, episode_features)}
                print(f"episode {built}: clustered {config.protoclip.episode_size} pairs into "
                      f"{config.protoclip.num_clusters} prototypes per modality in {time.perf_counter() - t0:.1f} s",
                      flush=True)
            with timer.data_wait():
                local = next(iterator)
            profiler.before(step)
            state, metrics = step_fn(state, sharding.host_to_global(local, mesh, setup.rules))
            profiler.after(step, metrics)
            preempted = preemption.requested(step)
            is_last = step >= stop_after
            evals_now = [fn for every, fn in evals if periodic.due(step, every)]
            log_now = periodic.due(step, config.log_every_steps, last=is_last) or bool(evals_now)
            ckpt_now = periodic.due(step, config.checkpoint_every_steps, last=is_last or preempted)
            if log_now or ckpt_now:
                metrics = jax.device_get(metrics)
                for name in ("loss", "grad_norm"):
                    if not np.isfinite(metrics[name]):
                        raise TrainingDiverged(
                            f"{name} is {metrics[name]} at step {step}; stopped, the last good checkpoint "
                            f"(step {manager.latest_step()}) is kept"
                        )
            if log_now:
                timing = timer.report()
                results: dict[str, float] = {}
                if evals_now:
                    writer.flush()  # evaluators may read metrics.jsonl (the training curves)
                text_model = setup.text_model.merge(state["text"]) if goal.text else None
                for fn in evals_now:
                    results.update(fn(setup.merge(state["params"]), text_model))
                if results:
                    print(f"step {step} eval: " + ", ".join(f"{k} {v:.4f}" for k, v in results.items()),
                          flush=True)
                extra = {**results, "skipped_records": loader.skipped_records}  # corrupt records, this process
                last = _log_step(config, setup, writer, step, total_steps, {**metrics, **extra}, timing, peak)
                timer.reset()  # the next window starts after logging and evaluation
            if ckpt_now:
                writer.flush()  # every row up to a checkpoint is on disk before the checkpoint exists
                checkpointing.save(manager, step, state, iterator, force=preempted or is_last)
            if preempted:
                raise Preempted(step, preemption.signal_name or "SIGTERM")
            if is_last:
                break
    finally:
        profiler.close()
        manager.wait_until_finished()
        manager.close()
        writer.flush()
        writer.close()
        preemption.restore()
    return last
