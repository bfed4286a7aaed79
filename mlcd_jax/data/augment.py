"""Image decoding and the per-image transforms shared by the clustering job and the training pipeline.

All functions work on one image as uint8 ``[H, W, C]`` (C = 1 for grayscale, 3 for RGB) so that
the offline job, the grain pipeline and the evaluation preprocess images identically.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image

# CLIP's normalisation (OpenAI CLIP / MLCD releases), RGB order.
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


def decode_image(data: bytes) -> np.ndarray:
    """Encoded bytes -> uint8 [H, W, C]; grayscale stays 1 channel, everything else becomes RGB.

    Raises ``ValueError`` for bytes PIL cannot fully decode (truncated or corrupt files).
    """
    buffer = io.BytesIO(data)
    try:
        with Image.open(buffer) as img:
            img.load()
            if img.mode in ("L", "I;16", "I", "F", "1"):
                return np.asarray(img.convert("L"))[:, :, None]
            return np.asarray(img.convert("RGB"))
    except Exception as e:  # PIL raises OSError, SyntaxError, DecompressionBombError, ... for bad input
        # Some messages name the buffer by its address; drop it so that the job's manifest is reproducible.
        raise ValueError(f"undecodable image ({type(e).__name__}: {str(e).replace(' ' + repr(buffer), '')})") from e


def encode_png(pixels: np.ndarray) -> bytes:
    """Lossless PNG of exactly these uint8 pixels ([H, W] or [H, W, 1|3])."""
    pixels = np.asarray(pixels, np.uint8)
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def to_channels(image: np.ndarray, channels: int) -> np.ndarray:
    """Grayscale -> RGB by repetition (or RGB -> grayscale by luma) so the image has ``channels``."""
    have = image.shape[2]
    if have == channels:
        return image
    if have == 1 and channels == 3:
        return np.repeat(image, 3, axis=2)
    if have == 3 and channels == 1:
        return np.asarray(Image.fromarray(image).convert("L"))[:, :, None]
    raise ValueError(f"cannot convert a {have}-channel image to {channels} channels")


def _pil(image: np.ndarray) -> Image.Image:
    return Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image)


def _array(img: Image.Image, channels: int) -> np.ndarray:
    out = np.asarray(img)
    return out[:, :, None] if channels == 1 else out


def resize_center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """Eval transform: resize the shorter side to ``size`` (bicubic), then centre-crop ``size``x``size``."""
    h, w, c = image.shape
    if h == w == size:
        return image
    scale = size / min(h, w)
    ch, cw = size / scale, size / scale  # crop box in source pixels
    top, left = (h - ch) / 2, (w - cw) / 2
    img = _pil(image).resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + cw, top + ch))
    return _array(img, c)


def random_resized_crop(
    image: np.ndarray,
    size: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> np.ndarray:
    """Inception-style crop: area fraction in ``scale``, aspect in ``ratio`` (log-uniform), resized to ``size``.

    Follows torchvision's RandomResizedCrop: 10 tries, then the largest centre crop within ``ratio``.
    """
    h, w, c = image.shape
    area = h * w
    box = None
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw, ch = math.sqrt(target * aspect), math.sqrt(target / aspect)
        if 0 < cw <= w and 0 < ch <= h:
            left, top = rng.uniform(0, w - cw), rng.uniform(0, h - ch)
            box = (left, top, left + cw, top + ch)
            break
    if box is None:
        aspect = w / h
        cw, ch = (h * ratio[1], h) if aspect > ratio[1] else (w, w / ratio[0]) if aspect < ratio[0] else (w, h)
        box = ((w - cw) / 2, (h - ch) / 2, (w + cw) / 2, (h + ch) / 2)
    img = _pil(image).resize((size, size), Image.Resampling.BILINEAR, box=box)
    return _array(img, c)


def normalize(image: np.ndarray) -> np.ndarray:
    """uint8 RGB [..., 3] -> float32 normalised with CLIP mean/std."""
    return (image.astype(np.float32) / 255.0 - CLIP_MEAN) / CLIP_STD
