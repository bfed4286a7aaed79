"""Cluster discrimination (``loss.kind`` = ``mlcd`` / ``mlc`` / ``softmax``): MLCD Eq. 5, Eq. 4 and the
single label of UNICOM, of the image tower (``params``) against the prototype matrix (``proto``, rows
split over the ``proto`` rule's mesh axes); batches carry cluster labels. The loss is the sharded
PartialFC head, :func:`mlcd_jax.losses.partial_fc_loss`."""

from __future__ import annotations

import logging
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mlcd_jax import sharding
from mlcd_jax.config_lib import ConfigError
from mlcd_jax.losses import KINDS, l2_normalize, pad_num_classes, partial_fc_loss
from mlcd_jax.losses.partial_fc import SAMPLING_MODES, ratio_ignored_warning
from mlcd_jax.objectives.base import Objective, register
from mlcd_jax.runs import AbstractModel


@register
class ClusterDiscrimination(Objective):
    """The image tower and its [k_pad, d] prototypes; k_pad is ``loss.num_classes`` padded to a multiple
    of the prototype shards (the padding rows are masked out of the loss)."""

    kinds = KINDS
    trainable = ("params", "proto")
    groups = {"params": "backbone", "proto": "proto"}

    def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh, rules: sharding.Rules,
                 image: AbstractModel) -> None:
        super().__init__(config, mesh, rules, image)
        self.proto_axes = sharding.proto_axes(mesh, rules)
        shards = math.prod(mesh.shape[a] for a in self.proto_axes)
        self.num_classes = int(config.loss.num_classes)
        self.k_pad = pad_num_classes(self.num_classes, shards)
        if self.k_pad != self.num_classes:
            logging.info("prototype rows padded %d -> %d for %d shards (padding masked)",
                         self.num_classes, self.k_pad, shards)

    @classmethod
    def validate(cls, config: ml_collections.ConfigDict) -> None:
        loss = config.loss
        if not 0 < loss.sample_ratio <= 1:
            raise ConfigError(f"loss.sample_ratio={loss.sample_ratio} must be in (0, 1]")
        sampling = loss.get("sampling", "paper")
        if sampling not in SAMPLING_MODES:
            raise ConfigError(f"loss.sampling={sampling!r}: choose one of {', '.join(SAMPLING_MODES)}")
        labels_per_sample = 1 if loss.kind == "softmax" else loss.top_l
        warning = ratio_ignored_warning(loss.num_classes, loss.sample_ratio, config.batch_size * labels_per_sample,
                                        sampling)
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
        """Unit prototype rows drawn from N(0, 1)."""
        return {"proto": l2_normalize(jax.random.normal(keys[0], (self.k_pad, self.embed_dim), jnp.float32))}

    def shardings(self, abstract: dict[str, Any]) -> dict[str, Any]:
        return {"proto": NamedSharding(self.mesh, P(self.proto_axes or None, None))}

    def loss(self, tensors: dict[str, Any], image: jax.Array, batch: dict[str, jax.Array],
             key: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        loss = self.config.loss
        return partial_fc_loss(
            image, tensors["proto"], batch["labels"], key, mesh=self.mesh,
            sample_ratio=loss.sample_ratio, sampling=loss.get("sampling", "paper"),
            kind=loss.kind, scale=loss.scale,
            margin=loss.margin, margin_type=loss.get("margin_type") or None,
            num_classes=self.num_classes, batch_axes=sharding.batch_axes(self.mesh, self.rules),
            proto_axes=self.proto_axes, max_rows=loss.get("max_rows") or None, return_metrics=True,
            histograms=bool(loss.get("histograms", True)),
        )

    def log_terms(self, scalars: dict[str, Any]) -> str:
        return f"pos {scalars['loss_pos']:.3f} neg {scalars['loss_neg']:.3f}"

    def describe(self) -> str:
        return f"prototypes {self.k_pad} x {self.embed_dim}"
