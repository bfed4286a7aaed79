"""ProtoCLIP's projection heads: a small MLP from a tower's embedding to the space its prototypes live in.

ProtoCLIP (Chen et al.) clusters and classifies in a low-dimensional space (128-d) reached by one MLP per
modality on top of the CLIP embedding, so the prototype losses do not constrain the contrastive space
directly. Parameters are small and replicated.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx


class ProjectionHead(nnx.Module):
    """``Linear(d -> hidden) -> GELU -> Linear(hidden -> out)``; ``model(x)`` is un-normalised [B, out]."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, *, rngs: nnx.Rngs,
                 dtype: Any = jnp.float32, param_dtype: Any = jnp.float32) -> None:
        self.fc1 = nnx.Linear(in_dim, hidden_dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc2 = nnx.Linear(hidden_dim, out_dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))
