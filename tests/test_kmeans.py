"""k-means methods on real embeddings: weighted Lloyd steps, the hierarchical (two-level) variant, and
the clustering job with ``kmeans_method=hierarchical`` (quality, resume, settings checks)."""

import glob
import json

import ml_collections
import numpy as np
import pytest

from mlcd_jax import cluster
from mlcd_jax.cluster import kmeans
from mlcd_jax.cluster.teachers import PixelsTeacher
from mlcd_jax.data.sources import load_arrays


@pytest.fixture(scope="module")
def digits_embeddings() -> np.ndarray:
    """Unit pixel-PCA embeddings of scikit-learn's 1,797 digits (32-d)."""
    images, _ = load_arrays("digits", split="all")
    return kmeans.l2_normalize(PixelsTeacher.fit(images, 8, 32, seed=0)(images))


def test_weights_equal_repeated_rows(digits_embeddings):
    x = digits_embeddings[:300]
    w = np.random.default_rng(0).integers(1, 4, len(x))
    start = x[:10]
    weighted, _ = kmeans.lloyd_step(x, start, 10, seed=0, use_gpu=False, weights=w)
    repeated, _ = kmeans.lloyd_step(np.repeat(x, w, axis=0), start, 10, seed=0, use_gpu=False)
    np.testing.assert_allclose(weighted, repeated, atol=1e-5)
    unweighted, _ = kmeans.lloyd_step(x, start, 10, seed=0, use_gpu=False)
    assert np.abs(unweighted - weighted).max() > 1e-3


@pytest.mark.parametrize("parts", [2, 4])
def test_hierarchical_matches_flat_quality(digits_embeddings, parts):
    x, k = digits_embeddings, 32
    flat, _ = kmeans.spherical_kmeans(x, k, 10, seed=0)
    two_level, objectives = kmeans.hierarchical_kmeans(x, k, 10, seed=0, parts=parts)
    assert two_level.shape == (k, x.shape[1]) and len(objectives) == 10
    np.testing.assert_allclose(np.linalg.norm(two_level, axis=1), 1, atol=1e-5)
    q_flat = kmeans.mean_cosine_to_nearest(x, flat)
    q_two = kmeans.mean_cosine_to_nearest(x, two_level)
    # measured 0.787 (flat) vs 0.780 (2 parts) / 0.766 (4 parts); random centroids from x give ~0.67
    assert q_two > q_flat - 0.03
    assert q_two > kmeans.mean_cosine_to_nearest(x, x[np.random.default_rng(1).choice(len(x), k, replace=False)]) + 0.05


def test_hierarchical_needs_k_points_per_part(digits_embeddings):
    with pytest.raises(ValueError, match="per part, fewer than k=600"):
        kmeans.hierarchical_kmeans(digits_embeddings, 600, 2, seed=0, parts=4)


def _config(output_dir, **kw) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict(dict(
        source="digits", output_dir=str(output_dir), num_clusters=16, top_l=4, kmeans_iters=4,
        shard_size=600, progress=False, pixels_size=8, pixels_dim=16, teacher_fit_samples=500,
        kmeans_method="hierarchical", kmeans_parts=3,
    ))
    c.update(kw)
    return c


def test_job_hierarchical_resumes_to_identical_centroids(tmp_path, monkeypatch):
    ref = cluster.run(_config(tmp_path / "ref"))
    assert ref["kmeans"]["method"] == "hierarchical" and ref["num_images"] == 1437
    assert 0.5 < ref["kmeans"]["sample_mean_cosine"] <= 1
    assert sorted(p.split("/")[-1] for p in glob.glob(f"{tmp_path}/ref/kmeans/*.npz")) == [
        "part-0000.npz", "part-0001.npz", "part-0002.npz", "state.npz"]

    real_step, calls = kmeans.lloyd_step, []

    def dying_step(*args, **kwargs):  # the first run dies in the second part's third iteration
        calls.append(1)
        if len(calls) == 7:
            raise KeyboardInterrupt("killed")
        return real_step(*args, **kwargs)

    out = tmp_path / "killed"
    monkeypatch.setattr(kmeans, "lloyd_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        cluster.run(_config(out))
    calls[:] = [1] * 100  # past the dying call
    again = cluster.run(_config(out))
    del calls[:100]
    assert len(calls) == 4 * 4 - 6, "parts 0 and the first two iterations of part 1 were not redone"
    np.testing.assert_array_equal(np.load(out / "centroids.npy"), np.load(tmp_path / "ref" / "centroids.npy"))
    assert again["kmeans"] == ref["kmeans"]


def test_flat_and_hierarchical_are_different_settings(tmp_path):
    cluster.run(_config(tmp_path, kmeans_method="flat"))
    with pytest.raises(cluster.ClusterError, match="other settings.*kmeans_method"):
        cluster.run(_config(tmp_path))


def test_job_json_without_the_kmeans_keys_reads_as_their_defaults(tmp_path):
    """Output dirs written before kmeans_method existed stay usable."""
    m = cluster.run(_config(tmp_path, kmeans_method="flat"))
    job = json.loads((tmp_path / "job.json").read_text())
    assert "kmeans_parts" not in job  # it changes nothing for flat k-means
    for key in ("kmeans_method", "kmeans_fp16"):
        del job[key]
    (tmp_path / "job.json").write_text(json.dumps(job))
    assert cluster.run(_config(tmp_path, kmeans_method="flat")) == m


@pytest.mark.parametrize("kw, message", [
    (dict(kmeans_method="spectral"), "kmeans_method='spectral'"),
    (dict(kmeans_parts=300, max_points_per_centroid=256), "kmeans_parts=300 > max_points_per_centroid"),
    (dict(num_clusters=200, kmeans_parts=8), r"leaves \d+ per part, fewer than k=200"),
])
def test_bad_kmeans_settings_are_clear_errors(tmp_path, kw, message):
    with pytest.raises(cluster.ClusterError, match=message):
        cluster.run(_config(tmp_path, **kw))
