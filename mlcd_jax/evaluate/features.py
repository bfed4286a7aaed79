"""Frozen features of a ViT (or raw pixels) on image arrays, and of a text tower on strings, in batches,
for kNN / probe / PCA / teachers / zero-shot and retrieval."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mlcd_jax.data import augment
from mlcd_jax.data.pipeline import eval_pixels


def _replicated(
    model: nnx.Module, batch_size: int, devices: list[jax.Device] | None,
) -> tuple[nnx.GraphDef, nnx.State, NamedSharding, int]:
    """(graphdef, state replicated over ``devices`` (default: this process's), the sharding that splits a
    batch over them, ``batch_size`` rounded up to a multiple of their count): the data-parallel setup the
    image and text encoders share."""
    devices = list(devices or jax.local_devices())
    mesh = Mesh(np.asarray(devices), ("batch",))
    graphdef, state = nnx.split(model)
    state = jax.device_put(state, NamedSharding(mesh, P()))
    return graphdef, state, NamedSharding(mesh, P("batch")), -(-batch_size // len(devices)) * len(devices)


class FeatureExtractor:
    """Pooled features [N, d] (or last hidden states [N, 1+n, w] with ``tokens=True``) of uint8 images.

    Images are resized / centre-cropped as at eval time on the host (nothing to do for images already of
    the model's size, as the clustering job's are), sent as uint8, normalised on the device and run
    through one jitted forward in fixed-size batches (the last one padded), so a single compiled program
    serves every call.
    The forward is data-parallel over this process's devices (``devices``, default all local ones: the
    weights replicated, each batch split), and the host prepares batch i + 1 while the devices run
    batch i. ``batch_size`` is rounded up to a multiple of the device count.
    """

    channels = 3

    def __init__(
        self, model: nnx.Module, image_size: int, *, batch_size: int = 256, tokens: bool = False,
        devices: list[jax.Device] | None = None,
    ):
        self._graphdef, self._state, self._batch, self.batch_size = _replicated(model, batch_size, devices)
        self.input_size, self._tokens = image_size, tokens

    def __call__(self, images: np.ndarray) -> np.ndarray:
        out: list[np.ndarray] = []
        pending: tuple[jax.Array, int] | None = None
        for start in range(0, len(images), self.batch_size):
            chunk = eval_pixels(images[start : start + self.batch_size], self.input_size)  # uint8
            n = len(chunk)
            if n < self.batch_size:
                chunk = np.concatenate([chunk, np.zeros((self.batch_size - n, *chunk.shape[1:]), chunk.dtype)])
            result = _forward(self._graphdef, self._state, jax.device_put(chunk, self._batch), self._tokens)
            if pending is not None:  # dispatch is asynchronous: fetch the previous batch only now
                out.append(np.asarray(pending[0])[: pending[1]])
            pending = (result, n)
        if pending is None:
            raise ValueError("no images to embed")
        out.append(np.asarray(pending[0])[: pending[1]])
        return np.concatenate(out)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _forward(graphdef: nnx.GraphDef, state: nnx.State, x: jax.Array, tokens: bool) -> jax.Array:
    """uint8 eval pixels -> features: CLIP normalisation on the device, then the model. One compiled
    program per architecture and batch shape, shared by every extractor (evaluations during training
    build one per evaluation, with new weights but the same program)."""
    pooled, hidden = nnx.merge(graphdef, state)(augment.normalize(x), deterministic=True)
    return (hidden if tokens else pooled).astype(jnp.float32)


def pixel_features(images: np.ndarray) -> np.ndarray:
    """Raw pixels, flattened and scaled to [0, 1]: the no-learning baseline."""
    return images.reshape(len(images), -1).astype(np.float32) / 255.0


class TextEncoder:
    """Text embeddings [N, d] of strings: CLIP's BPE on the host, one jitted text-tower forward in
    fixed-size batches (the last one padded), replicated over this process's devices."""

    def __init__(self, model: nnx.Module, *, batch_size: int = 256, devices: list[jax.Device] | None = None):
        self._graphdef, self._state, self._batch, self.batch_size = _replicated(model, batch_size, devices)
        self.context_length = model.config.context_length

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        from mlcd_jax.data.tokenizer import tokenize

        if not texts:
            raise ValueError("no texts to embed")
        out = []
        for start in range(0, len(texts), self.batch_size):
            ids = tokenize(list(texts[start : start + self.batch_size]), self.context_length)
            n = len(ids)
            ids = np.concatenate([ids, np.zeros((self.batch_size - n, ids.shape[1]), ids.dtype)])
            out.append(np.asarray(_encode(self._graphdef, self._state, jax.device_put(ids, self._batch)))[:n])
        return np.concatenate(out)


@functools.partial(jax.jit, static_argnums=(0,))
def _encode(graphdef: nnx.GraphDef, state: nnx.State, ids: jax.Array) -> jax.Array:
    """Token ids -> text embeddings (one compiled program per architecture, as :func:`_forward`)."""
    return nnx.merge(graphdef, state)(ids).astype(jnp.float32)
