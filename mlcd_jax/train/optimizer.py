"""The optimizer: AdamW in groups (towers, prototypes, temperatures) on a warm-up + cosine schedule."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import optax

from mlcd_jax.runs import DTYPES

# Leaf names (the last key of a parameter's path) that weight decay skips: biases (incl. the fused
# ``qkv_bias``), LayerNorm scales, class token and position tables. Matrix weights end in ``kernel``.
_NO_DECAY_SUFFIXES = ("bias", "scale", "embedding", "pos_embed", "pos_emb")

PROTO_UPDATES = ("dense", "lazy")  # loss.proto_update: AdamW on every prototype row, or on the sampled ones

# (take, put) of a sampled matrix's rows: take(array, rows) -> the selected rows; put(array, rows, values)
# -> the array with them replaced (mlcd_jax.objectives: an objective's ``take`` and ``put``).
RowAccess = tuple[Callable[[Any, Any], Any], Callable[[Any, Any, Any], Any]]


def weight_decay_mask(params: Any, exempt: tuple[str, ...] = ()) -> Any:
    """True for the backbone leaves AdamW decays: matrix weights (names ending in ``kernel``) outside the
    state keys ``exempt`` (the first key of a leaf's path), nothing else.

    Decided from the parameter's name, not its rank, so it holds for 3-D ``qkv_bias`` and for the
    ``layers``-stacked leaves of ``scan_layers``. A leaf with neither kind of name raises, so a new
    parameter cannot silently get the wrong role.
    """

    def decays(path: tuple[Any, ...], _) -> bool:
        if str(getattr(path[0], "key", path[0])) in exempt:
            return False
        name = str(getattr(path[-1], "key", path[-1]))
        if name.endswith("kernel"):
            return True
        if name.endswith(_NO_DECAY_SUFFIXES):
            return False
        raise ValueError(
            f"parameter {jax.tree_util.keystr(path)} has no weight-decay role: name matrix weights "
            f"'*kernel' or add its suffix to train.optimizer._NO_DECAY_SUFFIXES"
        )

    return jax.tree_util.tree_map_with_path(decays, params)


def row_sparse(inner: optax.GradientTransformation, access: RowAccess) -> optax.GradientTransformationExtraArgs:
    """``inner`` (AdamW) on the rows one step touched only: PartialFC v1's sparse update.

    ``update(grads, state, params, rows=selection)`` takes the gradient and parameters of the selected
    rows alone. It gathers those rows of every parameter-shaped leaf of ``inner``'s state (the moments),
    runs ``inner`` on them, writes them back and returns the rows' updates, which the train step writes
    into the matrix. So a touched row gets exactly ``inner``'s update for its gradient, and an untouched
    row keeps its value and moments: no decay, no weight decay. The state is ``inner``'s own, so a
    checkpoint serves either update.
    """
    take, put = access

    def update(updates: Any, state: Any, params: Any = None, *, rows: Any = None, **extra: Any) -> tuple[Any, Any]:
        del extra  # other transforms' arguments
        if rows is None:
            raise ValueError("the lazy prototype update needs rows=, the step's selection of rows")
        marks = optax.tree_utils.tree_map_params(inner, lambda _: True, state, transform_non_params=lambda _: False)
        leaves, treedef = jax.tree.flatten(state)
        rowwise = jax.tree.leaves(marks)
        part = treedef.unflatten([take(x, rows) if r else x for x, r in zip(leaves, rowwise)])
        updates, part = inner.update(updates, part, params)
        merged = [put(x, rows, y) if r else y for x, y, r in zip(leaves, jax.tree.leaves(part), rowwise)]
        return updates, treedef.unflatten(merged)

    return optax.GradientTransformationExtraArgs(inner.init, update)


def make_optimizer(
    config: ml_collections.ConfigDict, num_steps: int, groups: dict[str, str], no_decay: tuple[str, ...] = (),
    rows: RowAccess | None = None,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW on the trainable state keys in the groups ``groups`` names (each key's, from its objective,
    :mod:`mlcd_jax.objectives`): ``backbone`` (towers, heads), ``proto`` (a prototype matrix) and
    ``scale`` (temperatures, biases: no weight decay); warm-up + cosine schedule.

    Backbone: gradients clipped by their own global norm (``grad_clip``), weight decay on matrix weights
    only (:func:`weight_decay_mask`), none on the keys ``no_decay`` names. Prototypes: learning rate x
    ``loss.proto_lr_mult``, weight decay ``loss.proto_weight_decay`` (None = ``weight_decay``), not
    clipped (as PartialFC, which clips only the backbone), so one step's head gradient never shrinks the
    backbone's update. With ``loss.proto_update=lazy`` the prototypes' AdamW runs on the rows a step
    sampled only (:func:`row_sparse`, through ``rows``: the objective's row access); its ``update`` then
    takes ``rows=`` the step's selection.

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
            weight_decay=weight_decay, mask=mask, mu_dtype=DTYPES[config.mu_dtype] if config.get("mu_dtype") else None,
        )

    backbone = optax.chain(
        optax.clip_by_global_norm(config.grad_clip) if config.grad_clip > 0 else optax.identity(),
        adamw(update_schedule, config.weight_decay, functools.partial(weight_decay_mask, exempt=no_decay)),
    )
    proto = adamw(
        lambda count: proto_lr_mult * update_schedule(count),
        config.weight_decay if proto_wd is None else float(proto_wd),
    )
    if loss_cfg.get("proto_update", "dense") == "lazy":
        if rows is None:
            raise ValueError("loss.proto_update=lazy needs the objective's row access (rows=)")
        proto = row_sparse(proto, rows)
    # Temperatures and biases (scalars of the loss): same schedule, no weight decay, not clipped.
    scale = adamw(update_schedule, 0.0)
    tx = optax.multi_transform(
        {"backbone": backbone, "proto": proto, "scale": scale},
        param_labels=dict(groups),
    )
    if accum > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=accum)
    return tx, lambda step: update_schedule(step // accum)
