"""Fashion-MNIST's IDX files: read from Debian's ``dataset-fashion-mnist`` (or any directory), or
downloaded once into ``$MLCD_JAX_CACHE/fashion_mnist``; and the demo's choice of source
(:func:`demo_source`); and the ``fashion_mnist[:DIR][:SPLIT]`` spec: the IDX files in DIR (default
/usr/share/datasets/fashion-mnist), SPLIT ``train`` (60,000, the default), ``test`` (10,000) or ``all``
(train then test), e.g. ``fashion_mnist:test``, ``fashion_mnist:/data/fm:train``; captioned from the
class names ("a photo of a sneaker.")."""

from __future__ import annotations

import gzip
import math
import os
import shutil
import struct
import tempfile
import threading
import urllib.parse
import urllib.request

import numpy as np

from mlcd_jax.data.source_base import SPLITS, SourceError, cache_root
from mlcd_jax.data.sources.base import ArraySource, Kind, classified

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = (  # the IDX reader's names, also the names on Fashion-MNIST's download host
    "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"
)
# Class names as CLIP's zero-shot prompts use them (lower case)
FASHION_MNIST_CLASSES = (
    "t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"
)
ONLINE_TIMEOUT_S = 3.0  # the HEAD probe of the download host before a download


def read_idx(path: str) -> np.ndarray:
    """One (optionally gzipped) IDX file as a uint8 array of its declared shape (MNIST-style data is uint8)."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[:2] != b"\0\0" or len(data) < 4 + 4 * data[3]:
        raise SourceError(f"{path} is not an IDX file (no 0x0000 magic and dimensions header)")
    dtype, ndim = data[2], data[3]
    if dtype != 0x08:
        raise SourceError(f"{path} holds IDX data type 0x{dtype:02x}; only unsigned bytes (0x08) are supported")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    if len(data) - 4 - 4 * ndim != math.prod(shape):
        raise SourceError(f"{path} holds {len(data) - 4 - 4 * ndim} bytes of data, its header declares {shape}")
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _idx_file(directory: str, stem: str) -> str:
    for name in (f"{stem}.gz", stem):
        if os.path.exists(os.path.join(directory, name)):
            return os.path.join(directory, name)
    raise SourceError(
        f"{stem}[.gz] not found in {directory}: install Debian's dataset-fashion-mnist or pass fashion_mnist:DIR"
    )


def arrays(directory: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 [N, 28, 28, 1] and labels int64 [N] of ``split`` (train, test or all: train then
    test) from the IDX files in ``directory``."""
    if split == "all":
        parts = [arrays(directory, s) for s in ("train", "test")]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    prefix = "train" if split == "train" else "t10k"
    images = read_idx(_idx_file(directory, f"{prefix}-images-idx3-ubyte"))[..., None]
    labels = read_idx(_idx_file(directory, f"{prefix}-labels-idx1-ubyte")).astype(np.int64)
    return images, labels


def _downloadable(url: str, timeout_s: float = ONLINE_TIMEOUT_S) -> bool:
    """Whether an HTTP HEAD of ``url`` succeeds (2xx) within ``timeout_s``, name lookup included.

    HEAD of the file itself, not a TCP connect: behind a transparent proxy every connect succeeds. The
    lookup has no timeout of its own, so the request runs in a daemon thread that is abandoned after
    ``timeout_s``: an offline machine gets its answer in ``timeout_s`` at most.
    """
    answered = threading.Event()

    def head() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout_s).close()
            answered.set()
        except (OSError, ValueError):  # URLError / HTTPError / timeouts are OSErrors
            pass

    threading.Thread(target=head, daemon=True).start()
    return answered.wait(timeout_s)


def _fashion_mnist_cache() -> str:
    """Where :func:`demo_source` keeps a downloaded Fashion-MNIST: ``<cache_root>/fashion_mnist``."""
    return os.path.join(cache_root(), "fashion_mnist")


def _has_fashion_mnist(directory: str) -> bool:
    """Whether ``directory`` holds the four IDX files, each gzipped or not (as :func:`arrays` reads them)."""
    return all(any(os.path.isfile(os.path.join(directory, n)) for n in (name, name.removesuffix(".gz")))
               for name in FASHION_MNIST_FILES)


