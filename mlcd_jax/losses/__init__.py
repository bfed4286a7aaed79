"""Cluster-discrimination losses: dense references and the sharded PartialFC prototype head."""

from mlcd_jax.losses.core import COS_HIST_BINS, KINDS, l2_normalize
from mlcd_jax.losses.dense import dense_loss
from mlcd_jax.losses.partial_fc import (
    HeadPlan, Selection, most_positives, pad_num_classes, partial_fc_loss, plan_head, put_rows, sample_budget,
    select_rows, shard_capacity, take_rows,
)

__all__ = [
    "COS_HIST_BINS",
    "KINDS",
    "HeadPlan",
    "Selection",
    "dense_loss",
    "l2_normalize",
    "most_positives",
    "pad_num_classes",
    "partial_fc_loss",
    "plan_head",
    "put_rows",
    "sample_budget",
    "select_rows",
    "shard_capacity",
    "take_rows",
]
