"""Clustering job defaults: Fashion-MNIST train split, pixel-PCA teacher, k = 1024, top-8.

``python -m mlcd_jax.cluster --config=configs/cluster/default.py --config.output_dir=/tmp/fm``
Every key of ``mlcd_jax.cluster.default_config()`` can be overridden with ``--config.KEY=VALUE``; e.g.
``--config.source=folder:/data/images --config.teacher=hf:/models/mlcd-vit-large-patch14-336
--config.num_clusters=100000``. The paper's scale is k = 1,000,000, l = 8; there, add
``--config.kmeans_method=hierarchical --config.kmeans_parts=8 --config.max_points_per_centroid=64`` (each
part of the sample fits one GPU) and, with GPU faiss, ``--config.kmeans_fp16=True``.
"""

from mlcd_jax.cluster.config import default_config


def get_config():
    c = default_config()
    c.source = "fashion_mnist:train"
    c.output_dir = "/tmp/mlcd_jax_cluster"
    c.teacher = "pixels"
    c.num_clusters = 1024
    c.top_l = 8
    return c
