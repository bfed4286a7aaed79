"""Cluster-discrimination losses: dense references and the sharded PartialFC prototype head."""

from mlcd_jax.losses.core import COS_HIST_BINS, KINDS, l2_normalize
from mlcd_jax.losses.dense import dense_loss
from mlcd_jax.losses.partial_fc import (
    HeadPlan, most_positives, pad_num_classes, partial_fc_loss, plan_head, sample_budget, shard_capacity,
)

__all__ = [
    "COS_HIST_BINS",
    "KINDS",
    "HeadPlan",
    "dense_loss",
    "l2_normalize",
    "most_positives",
    "pad_num_classes",
    "partial_fc_loss",
    "plan_head",
    "sample_budget",
    "shard_capacity",
]
