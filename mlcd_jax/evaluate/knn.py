"""Weighted k-nearest-neighbour classification on frozen features (InstDisc / DINO protocol).

Features are L2-normalised, similarity is the cosine, and each of the k nearest training samples votes
for its label with weight ``exp(cos / T)``. The test set is processed in fixed-size batches, so memory is
one ``batch_size × N_train`` similarity block at a time and a single compiled program serves every batch.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from mlcd_jax.losses import l2_normalize


def check_features(name: str, features: np.ndarray) -> np.ndarray:
    """``features`` as a non-empty numeric [N, d] array, or a ValueError naming ``name``."""
    features = np.asarray(features)
    if features.ndim != 2 or features.shape[0] == 0 or features.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty [N, d] array, got shape {features.shape}")
    if not np.issubdtype(features.dtype, np.number):
        raise ValueError(f"{name} must be numeric, got dtype {features.dtype}")
    return features


def check_labels(name: str, labels: np.ndarray, n: int) -> np.ndarray:
    """``labels`` as [n] non-negative integer class ids, or a ValueError naming ``name``."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) != n:
        raise ValueError(f"{name} must be a 1-D array of {n} labels (one per feature row), got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{name} must hold integer class ids, got dtype {labels.dtype}")
    if n and labels.min() < 0:
        raise ValueError(f"{name} must be non-negative class ids, got min {labels.min()}")
    return labels


@functools.partial(jax.jit, static_argnames=("k",))
def _top_k_neighbours(test: jax.Array, train: jax.Array, *, k: int) -> tuple[jax.Array, jax.Array]:
    """Cosines and indices [b, k] of the k nearest rows of the L2-normalised ``train`` for one test batch."""
    # HIGHEST: accelerators would otherwise round the cosine to bf16/TF32 and reorder near neighbours.
    sims = jnp.matmul(l2_normalize(test), train.T, precision=jax.lax.Precision.HIGHEST)
    return jax.lax.top_k(sims, k)


def _vote(top_sim: np.ndarray, top_labels: np.ndarray, temperature: float, num_classes: int) -> np.ndarray:
    """Argmax of the per-class sums of ``exp(cos / T)`` over the neighbours (ties: smaller class id).

    Done in numpy on the small [b, k] result: an XLA scatter-add fused behind top_k ran 30x slower on CPU.
    """
    # Subtracting the row maximum keeps exp() finite for small T without changing the argmax.
    weights = np.exp((top_sim - top_sim[:, :1]) / np.float32(temperature))
    votes = np.zeros((len(top_sim), num_classes), np.float64)
    np.add.at(votes, (np.arange(len(top_sim))[:, None], top_labels), weights)
    return votes.argmax(axis=-1)


def knn_classify(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    *,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    batch_size: int = 1024,
) -> np.ndarray:
    """Predicted labels [N_test] by a temperature-weighted vote of the k most cosine-similar train samples.

    Ties in the vote go to the smaller class id. ``num_classes`` defaults to ``max(train_labels) + 1``.
    """
    train_features = check_features("train_features", train_features)
    test_features = check_features("test_features", test_features)
    train_labels = check_labels("train_labels", train_labels, len(train_features))
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(
            f"train and test features differ in width ({train_features.shape[1]} vs {test_features.shape[1]}); "
            "extract both with the same model"
        )
    if not 1 <= k <= len(train_features):
        raise ValueError(f"k={k} must be between 1 and the number of train samples ({len(train_features)})")
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    min_classes = int(train_labels.max()) + 1
    num_classes = min_classes if num_classes is None else num_classes
    if num_classes < min_classes:
        raise ValueError(
            f"num_classes={num_classes} is too small for train label {min_classes - 1}; pass >= {min_classes}"
        )

    train = l2_normalize(jnp.asarray(train_features, jnp.float32))
    batch_size = min(batch_size, len(test_features))
    preds = []
    for start in range(0, len(test_features), batch_size):
        chunk = np.asarray(test_features[start : start + batch_size], np.float32)
        n = len(chunk)
        if n < batch_size:  # pad the last batch so every batch reuses one compiled program
            chunk = np.concatenate([chunk, np.ones((batch_size - n, chunk.shape[1]), np.float32)])
        top_sim, top_idx = (np.asarray(a)[:n] for a in _top_k_neighbours(chunk, train, k=k))
        preds.append(_vote(top_sim, train_labels[top_idx], temperature, num_classes))
    return np.concatenate(preds).astype(train_labels.dtype)


def knn_accuracy(train_f: np.ndarray, train_y: np.ndarray, test_f: np.ndarray, test_y: np.ndarray, **kw) -> float:
    """Top-1 accuracy in [0, 1] of :func:`knn_classify` (keyword arguments are passed through)."""
    test_f = check_features("test_features", test_f)
    test_y = check_labels("test_labels", test_y, len(test_f))
    return float(np.mean(knn_classify(train_f, train_y, test_f, **kw) == test_y))
