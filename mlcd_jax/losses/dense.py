"""Dense reference losses: every prototype is a candidate, the full B x k cosine matrix is built.

Readable and exact; for tests, small k and evaluation. Training at scale uses
:func:`mlcd_jax.losses.partial_fc.partial_fc_loss`, which gives the same value and gradients at
``sample_ratio=1`` without ever holding B x k.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mlcd_jax.losses import core


def label_mask(labels: jax.Array, num_rows: int, offset: int | jax.Array = 0) -> jax.Array:
    """Boolean [B, num_rows]: row r is a positive of sample b when ``labels[b, j] == offset + r``.

    ``-1`` (padding) and ids outside ``[offset, offset + num_rows)`` mark nothing; a repeated id in a
    row marks its prototype once.
    """
    rows = jnp.broadcast_to(jnp.arange(labels.shape[0])[:, None], labels.shape)
    cols = core.local_rows(labels, offset, num_rows)  # out of range -> dropped
    return jnp.zeros((labels.shape[0], num_rows), bool).at[rows, cols].set(True, mode="drop")


def dense_loss(
    embeddings: jax.Array,
    prototypes: jax.Array,
    labels: jax.Array,
    *,
    kind: str = "mlcd",
    scale: float = 32.0,
    margin: float = 0.3,
    margin_type: str | None = None,
    return_metrics: bool = False,
    histograms: bool = False,
) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
    """Batch-mean cluster-discrimination loss against all ``k`` prototypes.

    Args:
      embeddings: [B, d], any float dtype; L2-normalised here.
      prototypes: [k, d]; L2-normalised here.
      labels: int [B, l] positive prototype ids, ``-1`` = padding.
      kind: ``mlcd`` (Eq. 5), ``mlc`` (Eq. 4) or ``softmax`` (single-label on ``labels[:, 0]``, UNICOM).
      scale, margin: logits are ``scale · c`` for negatives and ``scale · margin(c)`` for positives.
      margin_type: ``cosine`` (``c - m``, default for mlcd/mlc) or ``angular`` (``cos(θ + m)``, default
        for softmax, ArcFace).
      return_metrics: also return loss_pos / loss_neg / mean_pos_cos / mean_neg_cos / num_sampled.
      histograms: add 40-bin histograms of positive and negative cosine to the metrics.
    """
    core.check_labels(embeddings, prototypes, labels)
    margin_kind = core.check_kind(kind, margin_type)
    labels = core.task_labels(labels, kind)
    e = core.l2_normalize(embeddings)
    c = core.cosine(e, prototypes, jnp.promote_types(embeddings.dtype, prototypes.dtype))
    pos = label_mask(labels, prototypes.shape[0])
    loss, metrics = core.loss_from_cosines(
        c, pos, ~pos, kind=kind, scale=scale, margin=margin, margin_type=margin_kind,
        histograms=histograms,
    )
    if not return_metrics:
        return loss
    metrics["num_sampled"] = jnp.asarray(prototypes.shape[0], jnp.int32)
    return loss, metrics
