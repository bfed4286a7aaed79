"""Reads and writes of run outputs whose paths may be local or on an object store (``gs://``), via etils.epath.

Object stores have no append, no rename and no folders, so a whole object is the unit of writing:
:func:`write_atomic` is a temporary file + rename locally and one upload (published by GCS only once
complete) remotely. epath picks the backend: ``gcsfs`` for ``gs://`` (TensorFlow's gfile instead when
TensorFlow is installed), the local file system otherwise.
"""

from __future__ import annotations

import os
import re

from etils import epath

PathLike = str | os.PathLike

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_remote(path: PathLike) -> bool:
    """True for an object-store URL such as ``gs://bucket/run``, False for a local path."""
    return bool(_URL.match(os.fspath(path)))


def makedirs(path: PathLike) -> None:
    """Creates a local folder and its parents; nothing for an object store, which has no folders
    (and where gcsfs's ``makedirs`` would create a missing *bucket*)."""
    if not is_remote(path):
        epath.Path(path).mkdir(parents=True, exist_ok=True)


def write_atomic(path: PathLike, data: str | bytes) -> None:
    """Writes ``data`` (text as UTF-8) to ``path``: readers see the old or the new content, never a part.

    Local: a temporary file next to ``path`` (its folder is created), fsync, rename. Object store: one upload.
    """
    payload = data.encode("utf-8") if isinstance(data, str) else data
    path = epath.Path(path)
    if is_remote(path):
        path.write_bytes(payload)
        return
    makedirs(path.parent)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
