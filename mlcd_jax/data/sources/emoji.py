"""Emoji rendered from Debian's fonts-noto-color-emoji: a small offline image–text dataset, the
``emoji[:SIZE][:SPLIT]`` spec (SIZE px, default 32; no labels, keys ``U+1F304``).

One RGB image per single-code-point emoji that the font really draws (its cmap maps the code point to
a glyph other than ``.notdef`` and the drawing is not empty: no space, tags, joiners or variation
selectors; the keycap bases 0-9 # * and the regional indicator letters are drawn, so they count), the
font's 109 px colour bitmap drawn centred on a white square and resized (LANCZOS) to ``size`` px. The
caption is the code point's Unicode name, lower-cased ("sunrise over mountains"); code points that
Python's ``unicodedata`` cannot name (newer than its Unicode version) are left out.

Split: a CRC-32 of the key (``U+1F304``) puts a fixed fifth of the emoji in ``test``, the rest in
``train``, the same on every machine. Rendering takes 2-4 s on one core; the arrays are cached in
``$MLCD_JAX_CACHE/emoji`` (see :func:`mlcd_jax.data.source_base.cache_root`), keyed by the font's
SHA-256, the Unicode version of ``unicodedata``, ``RENDERING`` and ``size``.
"""

from __future__ import annotations

import hashlib
import os
import unicodedata
import zlib

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from mlcd_jax import fileio
from mlcd_jax.data.source_base import SPLITS, SourceError, cache_root
from mlcd_jax.data.sources.base import ArraySource, Kind

FONT_PATH = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
FONT_PACKAGE = "fonts-noto-color-emoji"
STRIKE_PX = 109  # the font's only (CBDT) bitmap size; FreeType refuses other sizes
DEFAULT_SIZE = 32
TEST_MODULUS = 5  # CRC-32(key) % 5 == 0: test (20 %)
RENDERING = 1  # part of the cache key: bump it when the drawing changes


def key(code_point: int) -> str:
    """An emoji's item key, e.g. ``U+1F304``."""
    return f"U+{code_point:04X}"


def caption(code_point: int) -> str:
    """An emoji's caption: its Unicode name, lower-cased."""
    return unicodedata.name(chr(code_point)).lower()


def split_of(code_point: int) -> str:
    """``test`` or ``train``, from a CRC-32 of the emoji's key (deterministic, ~20 % test)."""
    return "test" if zlib.crc32(key(code_point).encode()) % TEST_MODULUS == 0 else "train"


def _font_digest(font_path: str) -> str:
    with open(font_path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def _candidates(font_path: str) -> list[int]:
    """The nameable code points that the font's cmap maps to a real glyph, ascending."""
    from fontTools.ttLib import TTFont  # comes with matplotlib

    with TTFont(font_path, lazy=True) as font:
        cmap = font.getBestCmap()
    return sorted(cp for cp, glyph in cmap.items() if glyph != ".notdef" and unicodedata.name(chr(cp), None))


def _render(font: ImageFont.FreeTypeFont, code_point: int, side: int, size: int) -> np.ndarray | None:
    """uint8 [size, size, 3]: one emoji drawn centred on a white ``side`` px square, then resized; None
    when the font draws nothing for it."""
    canvas = Image.new("RGB", (side, side), "white")
    ImageDraw.Draw(canvas).text((side / 2, side / 2), chr(code_point), font=font, embedded_color=True, anchor="mm")
    if canvas.getextrema() == ((255, 255),) * 3:  # an empty glyph: space, joiner, tag, variation selector
        return None
    return np.asarray(canvas.resize((size, size), Image.Resampling.LANCZOS))


def render_all(size: int, font_path: str) -> tuple[np.ndarray, np.ndarray]:
    """Every emoji the font draws: code points int64 [N] ascending and images uint8 [N, size, size, 3].

    The square is the longer side of the first glyph's bitmap: a CBDT strike's bitmaps all have one
    size (136 x 128 px in Noto), so each emoji keeps its designed margins.
    """
    font = ImageFont.truetype(font_path, STRIKE_PX)
    candidates = _candidates(font_path)
    left, top, right, bottom = font.getbbox(chr(candidates[0]))
    side = max(right - left, bottom - top)
    code_points, images = [], []
    for cp in candidates:
        image = _render(font, cp, side, size)
        if image is not None:
            code_points.append(cp)
            images.append(image)
    return np.asarray(code_points, np.int64), np.stack(images)


def _cache_path(font_path: str, size: int) -> str:
    """The cache file of the font's emoji at ``size`` px, keyed by all that changes the arrays or captions."""
    name = f"noto-{_font_digest(font_path)}-unicode{unicodedata.unidata_version}-r{RENDERING}-{size}px.npz"
    return os.path.join(cache_root(), "emoji", name)


def load(
    split: str = "train", size: int = DEFAULT_SIZE, font_path: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """One split's code points int64 [N] (ascending) and images uint8 [N, size, size, 3] of the font at
    ``font_path`` (default ``FONT_PATH``), rendered on first use and then read from the cache (written
    atomically, so concurrent first uses are safe)."""
    font_path = font_path or FONT_PATH
    if split not in SPLITS:
        raise SourceError(f"emoji split {split!r} is not one of {', '.join(SPLITS)}")
    if not os.path.isfile(font_path):
        raise SourceError(f"{font_path} not found: install Debian's {FONT_PACKAGE} (apt-get install {FONT_PACKAGE})")
    path = _cache_path(font_path, size)
    if os.path.isfile(path):
        with np.load(path) as z:
            code_points, images = z["code_points"], z["images"]
    else:
        code_points, images = render_all(size, font_path)
        with fileio.atomic_file(path) as f:
            np.savez(f, code_points=code_points, images=images)
    if split == "all":
        return code_points, images
    keep = np.array([split_of(int(cp)) == split for cp in code_points], bool)
    return code_points[keep], images[keep]


def _open(spec: str, args: list[str], split: str | None) -> ArraySource:
    size, own = DEFAULT_SIZE, "train"
    for arg in args:
        if arg in SPLITS:
            own = arg
        elif arg.isdigit() and int(arg) > 0:
            size = int(arg)
        else:
            raise SourceError(f"{spec!r}: {arg!r} is neither a split ({', '.join(SPLITS)}) nor an image size in px")
    split = split or own
    code_points, images = load(split, size)
    return ArraySource(f"emoji/{split}", images, None, [caption(int(c)) for c in code_points],
                       [key(int(c)) for c in code_points])


KIND = Kind("emoji", "emoji[:SIZE][:SPLIT]", _open)
