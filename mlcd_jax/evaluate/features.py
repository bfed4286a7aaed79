"""Frozen features of a ViT (or raw pixels) on image arrays, in batches, for kNN / probe / PCA / teachers."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mlcd_jax.data.pipeline import preprocess_eval


class FeatureExtractor:
    """Pooled features [N, d] (or last hidden states [N, 1+n, w] with ``tokens=True``) of uint8 images.

    Images are resized / centre-cropped / normalised as at eval time, then run through one jitted
    forward in fixed-size batches (the last one padded), so a single compiled program serves every call.
    """

    channels = 3

    def __init__(self, model: nnx.Module, image_size: int, *, batch_size: int = 256, tokens: bool = False):
        self._graphdef, self._state = nnx.split(model)
        self.input_size, self.batch_size, self._tokens = image_size, batch_size, tokens

    def __call__(self, images: np.ndarray) -> np.ndarray:
        out = []
        for start in range(0, len(images), self.batch_size):
            chunk = preprocess_eval(images[start : start + self.batch_size], self.input_size)
            n = len(chunk)
            if n < self.batch_size:
                chunk = np.concatenate([chunk, np.zeros((self.batch_size - n, *chunk.shape[1:]), chunk.dtype)])
            out.append(np.asarray(_forward(self._graphdef, self._state, chunk, self._tokens))[:n])
        if not out:
            raise ValueError("no images to embed")
        return np.concatenate(out)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _forward(graphdef: nnx.GraphDef, state: nnx.State, x: jax.Array, tokens: bool) -> jax.Array:
    """One compiled forward per architecture and batch shape, shared by every extractor (evaluations
    during training build one per evaluation, with new weights but the same program)."""
    pooled, hidden = nnx.merge(graphdef, state)(x, deterministic=True)
    return (hidden if tokens else pooled).astype(jnp.float32)


def pixel_features(images: np.ndarray) -> np.ndarray:
    """Raw pixels, flattened and scaled to [0, 1]: the no-learning baseline."""
    return images.reshape(len(images), -1).astype(np.float32) / 255.0
