"""The jitted train step: forward, the objective's loss, gradient and optimizer update."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from mlcd_jax import sharding
from mlcd_jax.losses import most_positives, partial_fc_loss
from mlcd_jax.losses.contrastive import contrastive_loss
from mlcd_jax.runs import DTYPES
from mlcd_jax.train.episodes import protoclip_batch_loss
from mlcd_jax.train.state import TrainSetup


Batch = dict[str, jax.Array]
Step = Callable[[Any, Batch], tuple[Any, Batch]]


def make_train_step(
    setup: TrainSetup, preprocess: Callable[[Batch], Batch] | None = None, exact_head: bool = False
) -> Step:
    """The pure train step ``(state, batch) -> (state, metrics)``, jitted with explicit shardings.

    ``batch`` is ``dict(image=float32 [B, S, S, C], labels=int32 [B, l])`` (cluster objectives) or
    ``dict(image=..., tokens=int32 [B, context])`` (image-text objectives), or whatever ``preprocess``
    (run first, inside the same program) turns into that: the trainer passes the data loader's
    on-device augmentation, so its canvases are cropped and flipped by the step itself.

    The prototype head scores ``setup.head.capacity`` rows per shard, room for the batch's expected
    positives; ``exact_head=True`` compiles the step with room for every possible positive instead (what
    :class:`GuardedStep` runs for a batch beyond the budget).
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
                return protoclip_batch_loss(setup, tensors, pooled, text, batch["episode_pos"])
            if goal.text:
                return contrastive_loss(pooled, text, tensors["logit_scale"])
            return partial_fc_loss(
                pooled, tensors["proto"], batch["labels"], sample_key, mesh=mesh,
                sample_ratio=loss_cfg.sample_ratio, sampling=loss_cfg.get("sampling", "paper"),
                kind=loss_cfg.kind, scale=loss_cfg.scale,
                margin=loss_cfg.margin, margin_type=loss_cfg.get("margin_type") or None,
                num_classes=setup.num_classes, batch_axes=axes, proto_axes=setup.proto_axes,
                positive_budget=None if exact_head else setup.head.positive_budget,
                compute_dtype=DTYPES[loss_cfg.head_dtype] if loss_cfg.get("head_dtype") else None,
                return_metrics=True, histograms=histograms,
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


class GuardedStep:
    """The train step with the prototype head's exact fallback: each batch's distinct positives per shard
    are counted on device first (:func:`~mlcd_jax.losses.most_positives`, a small program over the
    labels), and a batch beyond the head's positive budget runs through the step compiled with room for
    every positive (built at its first use), so no positive is ever left out of the loss. Without a
    budget (no prototypes, or one that saves nothing) it is the plain step, without the check."""

    def __init__(self, setup: TrainSetup, preprocess: Callable[[Batch], Batch] | None = None):
        self._setup, self._preprocess = setup, preprocess
        self._step, self._exact = make_train_step(setup, preprocess), None
        self.exact_steps = 0  # batches that overflowed the budget (logged as head_exact_steps)
        head = setup.head
        self._count = None
        if head is not None and head.budgeted:
            self._count = jax.jit(functools.partial(
                most_positives, rows_per_shard=head.rows_per_shard, num_shards=setup.k_pad // head.rows_per_shard,
                kind=setup.config.loss.kind,
            ))

    def __call__(self, state: Any, batch: Batch) -> tuple[Any, Batch]:
        if self._count is None or int(self._count(batch["labels"])) <= self._setup.head.positive_budget:
            return self._step(state, batch)
        if self._exact is None:
            self._exact = make_train_step(self._setup, self._preprocess, exact_head=True)
        self.exact_steps += 1
        return self._exact(state, batch)
