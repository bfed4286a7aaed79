"""``arrayrecord:GLOB``: MLCD records (:mod:`mlcd_jax.data.records`), e.g. to re-cluster existing shards
with another teacher; no splits, label None."""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable
from typing import Any

from mlcd_jax.data import records
from mlcd_jax.data.source_base import SourceError, item
from mlcd_jax.data.sources.base import Kind


class ArrayRecordSource:
    """MLCD records in ArrayRecord files (sorted glob matches, concatenated)."""

    def __init__(self, pattern: str) -> None:
        import grain

        paths = sorted(glob.glob(pattern))
        if not paths:
            raise SourceError(f"arrayrecord:{pattern} matches no files")
        self.pattern, self.paths, self.source = pattern, paths, grain.sources.ArrayRecordDataSource(paths)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        rec = records.decode(self.source[index])
        return item(rec["key"], rec["image"], None, rec["caption"])

    def identity_parts(self, num_images: int) -> Iterable[str]:
        return [*(f"{os.path.basename(p)}:{os.path.getsize(p)}" for p in self.paths), str(num_images)]

    def key(self, index: int) -> str:
        return f"record {index}"  # a record's own key is inside it

    def __repr__(self) -> str:
        return f"ArrayRecordSource({self.pattern!r}, n={len(self)})"


def _open(spec: str, args: list[str], split: str | None) -> ArrayRecordSource:
    if split is not None:
        raise SourceError(f"{spec!r} has no splits: load one of fashion_mnist, digits, emoji, tfds:NAME or folder:DIR")
    return ArrayRecordSource(args[0])


KIND = Kind("arrayrecord", "arrayrecord:GLOB", _open, path=True)
