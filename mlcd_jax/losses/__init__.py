"""Cluster-discrimination losses: dense references and the sharded PartialFC prototype head."""

from mlcd_jax.losses.core import COS_HIST_BINS, KINDS, l2_normalize
from mlcd_jax.losses.dense import dense_loss
from mlcd_jax.losses.partial_fc import pad_num_classes, partial_fc_loss, sample_budget, shard_capacity

__all__ = [
    "COS_HIST_BINS",
    "KINDS",
    "dense_loss",
    "l2_normalize",
    "pad_num_classes",
    "partial_fc_loss",
    "sample_budget",
    "shard_capacity",
]
