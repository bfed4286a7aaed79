"""WebDataset tar shards (what ``img2dataset`` writes: ``00000.tar`` holding ``<key>.jpg``, ``<key>.txt``,
``<key>.json`` per sample) as a source of the clustering job, read as streams: never unpacked, never indexed.

``wds:PATTERN``: a path or ``gs://`` URL with brace ranges and lists (``gs://b/laion/{00000..41407}.tar``,
``DIR/{a,b}.tar``); an expanded name holding ``*``, ``?`` or ``[`` is globbed (a listing of tar names only).
Each tar file is one unit of work (a chunk of the job, one output shard), so worker ``w`` of ``n`` opens
only its own tar files; nothing lists or counts the samples of other tars, and the total image count is
known only once every tar has been read.

A sample is the run of consecutive members whose names share the part before the first dot of the base
name (WebDataset's rule). Its image is the first member with an image extension, its caption the ``.txt``
member (UTF-8, else Latin-1), other members (``.json`` metadata, ...) are ignored. The key is
``<tar stem>/<image member's name>``: the same key a ``folder:`` source gives for the same files
unpacked one folder per tar. A sample without an image, and the rest of a tar that ends early (truncated
or corrupt), become ``Skipped`` entries that the job lists as it lists undecodable images.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tarfile
import zlib
from collections.abc import Iterator
from typing import BinaryIO

from etils import epath

from mlcd_jax.data.sources import IMAGE_EXTENSIONS, SourceError, decode_caption

SPEC_PREFIX = "wds:"
CAPTION_EXTENSION = ".txt"
_RANGE = re.compile(r"(\d+)\.\.(\d+)")
_BRACES = re.compile(r"\{([^{}]*)\}")


@dataclasses.dataclass(frozen=True)
class Sample:
    """One WebDataset sample: its key, image bytes and caption (None without a ``.txt`` member)."""

    key: str
    image: bytes
    caption: str | None


@dataclasses.dataclass(frozen=True)
class Skipped:
    """What could not be read: a sample without an image, or the unread rest of a broken tar."""

    key: str
    error: str


def expand_braces(pattern: str) -> list[str]:
    """``pattern`` with every ``{A..B}`` (zero-padded to A's width) and ``{x,y}`` expanded, left to right."""
    match = _BRACES.search(pattern)
    if match is None:
        if "{" in pattern or "}" in pattern:
            raise SourceError(f"wds pattern {pattern!r} has an unbalanced brace")
        return [pattern]
    head, body, tail = pattern[: match.start()], match.group(1), pattern[match.end():]
    numeric = _RANGE.fullmatch(body)
    if numeric:
        lo, hi = numeric.group(1), numeric.group(2)
        if int(lo) > int(hi):
            raise SourceError(f"wds pattern {pattern!r}: the range {{{lo}..{hi}}} counts down")
        options = [f"{i:0{len(lo)}d}" for i in range(int(lo), int(hi) + 1)]
    else:
        options = body.split(",")
    return [name for option in options for name in expand_braces(head + option + tail)]


def _glob(name: str) -> list[str]:
    """The tar files matching ``name`` (local or ``gs://``), sorted; ``name`` itself without wildcards."""
    if not any(ch in name for ch in "*?["):
        return [name]
    path = epath.Path(name)
    parts = path.parts
    first = next(i for i, part in enumerate(parts) if any(ch in part for ch in "*?["))
    root = epath.Path(*parts[:first]) if first else epath.Path(".")
    return sorted(os.fspath(p) for p in root.glob("/".join(parts[first:])))


def _sample_name(member: str) -> tuple[str, str]:
    """(sample key, extension) of a member name: ``a/b.x.jpg`` -> (``a/b``, ``.x.jpg``)."""
    directory, base = os.path.split(member)
    stem, dot, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), dot + ext


class WebDatasetSource:
    """The tar files of a ``wds:`` pattern; ``read(shard)`` streams one tar's samples."""

    def __init__(self, pattern: str) -> None:
        if not pattern:
            raise SourceError("source 'wds:' needs a pattern: wds:DIR/{00000..00099}.tar or wds:gs://BUCKET/...")
        self.pattern = pattern
        self.shards = [path for name in expand_braces(pattern) for path in _glob(name)]
        if not self.shards:
            raise SourceError(f"wds:{pattern} matches no tar files")
        duplicates = len(self.shards) - len(set(self.shards))
        if duplicates:
            raise SourceError(f"wds:{pattern} names {duplicates} tar file(s) twice")

    @property
    def num_shards(self) -> int:
        return len(self.shards)

    def shard_key(self, shard: int) -> str:
        """The prefix of shard ``shard``'s keys: its file name without the ``.tar`` extension."""
        name = os.path.basename(self.shards[shard])
        return name[: -len(".tar")] if name.endswith(".tar") else name

    def identity_parts(self) -> list[str]:
        """The pattern and its tar names (not their contents: that would read every tar)."""
        return [f"wds:{self.pattern}", *self.shards]

    def read(self, shard: int) -> Iterator[Sample | Skipped]:
        """The samples of tar ``shard`` in the tar's order; a missing tar raises ``SourceError``."""
        path, prefix = self.shards[shard], self.shard_key(shard)
        try:
            stream = epath.Path(path).open("rb")
        except (FileNotFoundError, OSError) as e:
            raise SourceError(f"wds shard {path} cannot be opened ({e}): fix the pattern or the file") from e
        with stream:
            yield from _samples(stream, prefix, path)

    def __repr__(self) -> str:
        return f"WebDatasetSource({self.pattern!r}, shards={len(self.shards)})"


def _samples(stream: BinaryIO, prefix: str, path: str) -> Iterator[Sample | Skipped]:
    """Groups a tar stream's members into samples (see the module docstring)."""
    current: str | None = None
    members: dict[str, tuple[str, bytes]] = {}  # extension -> (member name, bytes)
    count = 0

    def finish() -> Sample | Skipped:
        image = next(((name, data) for ext, (name, data) in members.items()
                      if ext.lower().endswith(IMAGE_EXTENSIONS)), None)
        if image is None:
            return Skipped(f"{prefix}/{current}", f"sample has no image member ({', '.join(sorted(members))})")
        caption = members.get(CAPTION_EXTENSION)
        return Sample(f"{prefix}/{image[0]}", image[1], decode_caption(caption[1]) if caption else None)

    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = _sample_name(member.name)
                if key != current and current is not None:
                    yield finish()
                    count += 1
                    members = {}
                current = key
                members[ext] = (member.name, tar.extractfile(member).read())
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:  # zlib: a truncated .tar.gz
        # The sample being read may miss members: it is skipped with the rest of the tar.
        where = f"{prefix}/{current}" if current is not None else f"{prefix}/"
        yield Skipped(where, f"{path} ends early after {count} whole samples, this one and any later ones "
                             f"unread ({type(e).__name__}: {e})")
        return
    if current is not None:
        yield finish()
