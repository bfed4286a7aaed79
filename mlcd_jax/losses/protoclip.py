"""ProtoCLIP's losses (Chen et al. 2022): prototype-level discrimination between image and text spaces.

Each episode, the L2-normalised projection-head outputs of the episode's pairs are clustered per
modality on the host (:mod:`mlcd_jax.objectives.protoclip`, which owns the episodes). The loss pieces
here are pure and jit-able with static shapes:

- :func:`back_translate` (Prototypical Back Translation, PBT): the student's classifier for one modality
  is the mean of *its own* features over the *other* modality's clusters, so grouping is learned
  without asking the two spaces to be aligned (robust to the modality gap).
- :func:`soft_targets`: the teacher's targets, ``softmax(c[label] · cᵀ / T)`` over its k-means centroids.
- :func:`proto_loss`: cross-entropy of ``s · f · prototypesᵀ`` (``s`` learned, its log kept in
  [0, ln 100]) against soft targets or hard labels; empty clusters are masked out of the softmax.
- :func:`protoclip_loss`: ``w_clip · InfoNCE + w_proto · ½(i->t + t->i) + w_ext · ½(ext_i + ext_t)``.

Follows the released code (github.com/megvii-research/protoclip): ``training/clustering.py``
(``Clustering.PBT``, ``Clustering.kmeans``), ``training/loss.py`` (``ProtoLoss.forward``) and
``training/train.py`` (``train_one_epoch``: which centroids and labels each term uses). Two deliberate
differences: PBT prototypes are L2-normalised here (the released means are not), and an empty
cluster's row is masked out of the softmax and the targets (the released zero row still takes part
with logit 0).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from mlcd_jax.losses.contrastive import contrastive_loss, logit_scale
from mlcd_jax.losses.core import l2_normalize

TARGET_TEMPERATURE = 0.01  # the released runs' --target-temperature


def back_translate(
    features: jax.Array, other_labels: jax.Array, num_clusters: int, *, normalize: bool = True
) -> tuple[jax.Array, jax.Array]:
    """PBT prototypes: row ``c`` is the mean of ``features`` [N, d] over rows with ``other_labels == c``.

    ``other_labels`` [N] are the *other* modality's (or the external teacher's) cluster ids; ids outside
    ``[0, num_clusters)`` (e.g. -1) are ignored. Returns ``(prototypes [k, d] float32, mask [k] bool)``:
    means L2-normalised (``normalize``), and an empty cluster gives a zero row with ``mask`` False.
    """
    if features.ndim != 2 or other_labels.shape != features.shape[:1]:
        raise ValueError(f"features must be [N, d] and labels [N]; got {features.shape} and {other_labels.shape}")
    k = int(num_clusters)
    valid = (other_labels >= 0) & (other_labels < k)
    segment = jnp.where(valid, other_labels, k)  # k = a drop bucket
    sums = jax.ops.segment_sum(features.astype(jnp.float32), segment, num_segments=k + 1)[:k]
    counts = jax.ops.segment_sum(valid.astype(jnp.float32), segment, num_segments=k + 1)[:k]
    mask = counts > 0
    means = sums / jnp.maximum(counts, 1.0)[:, None]
    prototypes = l2_normalize(means) if normalize else means
    return jnp.where(mask[:, None], prototypes, 0.0), mask


def soft_targets(
    teacher_centroids: jax.Array,
    labels: jax.Array,
    temperature: float = TARGET_TEMPERATURE,
    mask: jax.Array | None = None,
) -> jax.Array:
    """``softmax(c[labels] · cᵀ / temperature)`` [B, k]: each sample's cluster, smoothed over similar ones.

    ``teacher_centroids`` [k, d] are the teacher modality's k-means centroids and ``labels`` [B] the
    pairs' clusters in it (negative ids are clipped to 0; :func:`proto_loss` ignores such rows only for
    hard labels). Classes with ``mask`` False get no target mass (their student prototype is empty).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 (use hard labels instead); got {temperature}")
    c = teacher_centroids.astype(jnp.float32)
    scores = c[jnp.clip(labels, 0, c.shape[0] - 1)] @ c.T / temperature
    if mask is not None:
        scores = jnp.where(mask[None, :], scores, -jnp.inf)
    return jax.nn.softmax(scores, axis=-1)


