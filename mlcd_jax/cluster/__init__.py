"""The offline clustering job (teacher embedding, spherical k-means, top-l assignment, shards).

``run(config) -> manifest`` is what ``python -m mlcd_jax.cluster --config=...`` calls; ``load_teacher``
re-opens a finished job's teacher for evaluation. See ``mlcd_jax.cluster.job`` for what the job writes.
The settings (``default_config``, ``ClusterError``) and teachers import eagerly; the rest (``run``,
``load_teacher``, ``embed_batch``, ``assign_batch``, ``write_shard``: faiss, ArrayRecord) loads on first
use, so a config file can import this package cheaply.
"""

import importlib
from typing import Any

from mlcd_jax.cluster.config import ClusterError, default_config
from mlcd_jax.cluster.teachers import TEACHERS, TeacherError, build_teacher

_LAZY = {
    "run": "mlcd_jax.cluster.job",
    "load_teacher": "mlcd_jax.cluster.job",
    "embed_batch": "mlcd_jax.cluster.stages",
    "assign_batch": "mlcd_jax.cluster.kmeans",
    "write_shard": "mlcd_jax.cluster.writer",
}

__all__ = [
    "ClusterError", "TEACHERS", "TeacherError", "assign_batch", "build_teacher", "default_config",
    "embed_batch", "load_teacher", "run", "write_shard",
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)
