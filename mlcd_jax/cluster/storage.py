"""Atomic file outputs and the job's directory layout, on local disks and object stores (``gs://...``).

Every artefact of the clustering job appears whole or not at all, so "the file exists" is the
completion marker a re-run trusts. Locally: a temp file in the same directory, fsync, rename. On an
object store (any ``scheme://`` path, read and written through ``etils.epath``): the file is written to
a local temp file (ArrayRecord and faiss need one) and uploaded in one go; the store publishes an object
only when its upload completes, so a killed writer leaves nothing behind. Existence checks on a store
bypass fsspec's listing cache, since other processes (workers) add files there.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from typing import Any, BinaryIO

import fsspec
import numpy as np
from etils import epath

from mlcd_jax.fileio import is_remote

_COPY_BUFFER = 16 << 20


def _uncached_fs(path: str) -> fsspec.AbstractFileSystem:
    """An fsspec view of ``path``'s store that keeps no directory listings: other processes write there."""
    return fsspec.core.url_to_fs(path, use_listings_cache=False)[0]


def exists(path: str) -> bool:
    return _uncached_fs(path).exists(path) if is_remote(path) else os.path.exists(path)


def existing(paths: Iterable[str]) -> set[str]:
    """The subset of ``paths`` that exist, listing each parent directory once (not one request per file)."""
    by_dir: dict[str, set[str]] = collections.defaultdict(set)
    for path in paths:
        by_dir[os.path.dirname(path)].add(path)
    found: set[str] = set()
    for directory, wanted in by_dir.items():
        try:
            if is_remote(directory):
                names = {p.rstrip("/").rsplit("/", 1)[-1] for p in _uncached_fs(directory).ls(directory, detail=False)}
            else:
                names = set(os.listdir(directory))
        except FileNotFoundError:
            continue
        found |= {p for p in wanted if os.path.basename(p) in names}
    return found


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yields a local temporary path; it becomes ``path`` (renamed or uploaded) only if the block succeeds."""
    if is_remote(path):
        with tempfile.TemporaryDirectory(prefix="mlcd_upload_") as directory:
            tmp = os.path.join(directory, os.path.basename(path))
            yield tmp
            with open(tmp, "rb") as src, epath.Path(path).open("wb") as dst:
                shutil.copyfileobj(src, dst, _COPY_BUFFER)
        return
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def atomic_file(path: str) -> Iterator[BinaryIO]:
    """An open binary file whose contents replace ``path`` atomically when the block succeeds."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        yield f


def save_npz(path: str, **arrays: Any) -> None:
    """``np.savez`` (uncompressed), atomically."""
    with atomic_file(path) as f:
        np.savez(f, **arrays)


def save_npy(path: str, array: np.ndarray) -> None:
    """``np.save``, atomically."""
    with atomic_file(path) as f:
        np.save(f, array)


def save_json(path: str, obj: Any) -> None:
    """Pretty, key-sorted JSON, atomically (so equal content gives equal bytes)."""
    with atomic_file(path) as f:
        f.write((json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def load_json(path: str) -> Any:
    return json.loads(epath.Path(path).read_text(encoding="utf-8"))


@contextlib.contextmanager
def load_npz(path: str) -> Iterator[np.lib.npyio.NpzFile]:
    """``np.load`` of an ``.npz`` (arrays read lazily, also from an object store)."""
    with epath.Path(path).open("rb") as f, np.load(f) as z:
        yield z


def load_npy(path: str) -> np.ndarray:
    with epath.Path(path).open("rb") as f:
        return np.load(f)


def npy_shape(path: str) -> tuple[int, ...]:
    """The shape of an ``.npy`` array, from its header only."""
    with epath.Path(path).open("rb") as f:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        return read_header(f)[0]


@contextlib.contextmanager
def local_copy(path: str) -> Iterator[str]:
    """``path`` itself when local, else a temporary local copy (for readers that need a file, e.g. faiss)."""
    if not is_remote(path):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="mlcd_download_") as directory:
        tmp = os.path.join(directory, os.path.basename(path))
        with epath.Path(path).open("rb") as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, _COPY_BUFFER)
        yield tmp


class Layout:
    """Paths of one job's outputs under ``root``; chunk ``c`` covers source images [c*S, (c+1)*S)."""

    def __init__(self, root: str, num_chunks: int) -> None:
        self.root, self.num_chunks = root, num_chunks

    def path(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    @property
    def job(self) -> str:
        return self.path("job.json")

    @property
    def manifest(self) -> str:
        return self.path("manifest.json")

    @property
    def centroids(self) -> str:
        return self.path("centroids.npy")

    @property
    def kmeans_state(self) -> str:
        return self.path("kmeans", "state.npz")

    @property
    def kmeans_info(self) -> str:
        return self.path("kmeans", "info.json")

    @property
    def ivf_index(self) -> str:
        return self.path("kmeans", "ivf.faiss")

    def embeddings(self, chunk: int) -> str:
        return self.path("embeddings", f"{chunk:05d}.npz")

    def assignment(self, chunk: int) -> str:
        return self.path("assignments", f"{chunk:05d}.npz")

    def shard_name(self, chunk: int) -> str:
        return os.path.join("shards", f"shard-{chunk:05d}-of-{self.num_chunks:05d}.array_record")

    def shard(self, chunk: int) -> str:
        return self.path(self.shard_name(chunk))
