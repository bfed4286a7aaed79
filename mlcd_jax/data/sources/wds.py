"""``wds:PATTERN`` as a labelled split to evaluate on: WebDataset tars read at random, by offset, after
one pass over their headers (issue 30).

A sample is ``<key>.<image ext>`` with ``<key>.cls`` (its class id as text, as WebDataset's ImageNet
shards carry it) and optionally ``<key>.txt`` (a caption); the key is ``<tar stem>/<image member>``, as
the clustering job's. ``{split}`` in the pattern is replaced by the split evaluation reads
(``wds:DIR/imagenet-{split}-{000000..000146}.tar``). Opening reads every tar's headers once, seeking over
the data (and reading the small ``.cls`` / ``.txt`` members); an item's image bytes are read when asked.
Uncompressed tars only: a ``.tar.gz`` cannot be read at an offset. The clustering job streams the same
tars instead (:class:`~mlcd_jax.data.webdataset.TarChunks`).
"""

from __future__ import annotations

import dataclasses
import tarfile
from collections.abc import Iterable
from typing import Any

from etils import epath

from mlcd_jax.data.source_base import IMAGE_EXTENSIONS, SourceError, decode_caption, item
from mlcd_jax.data.sources.base import Kind
from mlcd_jax.data.webdataset import SPEC_PREFIX, TarChunks, WebDatasetSource, sample_name

LABEL_EXTENSION = ".cls"


@dataclasses.dataclass(frozen=True)
class _Entry:
    tar: int
    offset: int
    size: int
    key: str
    label: int | None
    caption: str | None


class TarIndexSource:
    """Random access to the samples of a ``wds:`` pattern's tars (one split), indexed on opening."""

    def __init__(self, pattern: str) -> None:
        self.tars = WebDatasetSource(pattern)
        self.entries: list[_Entry] = []
        for tar in range(self.tars.num_shards):
            self.entries.extend(self._index(tar))

    def _index(self, tar: int) -> list[_Entry]:
        """The samples of tar ``tar`` in its order: one pass over its headers."""
        path, prefix = self.tars.shards[tar], self.tars.shard_key(tar)
        if path.endswith((".gz", ".tgz")):
            raise SourceError(f"{path}: a compressed tar cannot be read at an offset; evaluate on uncompressed tars")
        entries, sample, current = [], {}, None

        def finish() -> None:
            if current is None:
                return
            if "image" not in sample:
                raise SourceError(f"{path}: sample {current!r} has no image member")
            name, offset, size = sample["image"]
            entries.append(_Entry(tar, offset, size, f"{prefix}/{name}", sample.get("label"), sample.get("caption")))

        try:
            with epath.Path(path).open("rb") as stream, tarfile.open(fileobj=stream, mode="r:") as archive:
                for member in archive:
                    if not member.isfile():
                        continue
                    key, ext = sample_name(member.name)
                    if key != current:
                        finish()
                        sample, current = {}, key
                    if ext.lower().endswith(IMAGE_EXTENSIONS) and "image" not in sample:
                        sample["image"] = (member.name, member.offset_data, member.size)
                    elif ext == LABEL_EXTENSION:
                        text = archive.extractfile(member).read().decode("ascii", "replace").strip()
                        if not text.isdigit():
                            raise SourceError(f"{path}: {member.name} holds {text[:20]!r}, not a class id")
                        sample["label"] = int(text)
                    elif ext == ".txt":
                        sample["caption"] = decode_caption(archive.extractfile(member).read())
                finish()
        except (OSError, tarfile.TarError) as e:
            raise SourceError(f"{path} cannot be indexed ({type(e).__name__}: {e})") from e
        return entries

    def __len__(self) -> int:
        return len(self.entries)

    def key(self, index: int) -> str:
        return self.entries[index].key

    def __getitem__(self, index: int) -> dict[str, Any]:
        entry = self.entries[index]
        with epath.Path(self.tars.shards[entry.tar]).open("rb") as stream:
            stream.seek(entry.offset)
            data = stream.read(entry.size)
        return item(entry.key, data, entry.label, entry.caption)

    def identity_parts(self, num_images: int) -> Iterable[str]:
        return [*self.tars.identity_parts(), *(e.key for e in self.entries[:num_images])]

    def __repr__(self) -> str:
        return f"TarIndexSource({SPEC_PREFIX}{self.tars.pattern!r}, {len(self)} samples)"


def open_wds_split(pattern: str, split: str | None) -> TarIndexSource:
    """The tars of ``pattern`` with ``{split}`` replaced by ``split`` (default ``train``)."""
    if "{split}" in pattern:
        return TarIndexSource(pattern.replace("{split}", split or "train"))
    if split is not None:
        raise SourceError(f"{SPEC_PREFIX}{pattern} has no {{split}} to name the {split!r} split's tars: "
                          f"write e.g. {SPEC_PREFIX}DIR/{{split}}-{{0000..0009}}.tar")
    return TarIndexSource(pattern)


KIND = Kind("wds", "wds:PATTERN (tars; {split} in it names the split)",
            lambda spec, args, split: open_wds_split(args[0], split), path=True,
            chunks=lambda args, limit: TarChunks(args[0], limit))  # the clustering job streams the tars
