"""Record encoding and atomic ArrayRecord shard writing (per record / per shard, reusable from Beam)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter

from mlcd_jax import fileio
from mlcd_jax.data import records

# group_size:1 keeps every record individually addressable, which grain's random access needs.
WRITER_OPTIONS = "group_size:1"


def encode_record(item: dict[str, Any], labels: np.ndarray, scores: np.ndarray) -> bytes:
    """One source item (``open_source(...)[i]``) with its assigned prototypes as a record."""
    return records.encode(item["image"], labels, scores, item["key"], item.get("caption"))


def write_shard(path: str, encoded: Iterable[bytes]) -> int:
    """Writes the records to one ArrayRecord file atomically; returns how many were written."""
    count = 0
    with fileio.atomic_path(path) as tmp:
        writer = ArrayRecordWriter(tmp, WRITER_OPTIONS)
        try:
            for rec in encoded:
                writer.write(rec)
                count += 1
        finally:
            writer.close()
    return count
