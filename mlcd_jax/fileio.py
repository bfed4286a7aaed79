"""Reads and writes of outputs whose paths may be local or on an object store (``gs://``), via etils.epath.

The one place for path I/O that both the trainer (workdir) and the clustering job (output_dir) use.
Object stores have no append, no rename and no folders, so a whole object is the unit of writing:
locally an output is a temporary file in the same folder, fsync, rename; on a store it is written to a
local temporary file (ArrayRecord and faiss need one) and uploaded in one go, and the store publishes an
object only when its upload completes. Either way readers see the old or the new content, never a
part, and a killed writer leaves nothing behind. epath picks the backend: ``gcsfs`` for ``gs://``
(TensorFlow's gfile instead when TensorFlow is installed), the local file system otherwise.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from typing import Any, BinaryIO

import fsspec
from etils import epath

PathLike = str | os.PathLike

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_COPY_BUFFER = 16 << 20


def is_remote(path: PathLike) -> bool:
    """True for an object-store URL such as ``gs://bucket/run``, False for a local path."""
    return bool(_URL.match(os.fspath(path)))


def makedirs(path: PathLike) -> None:
    """Creates a local folder and its parents; nothing for an object store, which has no folders
    (and where gcsfs's ``makedirs`` would create a missing *bucket*)."""
    if not is_remote(path):
        epath.Path(path).mkdir(parents=True, exist_ok=True)


def _uncached_fs(path: str) -> fsspec.AbstractFileSystem:
    """An fsspec view of ``path``'s store that keeps no directory listings: other processes write there."""
    return fsspec.core.url_to_fs(path, use_listings_cache=False)[0]


def exists(path: str) -> bool:
    """Whether ``path`` exists; on a store asked afresh (not from a listing cached before others wrote)."""
    return _uncached_fs(path).exists(path) if is_remote(path) else os.path.exists(path)


def existing(paths: Iterable[str]) -> set[str]:
    """The subset of ``paths`` that exist, listing each parent folder once (not one request per file)."""
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


def _umask() -> int:
    """The process's umask (read by setting it and setting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[str]:
    """Yields a local temporary path; it becomes ``path`` (renamed or uploaded) only if the block succeeds."""
    path = os.fspath(path)
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
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would hide shared outputs from the team
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def atomic_file(path: PathLike) -> Iterator[BinaryIO]:
    """An open binary file whose contents replace ``path`` atomically when the block succeeds."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        yield f


def write_atomic(path: PathLike, data: str | bytes) -> None:
    """Writes ``data`` (text as UTF-8) to ``path`` atomically."""
    with atomic_file(path) as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)


def load_json(path: PathLike) -> Any:
    return json.loads(epath.Path(path).read_text(encoding="utf-8"))


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
