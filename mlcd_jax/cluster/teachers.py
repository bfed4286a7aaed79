"""Teacher encoders for the clustering job, in a registry keyed by the spec prefix.

A teacher is a callable ``embed(images uint8 [n, H, W, C]) -> float32 [n, d]`` with two attributes the
job uses to stack variable-sized images into batches: ``input_size`` (images are resized and
centre-cropped to this square first) and ``channels`` (grayscale is repeated to RGB when 3).

- ``pixels`` — PCA of down-sampled pixels: a cheap, real, reproducible baseline. It is fitted on a
  seeded sample of the source and saved as ``teacher.npz`` so that evaluation re-uses the same map.
- ``hf:DIR`` — a CLIP / MLCD vision checkpoint directory (config.json + safetensors) through
  ``mlcd_jax.interop.hf.load_vision``; the pooled output is the embedding. The job's ``teacher_dtype``
  (``bfloat16`` on accelerators) sets the compute dtype of this and the ``checkpoint:`` teacher.
- ``hf-hub:ORG/NAME[@REV]`` — the same from the hub, through its cache (:mod:`mlcd_jax.interop.hub`).
- ``checkpoint:WORKDIR`` — one of our trained models (needs the trainer's checkpoint loader).

The job runs on one process (a Beam worker, or process 0 of a multi-process training run) and builds
its teacher on that process's devices (``devices``); an evaluation's teacher row builds it on every
process of the run (``devices=None``: the forward spans them all, see ``FeatureExtractor``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import ml_collections
import numpy as np

from mlcd_jax import fileio
from mlcd_jax.cluster import storage
from mlcd_jax.data import augment

if TYPE_CHECKING:
    import jax

    Devices = list[jax.Device] | None  # where a model teacher embeds (None: every device of the run)

TEACHER_STATE = "teacher.npz"
TEACHER_DTYPES = ("", "bfloat16", "float32")  # the job's teacher_dtype ("" = the teacher's own)


class TeacherError(ValueError):
    """The teacher spec is unknown or its weights cannot be loaded."""


class Teacher(Protocol):
    input_size: int
    channels: int

    def __call__(self, images: np.ndarray) -> np.ndarray: ...


def _prepare(images: np.ndarray, size: int, channels: int) -> np.ndarray:
    """Each image to ``channels`` and ``size``x``size`` (resize + centre crop), stacked."""
    return np.stack([augment.resize_center_crop(augment.to_channels(im, channels), size) for im in images])


class PixelsTeacher:
    """PCA of ``size``x``size`` RGB pixels scaled to [0, 1]."""

    channels = 3

    def __init__(self, mean: np.ndarray, components: np.ndarray, size: int) -> None:
        self.mean, self.components, self.input_size = mean, components, size

    @staticmethod
    def flatten(images: np.ndarray, size: int) -> np.ndarray:
        """uint8 [n, H, W, C] -> float32 [n, size*size*3] in [0, 1]."""
        return _prepare(images, size, 3).reshape(len(images), -1).astype(np.float32) / 255.0

    @classmethod
    def fit(cls, images: np.ndarray, size: int, dim: int, seed: int) -> PixelsTeacher:
        """Fits the PCA on a sample of images (exact SVD, so the fit is reproducible)."""
        from sklearn.decomposition import PCA

        x = cls.flatten(images, size)
        dim = min(dim, x.shape[0], x.shape[1])
        pca = PCA(n_components=dim, svd_solver="full", random_state=seed).fit(x)
        return cls(pca.mean_.astype(np.float32), pca.components_.astype(np.float32), size)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return (self.flatten(images, self.input_size) - self.mean) @ self.components.T

    def save(self, path: str) -> None:
        storage.save_npz(path, mean=self.mean, components=self.components, size=np.int64(self.input_size))

    @classmethod
    def load(cls, path: str) -> PixelsTeacher:
        with storage.load_npz(path) as z:
            return cls(z["mean"], z["components"], int(z["size"]))


SampleFn = Callable[[], np.ndarray]


def _pixels(
    arg: str, config: ml_collections.ConfigDict, state_dir: str, sample: SampleFn | None, devices: Devices,
) -> Teacher:
    del devices  # a PCA on the host
    path = os.path.join(state_dir, TEACHER_STATE)
    if fileio.exists(path):
        return PixelsTeacher.load(path)
    if sample is None:
        raise TeacherError(f"{path} is missing: the pixels teacher of this job was never fitted")
    teacher = PixelsTeacher.fit(sample(), config.pixels_size, config.pixels_dim, config.seed)
    teacher.save(path)
    return teacher


def _hf(
    arg: str, config: ml_collections.ConfigDict, state_dir: str, sample: SampleFn | None, devices: Devices,
) -> Teacher:
    return _hf_checkpoint(f"hf:{arg}", config, devices)


def _hf_hub(
    arg: str, config: ml_collections.ConfigDict, state_dir: str, sample: SampleFn | None, devices: Devices,
) -> Teacher:
    return _hf_checkpoint(f"hf-hub:{arg}", config, devices)


def _hf_checkpoint(spec: str, config: ml_collections.ConfigDict, devices: Devices) -> Teacher:
    """The teacher of an HF checkpoint, a directory (``hf:DIR``) or a hub id (``hf-hub:ORG/NAME``)."""
    from mlcd_jax.interop import hub

    try:
        arg = hub.snapshot_dir(spec)
    except ValueError as e:
        raise TeacherError(f"teacher {e}") from None
    if not arg or not os.path.isdir(arg):
        raise TeacherError(f"teacher '{spec}': {arg!r} is not a directory with config.json + safetensors")
    try:
        from mlcd_jax.interop.files import InteropError
        from mlcd_jax.interop.hf import load_vision
    except ImportError as e:
        raise TeacherError(f"teacher '{spec}' needs mlcd_jax.interop.hf.load_vision ({e})") from e
    from mlcd_jax.models.features import FeatureExtractor

    from mlcd_jax.runs import DTYPES

    try:
        model, cfg = load_vision(arg, **({"dtype": DTYPES[config.teacher_dtype]} if config.teacher_dtype else {}))
    except (InteropError, FileNotFoundError) as e:
        raise TeacherError(f"teacher '{spec}': {e}") from None
    return FeatureExtractor(model, int(cfg.image_size), batch_size=config.batch_size, devices=devices)


def _checkpoint(
    arg: str, config: ml_collections.ConfigDict, state_dir: str, sample: SampleFn | None, devices: Devices,
) -> Teacher:
    from mlcd_jax.models.features import FeatureExtractor
    from mlcd_jax.runs import load_model, load_run_config

    try:
        run_config = load_run_config(arg)
    except FileNotFoundError as e:
        raise TeacherError(f"teacher 'checkpoint:{arg}': {e}") from e
    if config.teacher_dtype:
        run_config.model.dtype = config.teacher_dtype
    model = load_model(arg, run_config, devices=devices)
    return FeatureExtractor(model, run_config.data.image_size, batch_size=config.batch_size, devices=devices)


TEACHERS: dict[str, Callable[[str, ml_collections.ConfigDict, str, SampleFn | None, Devices], Teacher]] = {
    "pixels": _pixels,
    "hf": _hf,
    "hf-hub": _hf_hub,
    "checkpoint": _checkpoint,
}


def check_spec(spec: str) -> None:
    """Raises ``TeacherError`` for a spec whose prefix is not in the registry."""
    if spec.partition(":")[0] not in TEACHERS:
        raise TeacherError(f"unknown teacher {spec!r}: use one of pixels, hf:DIR, hf-hub:ORG/NAME, checkpoint:WORKDIR")


def build_teacher(
    spec: str, config: ml_collections.ConfigDict, state_dir: str, sample: SampleFn | None = None,
    devices: Devices = None,
) -> Teacher:
    """The teacher for ``spec``; ``sample()`` gives uint8 images to fit on when it needs fitting; a model
    teacher embeds on ``devices`` (default: every device of the run, every process calling).

    Fitted state lives in ``state_dir`` (the job's output dir) and is re-used when present.
    """
    check_spec(spec)
    prefix, _, arg = spec.partition(":")
    return TEACHERS[prefix](arg, config, state_dir, sample, devices)
