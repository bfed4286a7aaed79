"""The jitted train step: forward, the objective's loss, gradient and optimizer update."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from mlcd_jax import sharding
from mlcd_jax.runs import DTYPES
from mlcd_jax.train.state import TrainSetup


Batch = dict[str, jax.Array]
Step = Callable[[Any, Batch], tuple[Any, Batch]]


def make_train_step(
    setup: TrainSetup, preprocess: Callable[[Batch], Batch] | None = None, exact: bool = False,
    patch_drop: float | None = None,
) -> Step:
    """The pure train step ``(state, batch) -> (state, metrics)``, jitted with explicit shardings.

    ``batch`` is ``dict(image=float32 [B, S, S, C], labels=int32 [B, l], ...)`` with what the objective's
    batches carry (:meth:`~mlcd_jax.objectives.base.Objective.input_specs`), or whatever ``preprocess``
    (run first, inside the same program) turns into that: the trainer passes the data loader's
    on-device augmentation, so its canvases are cropped and flipped by the step itself. The image tower
    runs here, and the objective's ``bounds`` are applied after the update; the objective's :meth:`~mlcd_jax.objectives.base.Objective.loss` does the rest (its
    ``exact`` variant with ``exact=True``: what :class:`GuardedStep` runs for a batch that needs it).
    ``patch_drop`` (FLIP: the fraction of each image's patch tokens dropped; None: ``data.patch_drop``)
    is static: it sets the token count, so the masked and unmasked steps are two programs.
    With ``loss.proto_update=lazy`` the objective's ``sampled`` rows are chosen before the loss, which
    then sees and differentiates by them alone, and the optimizer updates only them.
    """
    config, mesh = setup.config, setup.mesh
    compute_dtype = DTYPES[config.model.dtype]
    if patch_drop is None:
        patch_drop = float(config.data.get("patch_drop", 0.0))
    goal = setup.objective
    lazy = goal.sampled if config.loss.get("proto_update", "dense") == "lazy" else ""  # the key updated by rows

    def step_fn(state: dict[str, Any], batch: dict[str, jax.Array]):
        if preprocess is not None:
            batch = preprocess(batch)
        rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
        sample_key, dropout_key, drop_key = jax.random.split(rng, 3)

        options = {"exact": True} if exact else {}  # only objectives with an exact_check have the variant
        trainable = {k: state[k] for k in goal.trainable}
        if lazy:  # the loss sees, and differentiates by, the sampled rows alone
            options["selection"] = goal.select(batch, sample_key, **options)
            trainable[lazy] = goal.take(state[lazy], options["selection"])

        def loss_fn(trainable):
            tensors = {**{k: state[k] for k in goal.frozen}, **trainable}
            model = setup.merge(tensors["params"])
            with goal.on_mesh():  # the models pin their activations on the mesh, through the run's rules
                pooled, _ = model(
                    batch["image"].astype(compute_dtype), deterministic="params" in goal.frozen,
                    rngs=nnx.Rngs(dropout=dropout_key, patch_drop=drop_key), patch_drop=patch_drop,
                )
            return goal.loss(tensors, pooled, batch, sample_key, **options)

        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
        renewed = metrics.pop("statistics") if goal.statistics else {}  # e.g. BatchNorm's running averages
        trainable, opt_state = apply_gradients(setup, grads, state["opt_state"], trainable,
                                               (state[lazy], options["selection"]) if lazy else None)
        trainable = goal.bounded(trainable)
        new_state = {**state, **trainable, **{k: renewed[k] for k in goal.statistics}, "opt_state": opt_state,
                     "step": state["step"] + 1}
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


def apply_gradients(
    setup: TrainSetup, grads: dict[str, Any], opt_state: Any, trainable: dict[str, Any],
    rows: tuple[jax.Array, Any] | None = None,
) -> tuple[dict[str, Any], Any]:
    """One optimizer update: the trainable entries after it and the new optimizer state. With ``rows``
    = (the full matrix, the step's selection) the update is lazy: ``trainable`` and ``grads`` hold the
    selected rows of the objective's ``sampled`` key, and the updated rows go back into the matrix."""
    extra = {} if rows is None else {"rows": rows[1]}
    updates, opt_state = setup.tx.update(grads, opt_state, trainable, **extra)
    trainable = optax.apply_updates(trainable, updates)
    if rows is not None:
        key = setup.objective.sampled
        trainable = {**trainable, key: setup.objective.put(rows[0], rows[1], trainable[key])}
    return trainable, opt_state


class GuardedStep:
    """The train step the loop runs: the objective's exact fallback, and FLIP's unmasked tuning phase.

    Exact fallback (:meth:`~mlcd_jax.objectives.base.Objective.exact_check`): each batch is checked on
    device first (a small program; its verdict is read before the step is dispatched), and a batch that
    needs it runs through the step compiled with the loss's ``exact`` variant. The prototype head uses
    it so that a batch whose positives overflow a shard's row budget still has every positive in its
    loss. Objectives without a check run the plain step, unchecked.

    FLIP: ``data.patch_drop`` applies to train steps 1 .. ``data.patch_drop_until_step`` (0: every step);
    the steps after it see every patch token (FLIP's unmasked tuning, same run and schedule). The phase
    follows from the step number alone, so a resumed run is in the phase it left. Each program is
    compiled at its first use.
    """

    def __init__(self, setup: TrainSetup, preprocess: Callable[[Batch], Batch] | None = None):
        self._setup, self._preprocess = setup, preprocess
        self._steps: dict[tuple[bool, float], Step] = {}
        check = setup.objective.exact_check()
        self._check = None if check is None else jax.jit(check)
        data = setup.config.data
        self._drop, self._drop_until = float(data.get("patch_drop", 0.0)), int(data.get("patch_drop_until_step", 0))
        self.exact_steps = 0  # batches that needed the exact step (logged as exact_steps)

    @property
    def checked(self) -> bool:
        """Whether batches are checked (the objective has an exact variant)."""
        return self._check is not None

    def patch_drop(self, step: int) -> float:
        """The patch drop of train step ``step`` (1-based): ``data.patch_drop`` until
        ``data.patch_drop_until_step``, none after it."""
        return self._drop if not self._drop_until or step <= self._drop_until else 0.0

    def __call__(self, state: Any, batch: Batch, step: int) -> tuple[Any, Batch]:
        """Train step number ``step`` (1-based) on ``batch``."""
        exact = self._check is not None and bool(self._check(batch))
        self.exact_steps += exact
        key = (exact, self.patch_drop(step))
        if key not in self._steps:
            self._steps[key] = make_train_step(self._setup, self._preprocess, exact=exact, patch_drop=key[1])
        return self._steps[key](state, batch)
