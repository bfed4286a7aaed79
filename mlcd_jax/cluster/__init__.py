"""The offline clustering job (teacher embedding, spherical k-means, top-l assignment, shards).

``run(config) -> manifest`` is what ``python -m mlcd_jax.cluster --config=...`` calls; ``load_teacher``
re-opens a finished job's teacher for evaluation. See ``mlcd_jax.cluster.job`` for the stages.
"""

from mlcd_jax.cluster.job import ClusterError, default_config, embed_batch, load_teacher, run
from mlcd_jax.cluster.kmeans import assign_batch
from mlcd_jax.cluster.teachers import TEACHERS, TeacherError, build_teacher
from mlcd_jax.cluster.writer import encode_record, write_shard

__all__ = [
    "ClusterError", "TEACHERS", "TeacherError", "assign_batch", "build_teacher", "default_config",
    "embed_batch", "encode_record", "load_teacher", "run", "write_shard",
]
