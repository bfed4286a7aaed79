"""ProtoCLIP's episodes on the host: per-modality k-means of an episode's features, and an offline
external teacher (NumPy, faiss, scikit-learn).

Each episode samples ``episode_size`` pairs with replacement (:func:`mlcd_jax.data.order.sample_episode`,
as the released ``main.py``: ``np.random.choice(dataset_size, episode_size, replace=True)``); its projected features are clustered per
modality (released ``Clustering.kmeans``: faiss k-means, 20 iterations, nredo 3, top-1 assignment), and
an external text-only teacher's features are clustered the same way. The losses that use the result
are in :mod:`mlcd_jax.losses.protoclip`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mlcd_jax.cluster import kmeans


def cluster_features(
    features: np.ndarray, k: int, *, iterations: int = 20, nredo: int = 3, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Spherical k-means of ``features`` [N, d]; returns unit ``centroids`` [k, d] float32 and top-1
    ``labels`` [N] int32 (the nearest centroid by cosine).

    Rows are L2-normalised first (NaNs become 0, as the released code does). Uses the project's
    :func:`mlcd_jax.cluster.kmeans.spherical_kmeans` (faiss, inner product, empty clusters re-seeded);
    it has no ``nredo``, so each of the ``nredo`` runs starts from its own seed (``seed + r *
    iterations``, iteration i of run r using ``seed + r * iterations + i``) and the run with the highest
    mean cosine to the nearest centroid is kept (as faiss's ``nredo``). Deterministic for a given seed.
    """
    if features.ndim != 2:
        raise ValueError(f"features must be [N, d]; got shape {features.shape}")
    if nredo < 1 or iterations < 1:
        raise ValueError(f"iterations and nredo must be >= 1; got {iterations} and {nredo}")
    x = kmeans.l2_normalize(np.nan_to_num(np.asarray(features, np.float32)))
    best, best_quality = None, -np.inf
    for r in range(nredo):
        centroids, _ = kmeans.spherical_kmeans(x, k, iterations, seed + r * iterations)
        quality = kmeans.mean_cosine_to_nearest(x, centroids)
        if quality > best_quality:
            best, best_quality = centroids, quality
    _, nearest = kmeans.build_index(best, "flat").search(np.ascontiguousarray(x), 1)
    return np.ascontiguousarray(best, np.float32), nearest[:, 0].astype(np.int32)


def tfidf_teacher(captions: Sequence[str], dim: int = 64, seed: int = 0) -> np.ndarray:
    """An offline external teacher: TF-IDF of ``captions`` reduced to ``dim`` by truncated SVD (LSA),
    rows L2-normalised, float32 [N, dim'].

    Fit on the given captions. ``dim' = min(dim, vocabulary - 1, N)`` (truncated SVD needs fewer
    components than terms, and yields at most N); when that is < 1, the TF-IDF rows themselves are
    returned.
    Identical captions get identical rows.
    """
    from sklearn.decomposition import TruncatedSVD
    from sklearn.feature_extraction.text import TfidfVectorizer

    if len(captions) == 0:
        raise ValueError("tfidf_teacher needs at least one caption")
    tfidf = TfidfVectorizer().fit_transform(list(captions))  # raises on an empty vocabulary
    n, vocab = tfidf.shape
    components = min(dim, vocab - 1, n)
    if components < 1:
        return kmeans.l2_normalize(tfidf.toarray())
    reduced = TruncatedSVD(n_components=components, random_state=seed).fit_transform(tfidf)
    return kmeans.l2_normalize(reduced)
