"""Atomic file outputs (temp file in the same directory, fsync, rename) and the job's directory layout.

Every artefact of the clustering job appears whole or not at all, so "the file exists" is the
completion marker a re-run trusts.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from typing import Any, BinaryIO

import numpy as np


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yields a temporary path next to ``path``; renames it onto ``path`` only if the block succeeds."""
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
    with open(path, encoding="utf-8") as f:
        return json.load(f)


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
