"""Image sources for the clustering job and the evaluation, by spec string.

Specs (``open_source(spec)`` / ``open_split(spec, split)`` / ``load_arrays(spec, split, limit)`` /
``load_captioned(spec, split, limit)``):

- ``folder:DIR`` — every image file under DIR (recursive; .jpg .jpeg .png .bmp .gif .webp .tif .tiff),
  in sorted relative-path order; the key is the relative path, the bytes are the file's own bytes. If
  images sit in class sub-folders (``DIR/<class>/...``) the label is the index of ``<class>`` among the
  sorted class folders, else None. A sibling ``<stem>.txt`` is the caption (UTF-8, else read as
  Latin-1). ``open_split`` and ``load_arrays`` read ``DIR/<split>/<class>/...``, ``load_captioned``
  ``DIR/<split>/...`` (every image with a caption); the two loaders need all images of one size (the
  evaluators stream a split of any sizes, :mod:`mlcd_jax.evaluate.stream`).
- ``fashion_mnist[:DIR][:SPLIT]`` — the IDX files of Debian's ``dataset-fashion-mnist``
  (default DIR /usr/share/datasets/fashion-mnist); SPLIT is ``train`` (60,000, the default), ``test``
  (10,000) or ``all`` (train then test). E.g. ``fashion_mnist:test``, ``fashion_mnist:/data/fm:train``.
- ``digits[:SPLIT]`` — scikit-learn's bundled 8x8 digits; its values 0..16 are scaled to uint8 0..255
  by ``round(v * 255 / 16)``. ``train`` = the first 1,437 images (80 %, the default), ``test`` = the
  last 360, ``all`` = 1,797.
- ``emoji[:SIZE][:SPLIT]`` — the ~1,400 single-code-point emoji of Debian's ``fonts-noto-color-emoji``
  rendered on white at SIZE px (default 32), RGB, captioned with their Unicode names; no labels, keys
  ``U+1F304``; ``train``/``test`` is a fixed 80/20 split by a hash of the code point
  (:mod:`mlcd_jax.data.emoji`; rendered once, then cached under ``$MLCD_JAX_CACHE/emoji``).
- ``tfds:NAME[:SPLIT]`` — ``tfds.data_source`` of an already prepared TFDS dataset in ArrayRecord
  format (never downloads; :mod:`mlcd_jax.data.tfds_source`); the image feature is read undecoded, so
  the bytes are the stored originals (``tfds:fashion_mnist`` loads as uint8 [N, 28, 28, 1], like the
  IDX files).
- ``arrayrecord:GLOB`` — MLCD records (``mlcd_jax.data.records``), e.g. to re-cluster existing shards
  with another teacher; label None.
- ``wds:PATTERN`` — WebDataset tar shards, local or ``gs://``: the clustering job streams them
  (:mod:`mlcd_jax.data.webdataset`, through :mod:`mlcd_jax.data.chunks`); opened here, e.g. to evaluate
  on, their headers are indexed once and samples read by offset, ``{split}`` in the pattern naming the
  split and ``.cls`` members the labels (:mod:`mlcd_jax.data.wds_split`).

Raw-pixel sources (IDX, digits, emoji) store a lossless PNG of exactly their pixels; grayscale stays
grayscale. Fashion-MNIST's and digits' items are captioned from their class (:func:`class_names`) with
one of the CLIP-style ``source_base.CAPTION_TEMPLATES`` ("a photo of a sneaker."), picked by a CRC-32
of the item's pixels: the same image gets the same caption in every split spec and on every machine. The
captions are part of :func:`source_identity`, so a clustering job started before its source had
captions (or with other ones) is refused on resume instead of mixing shards with and without them.

:func:`mlcd_jax.data.fashion_mnist.demo_source` picks the demo's data: Debian's Fashion-MNIST, else the
same IDX files downloaded once (where the machine is online) into ``$MLCD_JAX_CACHE/fashion_mnist``,
else digits.
"""

from __future__ import annotations

import glob
import os
import zlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Protocol

import numpy as np

from mlcd_jax.data import augment, fashion_mnist, records
from mlcd_jax.data.source_base import (  # noqa: F401  (identity_digest: part of this module's interface)
    CAPTION_TEMPLATES, IMAGE_EXTENSIONS, SPLITS, SourceError, decode_caption, identity_digest, item,
)
from mlcd_jax.data.tfds_source import TfdsSource
from mlcd_jax.data.wds_split import open_wds_split

