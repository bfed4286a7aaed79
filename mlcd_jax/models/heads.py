"""ProtoCLIP's projection heads: a small MLP from a tower's embedding to the space its prototypes live in.

ProtoCLIP (Chen et al.) clusters and classifies in a low-dimensional space (128-d) reached by one MLP per
modality on top of the CLIP embedding, so the prototype losses do not constrain the contrastive space
directly. As released: ``Linear -> BatchNorm -> ReLU -> Linear``, the BatchNorm normalising over the
global batch while training (PyTorch's SyncBatchNorm; the released default normalises per GPU) and by
its running averages (momentum 0.1 in PyTorch's terms) otherwise. Parameters are small and replicated.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx


class ProjectionHead(nnx.Module):
    """``Linear(d -> hidden) -> BatchNorm -> ReLU -> Linear(hidden -> out)``; ``model(x, train=...)`` is
    un-normalised [B, out]. ``train=True`` normalises by the batch's statistics and updates the running
    averages (``nnx.BatchStat``); ``train=False`` uses those averages."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, *, rngs: nnx.Rngs,
                 dtype: Any = jnp.float32, param_dtype: Any = jnp.float32) -> None:
        self.fc1 = nnx.Linear(in_dim, hidden_dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.bn = nnx.BatchNorm(hidden_dim, momentum=0.9, epsilon=1e-5, dtype=dtype, param_dtype=param_dtype,
                                rngs=rngs)
        self.fc2 = nnx.Linear(hidden_dim, out_dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        return self.fc2(jax.nn.relu(self.bn(self.fc1(x), use_running_average=not train)))
