"""Shared math of the cluster-discrimination losses, written once for the dense and the sharded head.

Every loss here is a function of a cosine matrix ``c`` [B, S] (S = prototypes this device sees) and two
boolean masks over it: positives and (sampled) negatives. Row-wise log-sum-exps are built from per-device
partial results (a max and a sum of exponentials) joined by ``pmax`` / ``psum`` callables: identity for the
dense reference, collectives over the mesh for the sharded head. So both paths run the same arithmetic and
agree to float tolerance, and nothing of size B x k is ever needed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp

Kind = Literal["mlcd", "mlc", "softmax"]
MarginType = Literal["cosine", "angular"]
KINDS: tuple[str, ...] = ("mlcd", "mlc", "softmax")
Reduce = Callable[[jax.Array], jax.Array]

# Histograms of positive / negative cosine (the paper's Fig. 3 analogue) use these bins on [-1, 1].
COS_HIST_BINS = 40


def identity(x: jax.Array) -> jax.Array:
    """The cross-device reduction of the single-device (dense) path."""
    return x


def check_kind(kind: str, margin_type: str | None) -> MarginType:
    """Validates ``kind`` and returns the margin form: cosine for mlcd/mlc, angular (ArcFace) for softmax."""
    if kind not in KINDS:
        raise ValueError(f"unknown loss kind {kind!r}; choose one of {KINDS}")
    resolved = margin_type or ("angular" if kind == "softmax" else "cosine")
    if resolved not in ("cosine", "angular"):
        raise ValueError(f"unknown margin_type {margin_type!r}; choose 'cosine' or 'angular'")
    return resolved  # type: ignore[return-value]


def check_labels(embeddings: jax.Array, prototypes: jax.Array, labels: jax.Array) -> None:
    """Shape checks with messages that name the offending shapes."""
    if embeddings.ndim != 2 or prototypes.ndim != 2:
        raise ValueError(
            f"embeddings must be [B, d] and prototypes [k, d]; got {embeddings.shape} and {prototypes.shape}"
        )
    if embeddings.shape[1] != prototypes.shape[1]:
        raise ValueError(
            f"embedding dim {embeddings.shape[1]} != prototype dim {prototypes.shape[1]}"
        )
    if labels.ndim != 2 or labels.shape[0] != embeddings.shape[0]:
        raise ValueError(
            f"labels must be int [B, l] with B = {embeddings.shape[0]}; got shape {labels.shape}"
        )
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"labels must be integers (-1 = padding); got dtype {labels.dtype}")


def task_labels(labels: jax.Array, kind: str) -> jax.Array:
    """The labels a kind uses: all l columns for mlcd/mlc, the top-1 column for softmax."""
    return labels[:, :1] if kind == "softmax" else labels


def labels_per_sample(kind: str, top_l: int) -> int:
    """How many of a sample's ``top_l`` labels ``kind`` uses (:func:`task_labels`)."""
    return 1 if kind == "softmax" else top_l


