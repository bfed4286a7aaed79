"""What a run trains, before any array exists (:class:`TrainSetup`): the objective's state keys, their
shardings and initial values, the models and the optimizer; the initial state created directly sharded."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mlcd_jax import sharding
from mlcd_jax.config_lib import ConfigError
from mlcd_jax.losses import HeadPlan, l2_normalize, pad_num_classes, plan_head
from mlcd_jax.losses.contrastive import INIT_LOG_SCALE
from mlcd_jax.losses.core import labels_per_sample
from mlcd_jax.models import VisionTransformer
from mlcd_jax.objectives import Objective, objective
from mlcd_jax.runs import (
    AbstractModel, ProtoHeads, build_model, build_text_model, flops_per_example, load_tower, sharding_rules, vit_config,
)
from mlcd_jax.train.optimizer import make_optimizer


# The episode state's per-cluster arrays, as EpisodePrototypes names them (the external ones only with a teacher).
EPISODE_PROTOS = ("image_prototypes", "image_mask", "text_prototypes", "text_mask", "text_centroids",
                  "image_centroids")
EPISODE_EXTERNAL = ("image_ext_prototypes", "image_ext_mask", "text_ext_prototypes", "text_ext_mask")


def empty_episode(config: ml_collections.ConfigDict) -> dict[str, jax.Array]:
    """ProtoCLIP's episode state before the first episode is built (``index`` -1: prototype losses off)."""
    p = config.protoclip
    k, d, n = p.num_clusters, p.head_dim, p.episode_size
    zeros = {"prototypes": jnp.zeros((k, d), jnp.float32), "mask": jnp.zeros((k,), bool),
             "centroids": jnp.zeros((k, d), jnp.float32)}
    names = EPISODE_PROTOS + (EPISODE_EXTERNAL if p.external else ())
    episode = {name: zeros[name.rsplit("_", 1)[1]] for name in names}
    labels = ("image_labels", "text_labels") + (("external_labels",) if p.external else ())
    return {"index": jnp.asarray(-1, jnp.int32), **{name: jnp.zeros((n,), jnp.int32) for name in labels}, **episode}


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
    head: HeadPlan | None  # the prototype head's per-shard sizes (None without prototypes)
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
        head = None
        if goal.clusters:
            shards = math.prod(mesh.shape[a] for a in proto_axes)
            num_classes = int(config.loss.num_classes)
            k_pad = pad_num_classes(num_classes, shards)
            if k_pad != num_classes:
                logging.info("prototype rows padded %d -> %d for %d shards (padding masked)",
                             num_classes, k_pad, shards)
            labels_per_step = config.batch_size * labels_per_sample(config.loss.kind, config.loss.top_l)
            head = plan_head(num_classes, shards, labels_per_step, config.loss.sample_ratio,
                             config.loss.get("sampling", "paper"), config.loss.get("positive_budget", "expected"))
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
            schedule=schedule, num_classes=num_classes, k_pad=k_pad, head=head, embed_dim=model_cfg.embed_dim,
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
