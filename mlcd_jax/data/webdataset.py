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

import concurrent.futures
import dataclasses
import functools
import gzip
import itertools
import os
import re
import zlib
from collections.abc import Iterable, Iterator
from typing import Any
from typing import BinaryIO

from etils import epath

from mlcd_jax.data.source_base import IMAGE_EXTENSIONS, Chunks, Encoded, Read, SourceError, decode_caption, identity_digest

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


def sample_name(member: str) -> tuple[str, str]:
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


class TarChunks(Chunks):
    """A ``wds:`` source as the clustering job reads it: one chunk per tar file, streamed, so the image
    count is known once every tar was read and ``limit`` does not apply (name fewer tars instead)."""

    num_images = None

    def __init__(self, pattern: str, limit: int = 0) -> None:
        if limit:
            raise SourceError("limit does not apply to a wds: source (its size is known once read): "
                              "name fewer tar files in the pattern instead")
        self.tars = WebDatasetSource(pattern)
        self.num_chunks = self.tars.num_shards

    def chunk_size(self, chunk: int) -> None:
        return None

    def identity(self) -> dict[str, Any]:
        return identity_digest(self.tars.identity_parts(), None)

    def batches(self, chunk: int, size: int) -> Iterator[tuple[list[int], list[Read]]]:
        """The tar read as a stream on the caller's thread, a batch at a time (a ``Skipped`` entry reads
        as undecodable)."""
        entries = enumerate(self.tars.read(chunk))
        while batch := list(itertools.islice(entries, size)):
            yield [p for p, _ in batch], [functools.partial(_encoded, e) for _, e in batch]

    def items(self, chunk: int, positions: list[int], pool: concurrent.futures.Executor) -> Iterable[dict[str, Any]]:
        """The tar read again; an entry that is no longer a readable image (the tar changed since it
        was first read) raises ``SourceError`` instead of pairing labels with other images."""
        wanted = iter(positions)
        target = next(wanted, None)
        for position, entry in enumerate(self.tars.read(chunk)):
            if position != target:
                continue
            if not isinstance(entry, Sample):
                break
            yield {"key": entry.key, "image": entry.image, "caption": entry.caption}
            target = next(wanted, None)
        if target is not None:
            raise SourceError(f"{self.tars.shards[chunk]} changed since it was embedded (entry {target} is no "
                              "longer a readable image): re-run with a new output_dir")

    def fit_sample(self, n: int, seed: int) -> list[Read]:
        """The first ``n`` entries in tar order, reading no more tars than that takes."""
        entries = itertools.chain.from_iterable(self.tars.read(s) for s in range(self.tars.num_shards))
        return [functools.partial(_encoded, e) for e in itertools.islice(entries, n)]


def _encoded(entry: Sample | Skipped) -> Encoded:
    return (entry.key, None, entry.error) if isinstance(entry, Skipped) else (entry.key, entry.image, None)


class TarError(Exception):
    """A tar stream that is truncated or not a tar (a bad header checksum); ``member``: the name of the
    file member whose data it cut short, when its header was read."""

    def __init__(self, message: str, member: str | None = None) -> None:
        super().__init__(message)
        self.member = member


_BLOCK = 512
_READ = 1 << 22  # bytes per read of the underlying file