DIGITS_TRAIN = 1437
# Class names as CLIP's zero-shot prompts use them (lower case)
FASHION_MNIST_CLASSES = (
    "t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"
)
DIGIT_CLASSES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


class Source(Protocol):
    """Random access to ``{key, image (encoded bytes), label, caption}`` items."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict[str, Any]: ...

    def key(self, index: int) -> str:
        """Item ``index``'s key without reading it (what a job lists when reading fails)."""
        ...

    def identity_parts(self, num_images: int) -> Iterable[str]:
        """What tells the first ``num_images`` items apart from another set (see :func:`source_identity`)."""
        ...


def source_identity(source: Source, num_images: int) -> dict[str, Any]:
    """The image count and a SHA-256 of what names the first ``num_images`` items: a folder's sorted
    relative paths, ArrayRecord files' names and sizes, a dataset's name and split (and a raw-pixel
    source's keys and captions). A clustering job records it, so that resuming against a changed source
    is refused instead of mislabelling records (or mixing records with and without captions)."""
    return identity_digest(source.identity_parts(num_images), num_images)


def templated_captions(images: np.ndarray, labels: np.ndarray, names: Sequence[str]) -> list[str]:
    """A caption per image naming its class ``names[label]`` in one of ``CAPTION_TEMPLATES``, picked by a
    CRC-32 of the image's pixels (so it does not depend on the image's position in a split)."""
    return [
        CAPTION_TEMPLATES[zlib.crc32(np.ascontiguousarray(image)) % len(CAPTION_TEMPLATES)].format(names[label])
        for image, label in zip(images, labels)
    ]


class ArraySource:
    """Raw uint8 pixel arrays [N, H, W, C] served as lossless PNGs (IDX files, digits, emoji), with
    optional labels, captions and keys (default ``<name>/<index>``)."""

    def __init__(
        self,
        name: str,
        images: np.ndarray,
        labels: np.ndarray | None,
        captions: Sequence[str] | None = None,
        keys: Sequence[str] | None = None,
    ) -> None:
        self.name, self.images, self.labels, self.captions, self.keys = name, images, labels, captions, keys

    def __len__(self) -> int:
        return len(self.images)

    def key(self, index: int) -> str:
        return f"{self.name}/{index:08d}" if self.keys is None else self.keys[index]

    def __getitem__(self, index: int) -> dict[str, Any]:
        label = None if self.labels is None else int(self.labels[index])
        caption = None if self.captions is None else self.captions[index]
        return item(self.key(index), augment.encode_png(self.images[index]), label, caption)

    def identity_parts(self, num_images: int) -> Iterable[str]:
        """Name, count and image shape, then the own keys and the captions (what the records carry)."""
        parts = [self.name, str(num_images), str(self.images.shape[1:])]
        for names in (self.keys, self.captions):
            if names is not None:
                parts.extend(names[:num_images])
        return parts

    def __repr__(self) -> str:
        return f"ArraySource({self.name!r}, n={len(self)})"


def _walk_following_links(root: str) -> Iterator[tuple[str, list[str], list[str]]]:
    """``os.walk`` into symlinked folders too (each real folder once, so a link cycle ends)."""
    seen: set[str] = set()
    for directory, subdirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(directory)
        if real in seen:
            subdirs[:] = []
            continue
        seen.add(real)
        yield directory, subdirs, files


class FolderSource:
    """Image files under a directory, sorted by relative path; class sub-folders give labels."""

    def __init__(self, root: str) -> None:
        if not os.path.isdir(root):
            raise SourceError(f"folder source {root!r} is not a directory")
        self.root = root
        self.paths = sorted(
            os.path.relpath(os.path.join(d, f), root)
            for d, _, files in _walk_following_links(root)
            for f in files
            if f.lower().endswith(IMAGE_EXTENSIONS)
        )
        classes = sorted({p.split(os.sep)[0] for p in self.paths if os.sep in p})
        self.classes = {c: i for i, c in enumerate(classes)}

    def __len__(self) -> int:
        return len(self.paths)

    def identity_parts(self, num_images: int) -> Iterable[str]:
        return self.paths[:num_images]

    def key(self, index: int) -> str:
        return self.paths[index]

    def label(self, index: int) -> int | None:
        """Index of the image's class folder, or None for images directly under the root."""
        rel = self.paths[index]
        return self.classes[rel.split(os.sep)[0]] if os.sep in rel else None

    def __getitem__(self, index: int) -> dict[str, Any]:
        rel = self.paths[index]
        path = os.path.join(self.root, rel)
        with open(path, "rb") as f:
            image = f.read()
        caption_path = os.path.splitext(path)[0] + ".txt"
        caption = None
        if os.path.exists(caption_path):
            with open(caption_path, "rb") as f:
                caption = decode_caption(f.read())
        return item(rel, image, self.label(index), caption)

    def __repr__(self) -> str:
        return f"FolderSource({self.root!r}, n={len(self)})"


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


