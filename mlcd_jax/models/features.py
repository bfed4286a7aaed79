"""Frozen features of a ViT (or raw pixels) on image arrays, and of a text tower on strings, in batches,
for kNN / probe / PCA / teachers / zero-shot and retrieval."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mlcd_jax import sharding
from mlcd_jax.data import augment, eval_resize


@dataclasses.dataclass(frozen=True)
class _Placement:
    """Where an encoder's weights live and how a batch is laid out for it.

    The forward runs over the mesh the weights already live on, with their own shardings, as the
    training step does: a trained state (sharded over this process's devices, or over several
    processes' in a multi-process run) is never copied or gathered onto one host. Weights on one device
    (a model built eagerly, an HF tower) are first replicated over all devices (all processes' in a
    multi-process run), or over ``devices`` when given (the clustering job's teachers: a job runs on one
    process). A batch's rows are split over the mesh's batch axes; each process places only its own
    devices' rows, and the result comes back replicated, so every process gets all of it: features are
    [B, d], the gather is small, and the weights never move between hosts.

    In a multi-process run every process must call the encoder with the same inputs (the evaluators
    do). One process with N devices and P processes with N / P each compile the same program, so their
    features are the same bits.
    """

    graphdef: nnx.GraphDef
    state: nnx.State
    batch: NamedSharding  # a batch's sharding: leading dim split over the batch axes
    out: NamedSharding  # replicated over the mesh
    batch_size: int  # the requested batch size rounded up to a multiple of the batch's split

    @classmethod
    def of(cls, model: nnx.Module, batch_size: int, devices: list[jax.Device] | None) -> "_Placement":
        graphdef, state = nnx.split(model)
        mesh = None if devices else _state_mesh(state)
        if mesh is not None:
            batch, split = sharding.batch_sharding(mesh), sharding.data_parallel_size(mesh)
        else:
            mesh = Mesh(np.asarray(list(devices or jax.devices())), ("batch",))
            whole = NamedSharding(mesh, P())
            state = jax.tree.map(lambda x: _replicate(x, whole), state)
            batch, split = NamedSharding(mesh, P("batch")), mesh.size
        return cls(graphdef, state, batch, NamedSharding(mesh, P()), -(-batch_size // split) * split)

    def put(self, shape: tuple[int, ...], rows: Callable[[slice], np.ndarray]) -> jax.Array:
        """The global batch of ``shape`` whose rows ``rows(slice)`` gives; each process makes (and sends)
        only the rows of its own devices."""
        made: dict[tuple[int | None, int | None], np.ndarray] = {}

        def block(index: tuple[slice, ...]) -> np.ndarray:
            key = (index[0].start, index[0].stop)
            if key not in made:  # devices that share rows (a model axis) share one host copy
                made[key] = rows(index[0])
            return made[key]

        return jax.make_array_from_callback(shape, self.batch, block)


def _replicate(x: jax.Array, whole: NamedSharding) -> jax.Array:
    """``x`` (on this process) as one array replicated over ``whole``'s devices, every process's copy
    its own (the same weights on every process: built from the same seed, or read from the same files)."""
    if whole.is_fully_addressable:
        return jax.device_put(x, whole)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, whole, lambda index: host[index])


def _state_mesh(state: nnx.State) -> Mesh | None:
    """The mesh ``state``'s arrays are placed on, or None for arrays on single devices."""
    for leaf in jax.tree.leaves(state):
        if isinstance(getattr(leaf, "sharding", None), NamedSharding):
            return leaf.sharding.mesh
    return None


class FeatureExtractor:
    """Pooled features [N, d] (or last hidden states [N, 1+n, w] with ``tokens=True``) of uint8 images.

    Images of any size are sent as uint8 (those not of the model's size as the window that the eval
    transform reads, resized and centre-cropped on the device: :mod:`~mlcd_jax.data.eval_resize`),
    normalised on the device and run through one jitted forward in fixed-size batches (the last one
    padded), so a single compiled program serves every call.
    The forward is data-parallel over the mesh the weights live on, or for weights on one device over
    all devices (``devices`` when given) with the weights replicated; see :class:`_Placement`. The host
    prepares batch i + 1 while the devices run batch i.
    ``batch_size`` is rounded up to a multiple of the batch's split.
    """

    channels = 3

    def __init__(
        self, model: nnx.Module, image_size: int, *, batch_size: int = 256, tokens: bool = False,
        devices: list[jax.Device] | None = None,
    ):
        self._place = _Placement.of(model, batch_size, devices)
        self.batch_size = self._place.batch_size
        self.input_size, self._tokens = image_size, tokens
        self._canvases: dict[tuple[int, tuple[int, int]], np.ndarray] = {}  # (slot, rows) -> canvas memory

    def __call__(self, images: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
        """Features of uint8 ``images`` ([N, H, W, C], or a list of [H, W, C] of any sizes)."""
        sizes = range(0, len(images), self.batch_size)
        return self.embed_batches((len(images[s : s + self.batch_size]), lambda part, s=s: images[s:][part])
                                  for s in sizes)

    def own_rows(self) -> list[tuple[int, int]]:
        """The row ranges ``[a, b)`` of a batch that this process's devices hold: in a multi-process
        run, the only rows it must read (one process: every row)."""
        shape = (self.batch_size, self.input_size, self.input_size, self.channels)
        held = self._place.batch.addressable_devices_indices_map(shape).values()
        return sorted({_key(index[0], self.batch_size) for index in held})

    def embed_batches(self, batches: Iterable[tuple[int, Callable[[slice], Sequence[np.ndarray]]]]) -> np.ndarray:
        """Features of consecutive batches, each ``(n, rows)`` with ``n <= batch_size`` images of which
        ``rows(part)`` gives those of ``part`` (a slice of ``[0, n)``): uint8 [H, W, C] images of any
        sizes, as an array or a list; ``rows`` is called for this process's rows only (:meth:`own_rows`).
        Images not of the model's size are resized and centre-cropped on the devices
        (:mod:`~mlcd_jax.data.eval_resize`: PIL's numbers exactly); the host only cuts out their windows."""
        place, own = self._place, self.own_rows()
        out: list[np.ndarray] = []
        pending: tuple[jax.Array, int] | None = None
        for i, (n, read) in enumerate(batches):
            parts = {(a, b): read(slice(a, min(b, n))) if a < n else [] for a, b in own}
            result = _forward(place.graphdef, place.state, self._pixels(parts, slot=i % 2), self._tokens, place.out)
            if pending is not None:  # dispatch is asynchronous: fetch the previous batch only now
                out.append(np.asarray(pending[0])[: pending[1]])
            pending = (result, n)
        if pending is None:
            raise ValueError("no images to embed")
        out.append(np.asarray(pending[0])[: pending[1]])
        return np.concatenate(out)

    def _pixels(self, parts: dict[tuple[int, int], Sequence[np.ndarray]], slot: int) -> jax.Array:
        """uint8 eval pixels [batch_size, S, S, C] on the devices from this process's rows (rows past the
        batch's images are zeros): placed as they are when every image already has the model's size (one
        process only: processes that read different rows must run the same programs), else cut to
        their windows, packed on canvases and resized on the devices.

        The canvases of batch ``slot`` (0 or 1) reuse the memory of the batch before the last, whose
        features have been fetched, so its programs are done with it: fresh canvases cost more in page
        faults than the copy itself (a 256-image canvas for 224 px is 200 MB)."""
        size, channels, b = self.input_size, self.channels, self.batch_size
        shape = (size, size, channels)
        if jax.process_count() == 1 and all(image.shape == shape for images in parts.values() for image in images):
            def rows(part: slice) -> np.ndarray:
                start, stop = _key(part, b)
                images = parts[(start, stop)]
                got = np.asarray(images) if len(images) else np.zeros((0, *shape), np.uint8)
                missing = stop - start - len(got)
                return np.concatenate([got, np.zeros((missing, *shape), np.uint8)]) if missing else got

            return self._place.put((b, *shape), rows)
        plans = {key: [eval_resize.plan(image, size, channels) for image in images] for key, images in parts.items()}
        everything = [p for ps in plans.values() for p in ps]
        side, taps = eval_resize.fixed_canvas(size) if jax.process_count() > 1 else eval_resize.canvas_side(everything, size)
        packed = {}
        for key, ps in plans.items():
            want = (key[1] - key[0], side, side, channels)
            if self._canvases.get((slot, key), np.empty(0)).shape != want:
                self._canvases[(slot, key)] = np.empty(want, np.uint8)
            packed[key] = eval_resize.pack(ps, want[0], size, side, taps, channels, out=self._canvases[(slot, key)])
        first = next(iter(packed.values()))
        arrays = [self._place.put((b, *array.shape[1:]), lambda part, i=i: packed[_key(part, b)][i])
                  for i, array in enumerate(first)]
        return _resize(*arrays)


def _key(part: slice, batch_size: int) -> tuple[int, int]:
    """A device's rows ``part`` of a batch as ``(start, stop)``, the names of :meth:`FeatureExtractor.own_rows`."""
    return part.start or 0, batch_size if part.stop is None else part.stop


_resize = jax.jit(eval_resize.resize)


@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def _forward(
    graphdef: nnx.GraphDef, state: nnx.State, x: jax.Array, tokens: bool, out: NamedSharding
) -> jax.Array:
    """uint8 eval pixels -> features: CLIP normalisation on the device, then the model, the result
    replicated over ``out``'s mesh. One compiled program per architecture and batch shape,
    shared by every extractor (evaluations during training build one per evaluation, with new weights
    but the same program)."""
    pooled, hidden = nnx.merge(graphdef, state)(augment.normalize(x), deterministic=True)
    return _gathered((hidden if tokens else pooled).astype(jnp.float32), out)


def _gathered(y: jax.Array, out: NamedSharding) -> jax.Array:
    """``y`` replicated over ``out``'s devices: every process then holds all of it."""
    return jax.lax.with_sharding_constraint(y, out)


def pixel_features(images: np.ndarray) -> np.ndarray:
    """Raw pixels, flattened and scaled to [0, 1]: the no-learning baseline."""
    return images.reshape(len(images), -1).astype(np.float32) / 255.0


class TextEncoder:
    """Text embeddings [N, d] of strings: CLIP's BPE on the host, one jitted text-tower forward in
    fixed-size batches (the last one padded), placed as :class:`FeatureExtractor`'s forward is."""

    def __init__(self, model: nnx.Module, *, batch_size: int = 256, devices: list[jax.Device] | None = None):
        self._place = _Placement.of(model, batch_size, devices)
        self.batch_size = self._place.batch_size
        self.context_length = model.config.context_length

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        from mlcd_jax.data.tokenizer import tokenize

        if not texts:
            raise ValueError("no texts to embed")
        place, out = self._place, []
        for start in range(0, len(texts), self.batch_size):
            ids = tokenize(list(texts[start : start + self.batch_size]), self.context_length)
            n = len(ids)
            ids = np.concatenate([ids, np.zeros((self.batch_size - n, ids.shape[1]), ids.dtype)])
            x = place.put(ids.shape, lambda part, ids=ids: ids[part])
            out.append(np.asarray(_encode(place.graphdef, place.state, x, place.out))[:n])
        return np.concatenate(out)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _encode(graphdef: nnx.GraphDef, state: nnx.State, ids: jax.Array, out: NamedSharding) -> jax.Array:
    """Token ids -> text embeddings (one compiled program per architecture, as :func:`_forward`)."""
    return _gathered(nnx.merge(graphdef, state)(ids).astype(jnp.float32), out)
