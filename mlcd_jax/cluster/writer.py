"""Atomic ArrayRecord shard writing (one shard per call, reusable from Beam)."""

from __future__ import annotations

from collections.abc import Iterable

from array_record.python.array_record_module import ArrayRecordWriter

from mlcd_jax import fileio

# group_size:1 keeps every record individually addressable, which grain's random access needs.
WRITER_OPTIONS = "group_size:1"


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