def local_rows(labels: jax.Array, offset: int | jax.Array, num_rows: int) -> jax.Array:
    """Each label's row in the shard ``[offset, offset + num_rows)``; ``num_rows`` for padding (-1) and ids
    outside it, so an ``.at[...].set(..., mode="drop")`` or a lookup in a table of ``num_rows + 1``
    entries ignores them. The one place that decides which labels a shard owns."""
    local = labels - offset
    return jnp.where((labels >= 0) & (local >= 0) & (local < num_rows), local, num_rows)


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """Row-wise L2 normalisation in fp32 (bf16 inputs are upcast first)."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps))


def cosine(e_normed: jax.Array, w: jax.Array, compute_dtype: jnp.dtype) -> jax.Array:
    """``e · normalise(w)ᵀ`` with inputs in ``compute_dtype`` (bf16 stays bf16 on the MXU) and fp32 output."""
    w_normed = l2_normalize(w).astype(compute_dtype)
    return jnp.einsum(
        "bd,kd->bk", e_normed.astype(compute_dtype), w_normed, preferred_element_type=jnp.float32
    )


def positive_cosine(c: jax.Array, margin: float, margin_type: MarginType) -> jax.Array:
    """Cosine with the positive-class margin: ``c - m`` (cosine) or ``cos(θ + m)`` (ArcFace, θ + m ≤ π)."""
    if margin == 0.0:
        return c
    if margin_type == "cosine":
        return c - margin
    theta = jnp.arccos(jnp.clip(c, -1.0 + 1e-6, 1.0 - 1e-6))
    return jnp.cos(jnp.minimum(theta + margin, jnp.pi))


def masked_logsumexp(
    x: jax.Array, mask: jax.Array, pmax: Reduce, psum: Reduce
) -> tuple[jax.Array, jax.Array]:
    """Row-wise ``log Σ_{mask} exp(x)`` over all devices; returns ``(lse, nonempty)``.

    Rows whose mask is empty everywhere give ``lse = 0`` and ``nonempty = False`` (callers drop them), so
    no ``-inf`` or NaN reaches the gradients. The shift is the global row max, stopped from gradient.
    """
    local_max = jnp.max(jnp.where(mask, x, -jnp.inf), axis=-1)
    row_max = pmax(jax.lax.stop_gradient(local_max))
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    shifted = jnp.where(mask, x, row_max[:, None]) - row_max[:, None]
    total = psum(jnp.sum(jnp.where(mask, jnp.exp(shifted), 0.0), axis=-1))
    nonempty = total > 0
    return row_max + jnp.log(jnp.where(nonempty, total, 1.0)), nonempty


def _soft(lse: jax.Array, nonempty: jax.Array) -> jax.Array:
    """``log(1 + Σ exp)`` from a masked log-sum-exp (0 for an empty set)."""
    return jnp.where(nonempty, jax.nn.softplus(lse), 0.0)


def _masked_mean(values: jax.Array, mask: jax.Array, psum: Reduce) -> jax.Array:
    return psum(jnp.sum(jnp.where(mask, values, 0.0))) / jnp.maximum(psum(jnp.sum(mask)), 1)


def _histogram(values: jax.Array, mask: jax.Array, psum: Reduce) -> jax.Array:
    bins = jnp.clip(((values + 1.0) * (COS_HIST_BINS / 2)).astype(jnp.int32), 0, COS_HIST_BINS - 1)
    counts = jax.ops.segment_sum(mask.ravel().astype(jnp.float32), bins.ravel(), COS_HIST_BINS)
    return psum(counts)


def loss_from_cosines(
    c: jax.Array,
    pos: jax.Array,
    neg: jax.Array,
    *,
    kind: str,
    scale: float,
    margin: float,
    margin_type: MarginType,
    pmax: Reduce = identity,
    psum: Reduce = identity,
    histograms: bool = False,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Batch-mean loss and metrics from cosines ``c`` [B, S] and positive / negative masks [B, S].

    - ``mlcd`` (Eq. 5): ``log(1 + Σ_pos exp(-z_i)) + log(1 + Σ_neg exp(z_j))``
    - ``mlc``  (Eq. 4): ``log(1 + Σ_neg Σ_pos exp(z_j - z_i))``
    - ``softmax``: cross-entropy of the single positive against positives ∪ negatives (rows without a
      positive are left out of the mean).
    with ``z_pos = scale · margin(c)`` and ``z_neg = scale · c``. Metrics always report the two MLCD terms
    and the mean positive / negative cosine, so the kinds can be compared on the same curves.
    """
    z_pos = scale * positive_cosine(c, margin, margin_type)
    z_neg = scale * c
    lse_pos, has_pos = masked_logsumexp(-z_pos, pos, pmax, psum)
    lse_neg, has_neg = masked_logsumexp(z_neg, neg, pmax, psum)
    loss_pos, loss_neg = _soft(lse_pos, has_pos), _soft(lse_neg, has_neg)
    if kind == "mlcd":
        row_loss, row_valid = loss_pos + loss_neg, jnp.ones_like(has_pos)
    elif kind == "mlc":
        row_loss = jnp.where(has_pos & has_neg, jax.nn.softplus(lse_pos + lse_neg), 0.0)
        row_valid = jnp.ones_like(has_pos)
    else:
        logits = jnp.where(pos, z_pos, z_neg)
        lse_all, _ = masked_logsumexp(logits, pos | neg, pmax, psum)
        target = psum(jnp.sum(jnp.where(pos, z_pos, 0.0), axis=-1))
        row_loss, row_valid = jnp.where(has_pos, lse_all - target, 0.0), has_pos
    loss = jnp.sum(row_loss) / jnp.maximum(jnp.sum(row_valid), 1)
    metrics = {
        "loss_pos": jnp.mean(loss_pos),
        "loss_neg": jnp.mean(loss_neg),
        "mean_pos_cos": _masked_mean(c, pos, psum),
        "mean_neg_cos": _masked_mean(c, neg, psum),
    }
    if histograms:
        metrics["pos_cos_hist"] = _histogram(c, pos, psum)
        metrics["neg_cos_hist"] = _histogram(c, neg, psum)
    return loss, metrics
