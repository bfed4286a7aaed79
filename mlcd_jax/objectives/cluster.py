"""Cluster discrimination (``loss.kind`` = ``mlcd`` / ``mlc`` / ``softmax``): MLCD Eq. 5, Eq. 4 and the
single label of UNICOM, of the image tower (``params``) against the prototype matrix (``proto``, rows
split over the ``proto`` rule's mesh axes); batches carry cluster labels. The loss is the sharded
PartialFC head, :func:`mlcd_jax.losses.partial_fc_loss`."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mlcd_jax import sharding
from mlcd_jax.config_lib import ConfigError
from mlcd_jax.losses import (
    KINDS, Selection, l2_normalize, most_positives, pad_num_classes, partial_fc_loss, plan_head, put_rows,
    select_rows, take_rows,
)
from mlcd_jax.losses.core import labels_per_sample
from mlcd_jax.losses.partial_fc import POSITIVE_BUDGETS, SAMPLING_MODES, ratio_ignored_warning
from mlcd_jax.objectives.base import Objective, register
from mlcd_jax.runs import DTYPES, AbstractModel, check_dtype

PROTO_INITS = ("unit", "normal")  # loss.proto_init (ClusterDiscrimination.init)
PROTO_INIT_STD = 0.01  # PartialFC / UNICOM's prototype init, N(0, 0.01^2)

@register
class ClusterDiscrimination(Objective):
    """The image tower and its [k_pad, d] prototypes; k_pad is ``loss.num_classes`` padded to a multiple
    of the prototype shards (the padding rows are masked out of the loss)."""

    kinds = KINDS
    trainable = ("params", "proto")
    groups = {"params": "backbone", "proto": "proto"}
    sampled = "proto"

    def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh, rules: sharding.Rules,
                 image: AbstractModel) -> None:
        super().__init__(config, mesh, rules, image)
        self.proto_axes = sharding.proto_axes(mesh, rules)
        self.shards = shards = math.prod(mesh.shape[a] for a in self.proto_axes)  # the prototype matrix's row blocks
        self.num_classes = int(config.loss.num_classes)
        self.k_pad = pad_num_classes(self.num_classes, shards)
        if self.k_pad != self.num_classes:
            logging.info("prototype rows padded %d -> %d for %d shards (padding masked)",
                         self.num_classes, self.k_pad, shards)
        loss = config.loss
        self.head = plan_head(self.num_classes, shards, config.batch_size * labels_per_sample(loss.kind, loss.top_l),
                              loss.sample_ratio, loss.get("sampling", "paper"), loss.get("positive_budget", "expected"))

    @classmethod
    def validate(cls, config: ml_collections.ConfigDict) -> None:
        loss = config.loss
        if not 0 < loss.sample_ratio <= 1:
            raise ConfigError(f"loss.sample_ratio={loss.sample_ratio} must be in (0, 1]")
        sampling = loss.get("sampling", "paper")
        if sampling not in SAMPLING_MODES:
            raise ConfigError(f"loss.sampling={sampling!r}: choose one of {', '.join(SAMPLING_MODES)}")
        if loss.get("positive_budget", "expected") not in POSITIVE_BUDGETS:
            raise ConfigError(f"loss.positive_budget={loss.positive_budget!r}: choose one of {', '.join(POSITIVE_BUDGETS)}")
        if loss.get("proto_init", "unit") not in PROTO_INITS:
            raise ConfigError(f"loss.proto_init={loss.proto_init!r}: choose one of {', '.join(PROTO_INITS)}")
        check_dtype("loss.head_dtype", loss.get("head_dtype", ""))
        labels = config.batch_size * labels_per_sample(loss.kind, loss.top_l)
        warning = ratio_ignored_warning(loss.num_classes, loss.sample_ratio, labels, sampling)
        if warning:
            logging.warning(warning)

    @classmethod
    def check_shards(cls, config: ml_collections.ConfigDict, manifest: dict[str, Any]) -> None:
        if manifest and manifest.get("top_l") and manifest["top_l"] < config.loss.top_l:
            raise ConfigError(
                f"loss.top_l={config.loss.top_l} but the shards carry only l={manifest['top_l']} "
                "(a smaller loss.top_l uses each image's best labels)"
            )
        if manifest and manifest.get("num_clusters") and manifest["num_clusters"] != config.loss.num_classes:
            raise ConfigError(
                f"loss.num_classes={config.loss.num_classes} but the shards were clustered into "
                f"k={manifest['num_clusters']}"
            )

    def init(self, keys: tuple[jax.Array, jax.Array]) -> dict[str, Any]:
        """Prototype rows as ``loss.proto_init`` says: ``normal``, N(0, 0.01²) as PartialFC / UNICOM, or
        ``unit``, N(0, 1) rows scaled to unit norm. The loss reads only their directions, but AdamW's
        steps do not depend on the rows' scale, so small rows turn ~100/√d times faster per step."""
        rows = jax.random.normal(keys[0], (self.k_pad, self.embed_dim), jnp.float32)
        return {"proto": PROTO_INIT_STD * rows if self.config.loss.get("proto_init", "unit") == "normal"
                else l2_normalize(rows)}

    def shardings(self, abstract: dict[str, Any]) -> dict[str, Any]:
        return {"proto": NamedSharding(self.mesh, P(self.proto_axes or None, None))}

    def _sampling(self, exact: bool) -> dict[str, Any]:
        """The head's arguments that decide which rows a step scores (shared by the loss and :meth:`select`)."""
        loss = self.config.loss
        return dict(mesh=self.mesh, num_classes=self.num_classes, sample_ratio=loss.sample_ratio,
                    sampling=loss.get("sampling", "paper"), kind=loss.kind,
                    batch_axes=sharding.batch_axes(self.mesh, self.rules), proto_axes=self.proto_axes,
                    positive_budget=None if exact else self.head.positive_budget)

    def loss(self, tensors: dict[str, Any], image: jax.Array, batch: dict[str, jax.Array],
             key: jax.Array, exact: bool = False, selection: Selection | None = None,
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """The sharded head, scoring ``self.head.capacity`` rows per shard (room for the batch's expected
        positives), or with ``exact`` room for every possible positive; with ``selection``
        (:meth:`select`) ``tensors["proto"]`` holds the selected rows alone."""
        loss = self.config.loss
        return partial_fc_loss(
            image, tensors["proto"], batch["labels"], key, scale=loss.scale,
            margin=loss.margin, margin_type=loss.get("margin_type") or None,
            compute_dtype=DTYPES[loss.head_dtype] if loss.get("head_dtype") else None, return_metrics=True,
            histograms=bool(loss.get("histograms", True)), selection=selection, **self._sampling(exact),
        )

    def select(self, batch: dict[str, jax.Array], key: jax.Array, exact: bool = False) -> Selection:
        """The prototype rows :meth:`loss` scores for this batch and key (``loss.proto_update=lazy``)."""
        return select_rows(batch["labels"], key, num_rows=self.k_pad, **self._sampling(exact))

    def take(self, matrix: jax.Array, selection: Selection) -> jax.Array:
        """The selected rows of ``proto`` or of a state array shaped like it."""
        return take_rows(matrix, selection, mesh=self.mesh, proto_axes=self.proto_axes)

    def put(self, matrix: jax.Array, selection: Selection, rows: jax.Array) -> jax.Array:
        """``matrix`` with its selected rows (those that count) set to ``rows``."""
        return put_rows(matrix, selection, rows, mesh=self.mesh, proto_axes=self.proto_axes)

    def exact_check(self) -> Callable[[dict[str, jax.Array]], jax.Array] | None:
        """Whether a batch's distinct positives overflow a shard's row budget (no check without a budget)."""
        if not self.head.budgeted:
            return None
        head, kind = self.head, self.config.loss.kind
        return lambda batch: most_positives(batch["labels"], head.rows_per_shard, self.shards, kind) > head.positive_budget

    def plan(self) -> dict[str, Any] | None:
        return self.head.report()

    def log_terms(self, scalars: dict[str, Any]) -> str:
        return f"pos {scalars['loss_pos']:.3f} neg {scalars['loss_neg']:.3f}"

    def describe(self) -> str:
        return f"prototypes {self.k_pad} x {self.embed_dim}"
