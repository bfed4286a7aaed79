"""The clustering job's on-disk formats (npz / npy / JSON, written atomically) and its output layout.

Every artefact of the clustering job appears whole or not at all (``mlcd_jax.fileio``: rename locally,
one upload on ``gs://``), so "the file exists" is the completion marker a re-run trusts.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
from etils import epath

from mlcd_jax.fileio import atomic_file, write_atomic


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
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


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
    def kmeans_dir(self) -> str:
        """k-means checkpoints (``mlcd_jax.cluster.kmeans.state_paths``), its info and the IVF index."""
        return self.path("kmeans")

    @property
    def kmeans_info(self) -> str:
        return os.path.join(self.kmeans_dir, "info.json")

    @property
    def ivf_index(self) -> str:
        return os.path.join(self.kmeans_dir, "ivf.faiss")

    def embeddings(self, chunk: int) -> str:
        return self.path("embeddings", f"{chunk:05d}.npz")

    def assignment(self, chunk: int) -> str:
        return self.path("assignments", f"{chunk:05d}.npz")

    def shard_name(self, chunk: int) -> str:
        return os.path.join("shards", f"shard-{chunk:05d}-of-{self.num_chunks:05d}.array_record")

    def shard(self, chunk: int) -> str:
        return self.path(self.shard_name(chunk))