def _members(stream: BinaryIO) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of a seekable tar stream's regular files, in order: POSIX ustar, GNU long names and
    PAX ``path`` records, gzip-compressed or not. A lean reader (headers parsed from large reads), several
    times faster than ``tarfile``'s stream mode; raises ``TarError`` where the stream ends early or a
    header is corrupt."""
    gzipped = stream.read(2) == b"\x1f\x8b"
    stream.seek(0)
    if gzipped:
        stream = gzip.GzipFile(fileobj=stream)
    buffer, pos, long_name, first = bytearray(), 0, None, True

    def need(n: int) -> bool:
        """At least ``n`` bytes from ``pos`` in the buffer (False at the end of the stream)."""
        nonlocal buffer, pos
        if len(buffer) - pos >= n:
            return True
        del buffer[:pos]
        pos = 0
        while len(buffer) < n:
            more = stream.read(max(_READ, n - len(buffer)))
            if not more:
                return False
            buffer += more
        return True

    while True:
        if not need(_BLOCK):
            if len(buffer) == pos:
                return  # no end-of-archive blocks, but the last member is whole (tarfile accepts this too)
            raise TarError("the stream ends inside a member header")
        header = bytes(buffer[pos : pos + _BLOCK])
        if header.count(0) == _BLOCK:
            return  # end of archive
        stored = header[148:156].split(b"\0", 1)[0].strip()
        if not stored or not stored.isdigit() or int(stored, 8) != sum(header[:148]) + 256 + sum(header[156:]):
            if first:
                raise TarError(f"it is not a tar{' (gzip-compressed data that holds no tar)' if gzipped else ''}")
            raise TarError("a member header is corrupt (bad checksum)")
        first = False
        size = int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
        kind = header[156:157]
        name = long_name
        if name is None:
            name = header[0:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            prefix = header[345:500].split(b"\0", 1)[0] if header[257:262] == b"ustar" else b""
            if prefix:
                name = prefix.decode("utf-8", "surrogateescape") + "/" + name
        is_file = kind in (b"0", b"\0", b"7")  # regular files (7: contiguous)
        padded = -(-size // _BLOCK) * _BLOCK
        if not need(_BLOCK + padded):
            raise TarError(f"the stream ends inside a member ({size} bytes announced)", name if is_file else None)
        data = bytes(buffer[pos + _BLOCK : pos + _BLOCK + size])
        pos += _BLOCK + padded
        if kind in (b"L", b"x"):  # GNU long name / PAX extended header: the next member's name
            long_name = data.rstrip(b"\0").decode("utf-8", "surrogateescape") if kind == b"L" else _pax_path(data)
            continue
        long_name = None
        if is_file:
            yield name, data


def _pax_path(records: bytes) -> str | None:
    """The ``path`` of PAX extended-header records (``"<len> key=value\\n"`` each), or None."""
    pos = 0
    while pos < len(records):
        space = records.index(b" ", pos)
        length = int(records[pos:space])
        key, _, value = records[space + 1 : pos + length - 1].partition(b"=")
        if key == b"path":
            return value.decode("utf-8", "surrogateescape")
        pos += length
    return None


def _samples(stream: BinaryIO, prefix: str, path: str) -> Iterator[Sample | Skipped]:
    """Groups a tar stream's members into samples (see the module docstring)."""
    current: str | None = None
    members: dict[str, tuple[str, bytes]] = {}  # extension -> (member name, bytes)
    count = 0
    seen: set[str] = set()  # keys of the samples before: a repeated one would be two records of one key
    repeated = False  # the current sample has a member twice

    def finish() -> Sample | Skipped:
        if repeated:
            return Skipped(f"{prefix}/{current}", "the tar holds a member of this sample twice: which is the "
                                                  "sample's is unknown, so it is skipped")
        if current in seen:
            return Skipped(f"{prefix}/{current}", "the tar repeats this key after other samples: the first "
                                                  "sample with it is kept, this one skipped")
        seen.add(current)
        image = next(((name, data) for ext, (name, data) in members.items()
                      if ext.lower().endswith(IMAGE_EXTENSIONS)), None)
        if image is None:
            return Skipped(f"{prefix}/{current}", f"sample has no image member ({', '.join(sorted(members))})")
        caption = members.get(CAPTION_EXTENSION)
        return Sample(f"{prefix}/{image[0]}", image[1], decode_caption(caption[1]) if caption else None)

    try:
        for name, data in _members(stream):
            key, ext = sample_name(name)
            if key != current and current is not None:
                yield finish()
                count += 1
                members, repeated = {}, False
            current = key
            if ext in members:
                repeated = True
                continue
            members[ext] = (name, data)
    except (TarError, ValueError, EOFError, OSError, zlib.error) as e:  # zlib, EOFError: a truncated .tar.gz
        # The sample being read may miss members: it is skipped with the rest of the tar. When the cut
        # member starts another sample, the one before it is whole.
        cut = sample_name(e.member)[0] if isinstance(e, TarError) and e.member else None
        if cut is not None and current is not None and cut != current:
            yield finish()
            count += 1
            current = cut
        where = f"{prefix}/{current}" if current is not None else f"{prefix}/"
        yield Skipped(where, f"{path} ends early after {count} whole samples, this one and any later ones "
                             f"unread ({type(e).__name__}: {e})")
        return
    if current is not None:
        yield finish()
