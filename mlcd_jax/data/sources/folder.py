"""``folder:DIR``: every image file under DIR (recursive; .jpg .jpeg .png .bmp .gif .webp .tif .tiff), in
sorted relative-path order; the key is the relative path, the bytes are the file's own bytes. If images
sit in class sub-folders (``DIR/<class>/...``) the label is the index of ``<class>`` among the sorted
class folders, else None. A sibling ``<stem>.txt`` is the caption (UTF-8, else read as Latin-1). A split
reads ``DIR/<split>``; class names are the class folders' names, underscores as spaces."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import Any

from mlcd_jax.data.source_base import IMAGE_EXTENSIONS, SourceError, decode_caption, item
from mlcd_jax.data.sources.base import Kind


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


def _open(directory: str, split: str | None) -> FolderSource:
    """``DIR``, or ``DIR/<split>`` when a split is given."""
    if split is None:
        return FolderSource(directory)
    root = os.path.join(directory, split)
    if not os.path.isdir(root):
        raise SourceError(f"folder {directory!r} has no {split!r} sub-folder (DIR/<split>/[<class>/]...)")
    return FolderSource(root)


def _class_names(args: list[str], split: str | None) -> list[str] | None:
    return [name.replace("_", " ") for name in _open(args[0], split).classes] or None


KIND = Kind("folder", "folder:DIR", lambda spec, args, split: _open(args[0], split), _class_names, path=True)
