"""CLIP's symmetric InfoNCE over the global batch, with a learnable temperature (CLIP, FLIP, LiT).

Image and text embeddings [B, d] are L2-normalised; ``logits = s · img · txtᵀ`` with ``s = exp(log_scale)``;
the trainer clips the parameter into :data:`LOG_SCALE_RANGE` = [0, ln 100] after each update, as CLIP
and ProtoCLIP clamp theirs (a cap on ``s`` instead would zero the gradient past it, and Adam's momentum
could carry the parameter above ln 100 to stay there); the loss is the mean of the
image->text and text->image cross-entropies against the diagonal. Under ``jit`` with the batch split
over devices, each device holds its rows of the [B, B] logits and the text embeddings of the whole
batch (XLA all-gathers the B x d matrix, as CLIP's ``gather_with_grad``): the negatives are the global
batch, whatever the device count, so the loss is the same on 1 or N devices.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from mlcd_jax.losses.core import l2_normalize
from mlcd_jax.sharding import constrain

MAX_LOGIT_SCALE = 100.0
LOG_SCALE_RANGE = (0.0, math.log(MAX_LOGIT_SCALE))  # where the trainer keeps a log temperature
INIT_LOG_SCALE = math.log(1 / 0.07)  # CLIP's initial temperature 0.07


def logit_scale(log_scale: jax.Array) -> jax.Array:
    """``exp(log_scale)`` in float32: the parameter, not the scale, is bounded (:data:`LOG_SCALE_RANGE`)."""
    return jnp.exp(log_scale.astype(jnp.float32))


def contrastive_loss(
    image_embeddings: jax.Array, text_embeddings: jax.Array, log_scale: jax.Array
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Symmetric InfoNCE of paired rows; returns ``(loss, metrics)``.

    Metrics: ``loss_i2t`` / ``loss_t2i`` (the two directions), ``i2t_top1`` / ``t2i_top1`` (in-batch
    retrieval accuracy), ``mean_pos_cos`` / ``mean_neg_cos`` (matched / unmatched pairs) and
    ``logit_scale``.
    """
    if image_embeddings.shape != text_embeddings.shape or image_embeddings.ndim != 2:
        raise ValueError(
            f"image and text embeddings must both be [B, d]; got {image_embeddings.shape} and {text_embeddings.shape}"
        )
    img = l2_normalize(image_embeddings.astype(jnp.float32))
    txt = l2_normalize(text_embeddings.astype(jnp.float32))
    cos = constrain(img @ txt.T, "activation_batch", None)  # rows with their images, all texts
    scale = logit_scale(log_scale)
    logits = scale * cos
    batch = img.shape[0]
    diag = jnp.eye(batch, dtype=bool)
    loss_i2t = -jnp.mean(jnp.sum(jnp.where(diag, jax.nn.log_softmax(logits, axis=1), 0.0), axis=1))
    loss_t2i = -jnp.mean(jnp.sum(jnp.where(diag, jax.nn.log_softmax(logits, axis=0), 0.0), axis=0))
    targets = jnp.arange(batch)
    pos = jnp.sum(jnp.where(diag, cos, 0.0)) / batch
    neg = jnp.sum(jnp.where(diag, 0.0, cos)) / max(batch * (batch - 1), 1)
    metrics = {
        "loss_i2t": loss_i2t,
        "loss_t2i": loss_t2i,
        "i2t_top1": jnp.mean(jnp.argmax(logits, axis=1) == targets),
        "t2i_top1": jnp.mean(jnp.argmax(logits, axis=0) == targets),
        "mean_pos_cos": pos,
        "mean_neg_cos": neg,
        "logit_scale": scale,
    }
    return (loss_i2t + loss_t2i) / 2, metrics
