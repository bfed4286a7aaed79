"""The training record: one image, its top-l cluster ids and cosine scores, a key, an optional caption.

Binary layout of version 1 (all integers little-endian; no TensorFlow or protobuf needed to read it)::

    b"MLCD"                      4-byte magic
    uint16 version               = 1
    uint32 header_len            length of the UTF-8 JSON header that follows
    header (JSON)                {"key": str, "caption": str | null, "l": int, "image_len": int}
    int32[l]   labels            cluster ids, best first
    float32[l] scores            cosine similarity to each cluster's centroid, descending
    image bytes                  the source's original encoded bytes (JPEG/PNG/...), or a lossless PNG
                                 of the exact pixels for sources that only have raw arrays (IDX, digits)

Variable positives (similarity-threshold assignment, the paper's Tab. 5d) are **padded to a fixed l
with label -1 and score -inf** by the clustering job, so every record of a dataset has the same l;
the losses treat -1 as padding. A reader given a version it does not know raises
``UnsupportedRecordVersion`` naming both versions.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np

MAGIC = b"MLCD"
VERSION = 1
PAD_LABEL = -1
PAD_SCORE = float("-inf")
_PREFIX = struct.Struct("<4sHI")


class RecordError(ValueError):
    """A byte string is not a (readable) MLCD record."""


class UnsupportedRecordVersion(RecordError):
    """The record was written by a newer (or unknown) schema version."""


def encode(
    image: bytes,
    labels: np.ndarray,
    scores: np.ndarray,
    key: str,
    caption: str | None = None,
) -> bytes:
    """Serialises one record; ``labels``/``scores`` are [l] with scores in descending order."""
    labels = np.asarray(labels, dtype="<i4").reshape(-1)
    scores = np.asarray(scores, dtype="<f4").reshape(-1)
    if labels.shape != scores.shape:
        raise ValueError(f"labels {labels.shape} and scores {scores.shape} must have the same length l")
    if np.any(scores[1:] > scores[:-1]):
        raise ValueError(f"scores of record {key!r} must be in descending order, got {scores.tolist()}")
    header = json.dumps(
        {"key": key, "caption": caption, "l": int(labels.size), "image_len": len(image)},
        ensure_ascii=False, sort_keys=True, separators=(",", ":"),
    ).encode()
    return b"".join((_PREFIX.pack(MAGIC, VERSION, len(header)), header, labels.tobytes(), scores.tobytes(), image))


def decode(data: bytes) -> dict[str, Any]:
    """Parses a record into ``dict(image=bytes, labels=int32[l], scores=float32[l], key=str, caption=str|None)``."""
    if len(data) < _PREFIX.size:
        raise RecordError(f"record of {len(data)} bytes is too short to hold the {_PREFIX.size}-byte prefix")
    magic, version, header_len = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise RecordError(f"not an MLCD record: magic {magic!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise UnsupportedRecordVersion(
            f"record schema version {version} is not supported by this reader (it reads version {VERSION}); "
            "upgrade mlcd_jax or re-run the clustering job"
        )
    start = _PREFIX.size
    try:
        header = json.loads(data[start : start + header_len])
        l, image_len = int(header["l"]), int(header["image_len"])
    except (ValueError, KeyError, TypeError) as e:
        raise RecordError(f"corrupt record header: {e}") from e
    offset = start + header_len
    if len(data) != offset + 8 * l + image_len:
        raise RecordError(f"record {header['key']!r} has {len(data)} bytes, expected {offset + 8 * l + image_len}")
    labels = np.frombuffer(data, dtype="<i4", count=l, offset=offset).astype(np.int32)
    scores = np.frombuffer(data, dtype="<f4", count=l, offset=offset + 4 * l).astype(np.float32)
    return {
        "image": bytes(data[offset + 8 * l :]),
        "labels": labels,
        "scores": scores,
        "key": header["key"],
        "caption": header["caption"],
    }


def pad_labels(labels: np.ndarray, l: int) -> np.ndarray:
    """Truncates or pads (with -1) one image's positive ids to exactly ``l`` entries, best first."""
    out = np.full(l, PAD_LABEL, np.int32)
    n = min(l, len(labels))
    out[:n] = labels[:n]
    return out


def pad_positives(labels: np.ndarray, scores: np.ndarray, l: int) -> tuple[np.ndarray, np.ndarray]:
    """Truncates or pads ([l] with -1 / -inf) one image's positives to exactly ``l`` entries."""
    out_scores = np.full(l, PAD_SCORE, np.float32)
    n = min(l, len(scores))
    out_scores[:n] = scores[:n]
    return pad_labels(labels, l), out_scores