def _split_arg(spec: str, value: str, allowed: tuple[str, ...] = SPLITS) -> str:
    if value not in allowed:
        raise SourceError(f"{spec!r}: split {value!r} is not one of {', '.join(allowed)}")
    return value


def _digits_arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    labels = digits.target.astype(np.int64)
    part = {"train": slice(0, DIGITS_TRAIN), "test": slice(DIGITS_TRAIN, None), "all": slice(None)}[split]
    return images[part], labels[part]


def _parse(spec: str) -> tuple[str, list[str]]:
    kind, _, rest = spec.partition(":")
    if kind in ("folder", "arrayrecord", "wds"):
        if not rest:
            raise SourceError(f"source {spec!r} needs a path: {kind}:PATH")
        return kind, [rest]
    return kind, rest.split(":") if rest else []


def _fashion_args(spec: str, args: list[str]) -> tuple[str, str]:
    directory, split = fashion_mnist.FASHION_MNIST_DIR, "train"
    for arg in args:
        if arg in SPLITS:
            split = arg
        else:
            directory = arg
    return directory, split


def _emoji_args(spec: str, args: list[str]) -> tuple[int, str]:
    from mlcd_jax.data import emoji

    size, split = emoji.DEFAULT_SIZE, "train"
    for arg in args:
        if arg in SPLITS:
            split = arg
        elif arg.isdigit() and int(arg) > 0:
            size = int(arg)
        else:
            raise SourceError(f"{spec!r}: {arg!r} is neither a split ({', '.join(SPLITS)}) nor an image size in px")
    return size, split


def _unknown(spec: str) -> SourceError:
    return SourceError(
        f"unknown source {spec!r}: use folder:DIR, fashion_mnist[:DIR][:SPLIT], digits[:SPLIT], "
        "emoji[:SIZE][:SPLIT], tfds:NAME[:SPLIT], arrayrecord:GLOB or wds:PATTERN (tars; {split} in it names the split)"
    )


def _classified(name: str, images: np.ndarray, labels: np.ndarray, names: Sequence[str]) -> ArraySource:
    return ArraySource(name, images, labels, templated_captions(images, labels, names))


def _folder(directory: str, split: str | None) -> FolderSource:
    """``DIR``, or ``DIR/<split>`` when a split is given."""
    if split is None:
        return FolderSource(directory)
    root = os.path.join(directory, split)
    if not os.path.isdir(root):
        raise SourceError(f"folder {directory!r} has no {split!r} sub-folder (DIR/<split>/[<class>/]...)")
    return FolderSource(root)


def _open(spec: str, split: str | None) -> Source:
    """The source of ``spec``; a ``split`` replaces the spec's own (a folder then reads ``DIR/<split>``)."""
    kind, args = _parse(spec)
    if kind == "folder":
        return _folder(args[0], split)
    if kind == "arrayrecord":
        if split is not None:
            raise SourceError(
                f"{spec!r} has no splits: load one of fashion_mnist, digits, emoji, tfds:NAME or folder:DIR"
            )
        return ArrayRecordSource(args[0])
    if kind == "fashion_mnist":
        directory, own = _fashion_args(spec, args)
        split = split or own
        return _classified(f"fashion_mnist/{split}", *fashion_mnist.arrays(directory, split), FASHION_MNIST_CLASSES)
    if kind == "digits":
        split = split or (_split_arg(spec, args[0]) if args else "train")
        return _classified(f"digits/{split}", *_digits_arrays(split), DIGIT_CLASSES)
    if kind == "emoji":
        from mlcd_jax.data import emoji

        size, own = _emoji_args(spec, args)
        split = split or own
        code_points, images = emoji.load(split, size)
        return ArraySource(f"emoji/{split}", images, None, [emoji.caption(int(c)) for c in code_points],
                           [emoji.key(int(c)) for c in code_points])
    if kind == "wds":
        return open_wds_split(args[0], split)
    if kind == "tfds":
        if not args or not args[0]:
            raise SourceError(f"source {spec!r} needs a dataset name: tfds:NAME[:SPLIT]")
        return TfdsSource(args[0], split or (args[1] if len(args) > 1 else "train"))
    raise _unknown(spec)


