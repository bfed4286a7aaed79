"""Test setup: 8 fake CPU devices (set before JAX initialises), markers, the GCS emulator fixtures
``gcs_server`` / ``gcs_bucket`` (tests/gcs_emulator.py), and a generated Fashion-MNIST (``fashion_mnist``,
``write_idx``) for every test module, so that no test needs Debian's dataset-fashion-mnist."""

import dataclasses
import gzip
import os
import shutil
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache per test run (made by the pytest process that loads this first; the
# xdist workers and every subprocess inherit the variables): tests that build the same programs, in-process
# or in a launched job, compile them once. Every compile is kept, however short (the launched jobs build
# many small programs): tests/test_train.py took 189 s with it, 240 s without; the default suite
# 15 min 37 s, against 16 min 51 s with JAX's default of compiles over 1 s only. Removed when the run ends.
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="mlcd_jax_test_compiles_")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from gcs_emulator import gcs_bucket, gcs_server  # noqa: E402,F401  (fixtures, registered by import)

from mlcd_jax.cli import size_cpu_thread_pool  # noqa: E402

size_cpu_thread_pool()  # as the entry points do: a collective over the fake devices never takes every thread


def pytest_sessionfinish(session: pytest.Session) -> None:
    """The run's compilation cache goes with the process that made it (xdist's controller, else the only one)."""
    if _OWN_CACHE:
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


IDX_TYPE_CODES = {"u1": 0x08, "i1": 0x09, "i2": 0x0B, "i4": 0x0C, "f4": 0x0D, "f8": 0x0E}  # numpy kind -> IDX
FASHION_MNIST_SIZES = {"train": 4000, "test": 500}


def _write_idx(path: os.PathLike, array: np.ndarray) -> None:
    """``array`` as an IDX file (gzipped when ``path`` ends in .gz): 0, type code, ndim, big-endian dims, data."""
    array = np.asarray(array)
    header = struct.pack(f">HBB{array.ndim}I", 0, IDX_TYPE_CODES[array.dtype.str[1:]], array.ndim, *array.shape)
    data = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    Path(path).write_bytes(gzip.compress(data, compresslevel=1) if str(path).endswith(".gz") else data)


def _garments(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` uint8 28x28 images and uint8 labels of 10 classes, with structure for clustering and kNN.

    Each class is a fixed left-right symmetric silhouette of 5x5 blocks of 4x4 pixels on a black
    border, in 3 variants (a tenth of the blocks flipped); each image is one variant shifted by up to
    3 pixels, at a random brightness, plus noise.
    """
    rng = np.random.default_rng(seed)
    half = rng.random((10, 5, 3)) < 0.5
    silhouettes = np.concatenate([half, half[..., 1::-1]], axis=-1)  # [10, 5, 5]
    variants = silhouettes[:, None] ^ (rng.random((10, 3, 5, 5)) < 0.1)
    labels = rng.integers(0, 10, n)
    blocks = variants[labels, rng.integers(0, 3, n)].repeat(4, axis=1).repeat(4, axis=2)
    masks = np.pad(blocks, ((0, 0), (4, 4), (4, 4)))
    shifts = rng.integers(-3, 4, (n, 2))
    images = np.stack([np.roll(m, tuple(s), axis=(0, 1)) for m, s in zip(masks, shifts)])
    images = images * rng.uniform(100, 255, (n, 1, 1)) + rng.normal(0, 40, images.shape)
    return np.clip(np.round(images), 0, 255).astype(np.uint8), labels.astype(np.uint8)


@dataclasses.dataclass(frozen=True)
class FakeFashionMnist:
    """A generated Fashion-MNIST in Debian's layout (gzipped IDX files); ``spec`` names it to sources."""

    directory: Path
    images: dict[str, np.ndarray]  # split -> uint8 [N, 28, 28], as written
    labels: dict[str, np.ndarray]  # split -> uint8 [N]

    @property
    def spec(self) -> str:
        return f"fashion_mnist:{self.directory}"


@pytest.fixture(scope="session")
def write_idx() -> Callable[[os.PathLike, np.ndarray], None]:
    """The IDX writer the generated Fashion-MNIST uses, for tests of the reader."""
    return _write_idx


@pytest.fixture(scope="session")
def fashion_mnist(tmp_path_factory: pytest.TempPathFactory) -> FakeFashionMnist:
    """Fashion-MNIST-format data (FASHION_MNIST_SIZES images, 10 classes), written once per session."""
    directory = tmp_path_factory.mktemp("fashion-mnist")
    images, labels = _garments(sum(FASHION_MNIST_SIZES.values()), seed=0)
    n_train = FASHION_MNIST_SIZES["train"]
    parts = {"train": slice(0, n_train), "test": slice(n_train, None)}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        _write_idx(directory / f"{prefix}-images-idx3-ubyte.gz", images[parts[split]])
        _write_idx(directory / f"{prefix}-labels-idx1-ubyte.gz", labels[parts[split]])
    return FakeFashionMnist(directory, {s: images[p] for s, p in parts.items()},
                            {s: labels[p] for s, p in parts.items()})