def proto_loss(
    features: jax.Array,
    prototypes: jax.Array,
    targets: jax.Array,
    log_scale: jax.Array,
    mask: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Cross-entropy of ``logits = s · normalise(features) · prototypesᵀ`` against ``targets``.

    ``features`` [B, d] (L2-normalised here), ``prototypes`` [k, d] and ``targets`` fixed for the episode
    (no gradient). ``targets`` is either soft [B, k] float (:func:`soft_targets`) or hard labels [B] int
    (rows with a label < 0 or on a masked class are left out of the mean, as torch's ``ignore_index=-1``).
    ``s = exp(log_scale)``, its parameter kept in [0, ln 100] by the trainer. ``mask`` [k] (False =
    empty cluster) drops classes from the softmax. Metrics: ``loss``, ``top1`` (argmax logit vs label / argmax target), ``logit_scale``,
    ``active_prototypes``.
    """
    if features.ndim != 2 or prototypes.ndim != 2 or features.shape[1] != prototypes.shape[1]:
        raise ValueError(f"features must be [B, d] and prototypes [k, d]; got {features.shape} and {prototypes.shape}")
    batch, k = features.shape[0], prototypes.shape[0]
    hard = targets.ndim == 1
    if targets.shape != ((batch,) if hard else (batch, k)):
        raise ValueError(f"targets must be labels [{batch}] or soft targets [{batch}, {k}]; got {targets.shape}")
    if hard and not jnp.issubdtype(targets.dtype, jnp.integer):
        raise ValueError(f"hard labels must be integers; got dtype {targets.dtype}")
    mask = jnp.ones((k,), bool) if mask is None else mask.astype(bool)
    scale = logit_scale(log_scale)
    protos = jax.lax.stop_gradient(prototypes.astype(jnp.float32))
    logits = jnp.where(mask[None, :], scale * (l2_normalize(features) @ protos.T), -jnp.inf)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    pred = jnp.argmax(logits, axis=-1)
    if hard:
        label = jnp.clip(targets, 0, k - 1)
        valid = (targets >= 0) & (targets < k) & mask[label]
        nll = -jnp.take_along_axis(log_probs, label[:, None], axis=-1)[:, 0]
        count = jnp.maximum(jnp.sum(valid), 1)
        loss = jnp.sum(jnp.where(valid, nll, 0.0)) / count
        top1 = jnp.sum(valid & (pred == label)) / count
    else:
        t = jax.lax.stop_gradient(targets.astype(jnp.float32))
        loss = -jnp.mean(jnp.sum(jnp.where(mask[None, :], t * log_probs, 0.0), axis=-1))
        top1 = jnp.mean(pred == jnp.argmax(t, axis=-1))
    metrics = {"loss": loss, "top1": top1, "logit_scale": scale, "active_prototypes": jnp.sum(mask)}
    return loss, metrics


class EpisodePrototypes(NamedTuple):
    """One episode's fixed classifiers and teachers (a pytree; the external fields may be None).

    - ``image_prototypes`` / ``image_mask``: image features averaged over *text* clusters (student of i->t).
    - ``text_prototypes`` / ``text_mask``: text features averaged over *image* clusters (student of t->i).
    - ``text_centroids`` / ``image_centroids``: k-means centroids, the teachers of i->t / t->i.
    - ``image_ext_*`` / ``text_ext_*``: each modality's features averaged over the external teacher's
      clusters (the released ``*_centroids_translated_from_external_prototypes``).
    """

    image_prototypes: jax.Array
    image_mask: jax.Array
    text_prototypes: jax.Array
    text_mask: jax.Array
    text_centroids: jax.Array
    image_centroids: jax.Array
    image_ext_prototypes: jax.Array | None = None
    image_ext_mask: jax.Array | None = None
    text_ext_prototypes: jax.Array | None = None
    text_ext_mask: jax.Array | None = None


def episode_prototypes(
    image_features: jax.Array,
    text_features: jax.Array,
    image_labels: jax.Array,
    text_labels: jax.Array,
    image_centroids: jax.Array,
    text_centroids: jax.Array,
    num_clusters: int,
    external_labels: jax.Array | None = None,
    num_external_clusters: int | None = None,
) -> EpisodePrototypes:
    """PBT for a whole episode, as the released ``main.py`` builds it after k-means.

    Inputs are the episode's projected features [N, d] and cluster labels [N] (image, text, and
    optionally the external teacher's, with ``num_external_clusters`` defaulting to ``num_clusters``).
    """
    image_protos, image_mask = back_translate(image_features, text_labels, num_clusters)
    text_protos, text_mask = back_translate(text_features, image_labels, num_clusters)
    ext: tuple = (None, None, None, None)
    if external_labels is not None:
        k_ext = num_clusters if num_external_clusters is None else num_external_clusters
        ext = (
            *back_translate(image_features, external_labels, k_ext),
            *back_translate(text_features, external_labels, k_ext),
        )
    return EpisodePrototypes(
        image_protos, image_mask, text_protos, text_mask,
        jnp.asarray(text_centroids, jnp.float32), jnp.asarray(image_centroids, jnp.float32), *ext,
    )


def protoclip_loss(
    image_embeddings: jax.Array,
    text_embeddings: jax.Array,
    log_scale: jax.Array,
    image_projected: jax.Array,
    text_projected: jax.Array,
    log_scale_proto: jax.Array,
    episode: EpisodePrototypes,
    image_labels: jax.Array,
    text_labels: jax.Array,
    external_labels: jax.Array | None = None,
    *,
    w_clip: float = 1.0,
    w_proto: float = 1.0,
    w_ext: float = 0.0,
    temperature: float = TARGET_TEMPERATURE,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """ProtoCLIP's total loss; returns ``(loss, metrics)`` with every term.

    ``image_embeddings`` / ``text_embeddings`` [B, D] feed CLIP's InfoNCE (temperature ``log_scale``);
    ``image_projected`` / ``text_projected`` [B, d] (projection heads) feed the prototype terms
    (temperature ``log_scale_proto``). ``image_labels`` / ``text_labels`` / ``external_labels`` [B] are
    the batch pairs' clusters in this episode. As the released ``train_one_epoch``:

    - i->t: image features vs ``image_prototypes``, soft targets from ``text_centroids[text_labels]``;
    - t->i: text features vs ``text_prototypes``, soft targets from ``image_centroids[image_labels]``;
    - external (hard labels ``external_labels``): image features vs ``image_ext_prototypes`` and text
      features vs ``text_ext_prototypes``; left out (reported as 0) without external labels.
    """
    has_ext = external_labels is not None and episode.image_ext_prototypes is not None
    if not has_ext and isinstance(w_ext, (int, float)) and w_ext != 0:
        raise ValueError(f"w_ext={w_ext} needs external_labels and the episode's external prototypes")
    clip, metrics = contrastive_loss(image_embeddings, text_embeddings, log_scale)
    targets_i2t = soft_targets(episode.text_centroids, text_labels, temperature, episode.image_mask)
    targets_t2i = soft_targets(episode.image_centroids, image_labels, temperature, episode.text_mask)
    i2t, m_i2t = proto_loss(image_projected, episode.image_prototypes, targets_i2t, log_scale_proto, episode.image_mask)
    t2i, m_t2i = proto_loss(text_projected, episode.text_prototypes, targets_t2i, log_scale_proto, episode.text_mask)
    proto = (i2t + t2i) / 2
    zero = jnp.zeros((), jnp.float32)
    ext_i, ext_t, top1_ext_i, top1_ext_t = zero, zero, zero, zero
    if has_ext:
        ext_i, m_ext_i = proto_loss(
            image_projected, episode.image_ext_prototypes, external_labels, log_scale_proto, episode.image_ext_mask
        )
        ext_t, m_ext_t = proto_loss(
            text_projected, episode.text_ext_prototypes, external_labels, log_scale_proto, episode.text_ext_mask
        )
        top1_ext_i, top1_ext_t = m_ext_i["top1"], m_ext_t["top1"]
    ext = (ext_i + ext_t) / 2
    loss = w_clip * clip + w_proto * proto + (w_ext * ext if has_ext else 0.0)
    metrics.update(
        loss=loss,
        loss_clip=clip,
        loss_proto=proto,
        loss_proto_i2t=i2t,
        loss_proto_t2i=t2i,
        proto_i2t_top1=m_i2t["top1"],
        proto_t2i_top1=m_t2i["top1"],
        loss_ext=ext,
        loss_ext_image=ext_i,
        loss_ext_text=ext_t,
        ext_image_top1=top1_ext_i,
        ext_text_top1=top1_ext_t,
        logit_scale_proto=m_i2t["logit_scale"],
    )
    return loss, metrics