def open_source(spec: str) -> Source:
    """The source named by ``spec`` (see the module docstring for the forms)."""
    return _open(spec, None)


def class_names(spec: str, split: str | None = None) -> list[str] | None:
    """The class names of ``spec``'s labels in label order, as zero-shot prompts name them, or None when
    its items have no class labels (emoji, ArrayRecord) or the names are unknown.

    Fashion-MNIST's and digits' fixed names; a folder's sorted class-folder names with underscores as
    spaces (those of ``DIR/<split>`` when ``split`` is given, as :func:`load_arrays` labels them); a
    tfds dataset's ``ClassLabel`` names where its builder is available offline.
    """
    kind, args = _parse(spec)
    if kind == "fashion_mnist":
        return list(FASHION_MNIST_CLASSES)
    if kind == "digits":
        return list(DIGIT_CLASSES)
    if kind == "folder":
        return [name.replace("_", " ") for name in _folder(args[0], split).classes] or None
    if kind == "tfds":
        import tensorflow_datasets as tfds

        try:
            feature = tfds.builder(args[0]).info.features["label"]
            return [name.replace("_", " ") for name in feature.names]
        except Exception:  # unknown or unprepared dataset, no "label" feature or not a ClassLabel
            return None
    if kind in ("emoji", "arrayrecord", "wds"):
        return None
    raise _unknown(spec)


def _loaded(source: Source, limit: int | None, field: str, missing: str) -> tuple[np.ndarray, Sequence[Any]]:
    """The first ``limit`` (or all) images uint8 [N, H, W, C] of ``source`` and the items' ``field``
    (``label`` or ``caption``); an item without one is a SourceError "<key> <missing>"."""
    n = len(source) if limit is None else min(limit, len(source))
    if isinstance(source, ArraySource):  # no PNG round trip
        values = source.labels if field == "label" else source.captions
        if values is None:
            raise SourceError(f"{source.name} {missing}")
        return np.ascontiguousarray(source.images[:n]), values[:n]
    images, values = [], []
    for i in range(n):
        item = source[i]
        try:
            image = augment.decode_image(item["image"])
        except ValueError as e:
            raise SourceError(f"{item['key']}: {e}") from e
        if images and image.shape != images[0].shape:
            raise SourceError(
                f"{item['key']} is {image.shape}, other images are {images[0].shape}: "
                "loading needs one image size (resize the folder first)"
            )
        if item[field] is None:
            raise SourceError(f"{item['key']} {missing}")
        images.append(image)
        values.append(item[field])
    if not images:
        raise SourceError("no images to load")
    return np.stack(images), values


def open_split(spec: str, split: str) -> Source:
    """One split of ``spec``: ``split`` replaces a split in the spec (``fashion_mnist:train`` with
    ``split='test'`` reads the test set); folders read ``DIR/<split>``."""
    return _open(spec, _split_arg(spec, split))


def load_arrays(spec: str, split: str = "train", limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """All (or the first ``limit``) images uint8 [N, H, W, C] and class labels [N] of one split
    (:func:`open_split`), all of one size, in host memory: for tests and tools on small sets (the
    evaluators stream their splits instead, :mod:`mlcd_jax.evaluate.stream`).
    """
    source = open_split(spec, split)
    images, labels = _loaded(source, limit, "label", "has no class label (folders: DIR/<split>/<class>/...)")
    return images, np.asarray(labels, np.int64)


def load_captioned(spec: str, split: str = "train", limit: int | None = None) -> tuple[np.ndarray, list[str]]:
    """All (or the first ``limit``) images uint8 [N, H, W, 3] (grayscale repeated) and captions of one split.

    For image–text retrieval: emoji, Fashion-MNIST and digits (templated captions), folders whose images
    have ``<stem>.txt`` captions (``DIR/<split>/...``). ``split`` replaces a split in ``spec``.
    """
    source = open_split(spec, split)
    images, captions = _loaded(source, limit, "caption", "has no caption (a sibling <stem>.txt)")
    return (images if images.shape[-1] == 3 else np.repeat(images, 3, axis=-1)), list(captions)
