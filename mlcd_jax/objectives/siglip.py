"""SigLIP (``loss.kind=siglip``; Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training"): both
towers from scratch with the pairwise sigmoid loss, a learnable temperature and a learnable bias.

``L = -1/B · Σ_i Σ_j log σ(y_ij · (t · cos(x_i, y_j) + b))``, ``y_ij`` = 1 for a matched pair, -1 otherwise:
every image–text pair of the global batch is a binary problem, normalised by the batch size as the
paper's pseudo-code. ``t = exp(logit_scale)``, its parameter kept in [0, ln 100] as CLIP's temperature
(:func:`mlcd_jax.losses.contrastive.logit_scale`); initialised as big_vision's SigLIP: ``t = 10``
(``logit_scale`` = ln 10, unless ``loss.init_logit_scale`` says otherwise) and ``b = loss.init_logit_bias``
(-10), both in the optimizer's ``scale`` group (no weight decay, not clipped).

Over the global batch without a B×B matrix on any device (big_vision's chunked sigmoid loss): each
device scores its image shard against its own text shard (the positives on the diagonal), then passes
its text shard to the next device around the ring (``jax.lax.ppermute`` inside ``shard_map``), N-1
times, scoring the negatives each text shard brings; the partial sums meet in one ``psum``.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh, PartitionSpec as P

from mlcd_jax import sharding
from mlcd_jax.losses import l2_normalize
from mlcd_jax.losses.contrastive import logit_scale
from mlcd_jax.objectives.base import register
from mlcd_jax.objectives.contrastive import ImageText


def sigmoid_loss(
    image_embeddings: jax.Array, text_embeddings: jax.Array, log_scale: jax.Array, bias: jax.Array, *,
    mesh: Mesh, batch_axes: tuple[str, ...],
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """SigLIP's loss of paired rows [B, d] split over ``batch_axes`` of ``mesh`` (``()``: one block);
    returns ``(loss, metrics)``.

    Metrics: ``loss_pos`` / ``loss_neg`` (the matched / unmatched pairs' share of the loss),
    ``mean_pos_cos`` / ``mean_neg_cos``, ``logit_scale`` (t) and ``logit_bias`` (b).
    """
    if image_embeddings.shape != text_embeddings.shape or image_embeddings.ndim != 2:
        raise ValueError(
            f"image and text embeddings must both be [B, d]; got {image_embeddings.shape} and {text_embeddings.shape}"
        )
    batch = image_embeddings.shape[0]
    n = math.prod(mesh.shape[a] for a in batch_axes)
    ring = [(i, (i + 1) % n) for i in range(n)]

    def psum(x: jax.Array) -> jax.Array:
        return jax.lax.psum(x, batch_axes) if batch_axes else x

    def shard_fn(img, txt, log_t, b):
        img, txt = l2_normalize(img.astype(jnp.float32)), l2_normalize(txt.astype(jnp.float32))
        t = logit_scale(log_t)
        cos = img @ txt.T
        diag = jnp.eye(img.shape[0], dtype=bool)
        pos_loss = -jnp.sum(jnp.where(diag, jax.nn.log_sigmoid(t * cos + b), 0.0))
        neg_loss = -jnp.sum(jnp.where(diag, 0.0, jax.nn.log_sigmoid(-(t * cos + b))))
        pos_cos, neg_cos = jnp.sum(jnp.where(diag, cos, 0.0)), jnp.sum(jnp.where(diag, 0.0, cos))
        for _ in range(n - 1):  # the next device's text shard: all negatives
            txt = jax.lax.ppermute(txt, batch_axes, ring)
            cos = img @ txt.T
            neg_loss -= jnp.sum(jax.nn.log_sigmoid(-(t * cos + b)))
            neg_cos += jnp.sum(cos)
        pos_loss, neg_loss = psum(pos_loss) / batch, psum(neg_loss) / batch
        metrics = {
            "loss_pos": pos_loss, "loss_neg": neg_loss,
            "mean_pos_cos": psum(pos_cos) / batch, "mean_neg_cos": psum(neg_cos) / max(batch * (batch - 1), 1),
            "logit_scale": t, "logit_bias": b,
        }
        return pos_loss + neg_loss, metrics

    spec = P(batch_axes or None)
    return jax.shard_map(shard_fn, mesh=mesh, in_specs=(spec, spec, P(), P()), out_specs=(P(), P()))(
        image_embeddings, text_embeddings, log_scale, bias
    )


@register
class SigLIP(ImageText):
    """Both towers, the temperature and the bias from scratch, with the sigmoid loss."""

    kinds = ("siglip",)
    trainable = ("params", "text", "logit_scale", "logit_bias")
    groups = {"params": "backbone", "text": "backbone", "logit_scale": "scale", "logit_bias": "scale"}
    init_log_scale = math.log(10.0)

    @classmethod
    def row_name(cls, config: ml_collections.ConfigDict) -> str:
        return "SigLIP ViT"

    def init(self, keys: tuple[jax.Array, jax.Array]) -> dict[str, Any]:
        return {**super().init(keys), "logit_bias": jnp.asarray(self.config.loss.init_logit_bias, jnp.float32)}

    def loss(self, tensors: dict[str, Any], image: jax.Array, batch: dict[str, jax.Array],
             key: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        return sigmoid_loss(image, self.encode_text(tensors, batch), tensors["logit_scale"], tensors["logit_bias"],
                            mesh=self.mesh, batch_axes=sharding.batch_axes(self.mesh, self.rules))

    def log_terms(self, scalars: dict[str, Any]) -> str:
        return (f"pos {scalars['loss_pos']:.3f} neg {scalars['loss_neg']:.3f}, scale {scalars['logit_scale']:.1f} "
                f"bias {scalars['logit_bias']:.1f}")
