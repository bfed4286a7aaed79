"""What a run trains, before any array exists (:class:`TrainSetup`): the image tower, the objective of
``loss.kind`` (its state keys, their shardings and initial values), the optimizer; the initial state
created directly sharded."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mlcd_jax import objectives, sharding
from mlcd_jax.models import VisionTransformer
from mlcd_jax.objectives import Objective
from mlcd_jax.runs import AbstractModel, build_model, sharding_rules
from mlcd_jax.train.optimizer import make_optimizer


@dataclasses.dataclass
class TrainSetup:
    """Everything derived from the config and the mesh before any array exists."""

    config: ml_collections.ConfigDict
    mesh: Mesh
    rules: sharding.Rules  # logical axis -> mesh axes, config.mesh_rules applied
    objective: Objective  # what loss.kind trains, bound to this run (mlcd_jax.objectives)
    proto_axes: tuple[str, ...]  # mesh axes the "proto" rule splits rows over (e.g. a prototype matrix's)
    model: AbstractModel  # the image tower
    abstract_state: Any  # pytree of ShapeDtypeStruct with shardings
    state_shardings: Any
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    num_classes: int  # prototype rows a checkpoint must hold (the objective's); 0 without prototypes
    embed_dim: int
    flops_per_step: float
    init_fn: Callable[[int], dict[str, Any]]  # seed -> state (unsharded; see init_state)

    @classmethod
    def create(cls, config: ml_collections.ConfigDict, mesh: Mesh, num_train_steps: int) -> "TrainSetup":
        rules = sharding_rules(config)
        model = AbstractModel.create(config, mesh)
        goal = objectives.create(config, mesh, rules, model)
        tx, schedule = make_optimizer(config, num_train_steps, {k: goal.groups[k] for k in goal.trainable},
                                      goal.no_decay, rows=(goal.take, goal.put) if goal.sampled else None)
        replicated = NamedSharding(mesh, P())

        def init(seed: jax.Array) -> dict[str, Any]:
            model_key, *own_keys, rng = jax.random.split(jax.random.key(seed), 4)
            state = {"params": nnx.state(build_model(config, model_key)).to_pure_dict(), **goal.init(tuple(own_keys))}
            trainable = {k: state[k] for k in goal.trainable}
            return {
                "step": jnp.zeros((), jnp.int32),
                "rng": jax.random.key_data(rng),
                **state,
                "opt_state": tx.init(trainable),
            }

        abstract_plain = jax.eval_shape(init, 0)
        key_shardings = {"params": model.shardings, **goal.shardings(abstract_plain)}
        key_shardings = {k: key_shardings[k] for k in goal.state_keys()}
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
            config=config, mesh=mesh, rules=rules, objective=goal, proto_axes=sharding.proto_axes(mesh, rules),
            model=model, abstract_state=abstract_state, state_shardings=shardings, tx=tx, schedule=schedule,
            num_classes=goal.num_classes, embed_dim=goal.embed_dim,
            flops_per_step=config.batch_size * goal.flops_per_example(config), init_fn=init,
        )

    def init_state(self, seed: int) -> Any:
        """The initial state, created directly in its shardings, with the towers the objective reads from
        checkpoints (a locked image tower, a text tower to start from)."""
        state = jax.jit(self.init_fn, out_shardings=self.state_shardings)(seed)
        return self.objective.load_weights(state, self.state_shardings)

    def merge(self, params: Any) -> VisionTransformer:
        """A model object from pure-dict parameters (inside or outside jit)."""
        return self.model.merge(params)