def installed() -> bool:
    """Whether Debian's dataset-fashion-mnist is here: its folder holds the four IDX files (an empty
    folder, say left by a removed package, does not count)."""
    return _has_fashion_mnist(FASHION_MNIST_DIR)


def _fashion_mnist_urls() -> dict[str, str]:
    """File name -> URL of the four IDX files, on the host of tfds's fashion_mnist builder."""
    import tensorflow_datasets as tfds

    base = tfds.builder_cls("fashion_mnist").URL
    return {name: urllib.parse.urljoin(base, name) for name in FASHION_MNIST_FILES}


def _download_fashion_mnist(directory: str) -> None:
    """Downloads the four IDX files into ``directory`` with tfds's download manager (no TensorFlow
    needed; it verifies the sizes and sha256 sums tfds registers for these URLs).

    All or nothing: the files download into a temporary sibling folder and move into ``directory``
    only once all four are there; the temporary folder is removed whatever happens.
    """
    import tensorflow_datasets as tfds

    parent = os.path.dirname(os.path.abspath(directory))
    os.makedirs(parent, exist_ok=True)
    stage = tempfile.mkdtemp(prefix=".fashion_mnist-", dir=parent)
    try:
        manager = tfds.download.DownloadManager(
            download_dir=os.path.join(stage, "downloads"), dataset_name="fashion_mnist"
        )
        # one at a time: a failed download then leaves no other still writing into the folder removed below
        downloaded = {name: manager.download(url) for name, url in _fashion_mnist_urls().items()}
        missing = [name for name in FASHION_MNIST_FILES if not os.path.isfile(downloaded.get(name, ""))]
        if missing:
            raise SourceError(f"the download manager returned no {', '.join(missing)}")
        os.makedirs(directory, exist_ok=True)
        for name in FASHION_MNIST_FILES:  # all four are complete here; each move is atomic
            os.replace(downloaded[name], os.path.join(directory, name))
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _fetch_fashion_mnist(directory: str) -> str | None:
    """Downloads Fashion-MNIST into ``directory`` when its host answers; None on success, else why not."""
    try:
        probe = _fashion_mnist_urls()["train-labels-idx1-ubyte.gz"]
    except Exception as e:  # tensorflow_datasets missing or without a fashion_mnist builder
        return f"no Fashion-MNIST download address ({type(e).__name__}: {e})"
    if not _downloadable(probe):
        return f"no answer from {urllib.parse.urlsplit(probe).hostname} (offline)"
    print(f"notice: downloading Fashion-MNIST with tensorflow_datasets into {directory} (once)", flush=True)
    try:
        _download_fashion_mnist(directory)
    except Exception as e:  # network, checksum and file-system errors of every kind
        return f"could not download Fashion-MNIST ({type(e).__name__}: {' '.join(str(e).split())})"
    return None


def demo_source() -> str:
    """The demo's labelled source spec: Fashion-MNIST where it can be had, else scikit-learn's digits.

    ``fashion_mnist`` when Debian's dataset-fashion-mnist is :func:`installed`; else
    ``fashion_mnist:<cache>`` (see :func:`_fashion_mnist_cache`) when the four IDX files are there
    (no network access) or can be downloaded now (the download host is probed first, so an offline
    machine waits ~3 s, not for a download to time out); else ``digits``, with one ``notice:`` line
    saying why.
    """
    if installed():
        return "fashion_mnist"
    cache = _fashion_mnist_cache()
    why_not = None if _has_fashion_mnist(cache) else _fetch_fashion_mnist(cache)
    if why_not is None:
        return f"fashion_mnist:{cache}"
    print(
        f"notice: no Fashion-MNIST in {FASHION_MNIST_DIR} (apt-get install dataset-fashion-mnist) and {why_not}; "
        "the demo uses scikit-learn's bundled digits",
        flush=True,
    )
    return "digits"


def _open(spec: str, args: list[str], split: str | None) -> ArraySource:
    """The spec's split (or ``split``) of the IDX files in its directory (default Debian's)."""
    directory, own = FASHION_MNIST_DIR, "train"
    for arg in args:
        if arg in SPLITS:
            own = arg
        else:
            directory = arg
    split = split or own
    return classified(f"fashion_mnist/{split}", *arrays(directory, split), FASHION_MNIST_CLASSES)


KIND = Kind("fashion_mnist", "fashion_mnist[:DIR][:SPLIT]", _open, lambda args, split: list(FASHION_MNIST_CLASSES))
