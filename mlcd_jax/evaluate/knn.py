"""Weighted k-nearest-neighbour classification on frozen features (InstDisc / DINO protocol).

Features are L2-normalised, similarity is the cosine, and each of the k nearest training samples votes
for its label with weight ``exp(cos / T)``. The test set is processed in fixed-size batches of queries,
each against the train features in blocks of rows with a running top-k on the device, so memory beyond
the features is one ``batch_size × train_block`` similarity block and the ``batch_size × k`` running
result (not ``N_test × N_train``), and a single compiled program serves every batch.
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
def _top_k_neighbours(
    test: jax.Array, train: jax.Array, num_train: jax.Array, *, k: int
) -> tuple[jax.Array, jax.Array]:
    """Cosines and indices [b, k] of the k nearest of the first ``num_train`` rows of the L2-normalised
    ``train`` [blocks, rows, d] for one test batch: a running top-k merged with each block's top-k, so
    memory is one [b, rows] similarity block. Ties go to the smaller train index, as one top_k over all
    rows does (top_k keeps the earlier of equal values, and the running top-k holds earlier rows)."""
    test = l2_normalize(test)
    rows = train.shape[1]

    def merge(best: tuple[jax.Array, jax.Array], block: tuple[jax.Array, jax.Array]) -> tuple[tuple, None]:
        features, start = block
        # HIGHEST: accelerators would otherwise round the cosine to bf16/TF32 and reorder near neighbours.
        sims = jnp.matmul(test, features.T, precision=jax.lax.Precision.HIGHEST)
        index = start + jnp.arange(rows, dtype=jnp.int32)
        sims, index = jax.lax.top_k(jnp.where(index < num_train, sims, -jnp.inf), min(k, rows))
        sims, index = jnp.concatenate([best[0], sims], 1), jnp.concatenate([best[1], start + index], 1)
        top, where = jax.lax.top_k(sims, k)
        return (top, jnp.take_along_axis(index, where, 1)), None

    start = (jnp.full((len(test), k), -jnp.inf, test.dtype), jnp.zeros((len(test), k), jnp.int32))
    starts = jnp.arange(train.shape[0], dtype=jnp.int32) * rows
    return jax.lax.scan(merge, start, (train, starts))[0]


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
    train_block: int = 8192,
) -> np.ndarray:
    """Predicted labels [N_test] by a temperature-weighted vote of the k most cosine-similar train samples.

    Ties in the vote go to the smaller class id. ``num_classes`` defaults to ``max(train_labels) + 1``.
    Queries go in batches of ``batch_size`` against the train rows in blocks of at most ``train_block``.
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
    if batch_size < 1 or train_block < 1:
        raise ValueError(f"batch_size={batch_size} and train_block={train_block} must be >= 1")
    min_classes = int(train_labels.max()) + 1
    num_classes = min_classes if num_classes is None else num_classes
    if num_classes < min_classes:
        raise ValueError(
            f"num_classes={num_classes} is too small for train label {min_classes - 1}; pass >= {min_classes}"
        )

    num_blocks = -(-len(train_features) // train_block)
    train_block = -(-len(train_features) // num_blocks)  # equal blocks: at most num_blocks - 1 padded rows
    blocks = np.pad(np.asarray(train_features, np.float32), ((0, -len(train_features) % train_block), (0, 0)))
    train = l2_normalize(jnp.asarray(blocks)).reshape(-1, train_block, blocks.shape[1])
    num_train = jnp.int32(len(train_features))
    batch_size = min(batch_size, len(test_features))
    preds = []
    for start in range(0, len(test_features), batch_size):
        chunk = np.asarray(test_features[start : start + batch_size], np.float32)
        n = len(chunk)
        if n < batch_size:  # pad the last batch so every batch reuses one compiled program
            chunk = np.concatenate([chunk, np.ones((batch_size - n, chunk.shape[1]), np.float32)])
        top_sim, top_idx = (np.asarray(a)[:n] for a in _top_k_neighbours(chunk, train, num_train, k=k))
        preds.append(_vote(top_sim, train_labels[top_idx], temperature, num_classes))
    return np.concatenate(preds).astype(train_labels.dtype)


def knn_accuracy(train_f: np.ndarray, train_y: np.ndarray, test_f: np.ndarray, test_y: np.ndarray, **kw) -> float:
    """Top-1 accuracy in [0, 1] of :func:`knn_classify` (keyword arguments are passed through)."""
    test_f = check_features("test_features", test_f)
    test_y = check_labels("test_labels", test_y, len(test_f))
    return float(np.mean(knn_classify(train_f, train_y, test_f, **kw) == test_y))
