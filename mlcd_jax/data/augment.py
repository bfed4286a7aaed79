"""Image decoding and the per-image transforms shared by the clustering job and the training pipeline.

Host side: functions on one image as uint8 ``[H, W, C]`` (C = 1 for grayscale, 3 for RGB) so that
the offline job, the grain pipeline and the evaluation decode and preprocess images identically.
Device side (:func:`augment_batch`): the training augmentation, batched under ``jax.jit``.
"""

from __future__ import annotations

import io
import math

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

# CLIP's normalisation (OpenAI CLIP / MLCD releases), RGB order.
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


def decode_image(data: bytes, min_side: int = 0) -> np.ndarray:
    """Encoded bytes -> uint8 [H, W, C]; grayscale stays 1 channel, everything else becomes RGB. 16-bit
    grayscale is scaled to 8 bits (x * 255 / 65535), as PIL already does for 16-bit RGB.

    ``min_side`` > 0 lets a JPEG decode at the smallest DCT scale (1/2, 1/4, 1/8) whose shorter side
    is still at least ``min_side`` pixels (PIL's draft mode: several times faster for large JPEGs).
    Raises ``ValueError`` for bytes PIL cannot fully decode (truncated or corrupt files).
    """
    buffer = io.BytesIO(data)
    try:
        with Image.open(buffer) as img:
            if min_side and img.format == "JPEG":
                w, h = img.size
                shorter = min(w, h)
                img.draft(img.mode, (max(1, min_side * w // shorter), max(1, min_side * h // shorter)))
            img.load()
            if img.mode.startswith("I"):  # 16-bit (I;16*, or I from a 16-bit PNG): scaled, not clipped
                wide = np.asarray(img, np.float64)
                return np.clip(np.rint(wide * (255 / 65535)), 0, 255).astype(np.uint8)[:, :, None]
            if img.mode in ("L", "F", "1"):
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


def eval_box(h: int, w: int) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) of the eval transform's crop in an h x w image: the centred square of
    side min(h, w), which resized to the model's size is "shorter side resized, then centre crop"."""
    side = min(h, w)
    top, left = (h - side) / 2, (w - side) / 2
    return left, top, left + side, top + side


def resize_center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """Eval transform: resize the shorter side to ``size`` (bicubic), then centre-crop ``size``x``size``.

    PIL's bicubic resampling of the :func:`eval_box`, along the width first, then the height: one
    ``resize`` call per axis, so that the order does not depend on the Pillow version (Pillow 13 resizes
    some tall images along the height first, which rounds the intermediate differently) and
    :mod:`mlcd_jax.data.eval_resize` can reproduce it exactly on the device."""
    h, w, c = image.shape
    if h == w == size:
        return image
    left, top, right, bottom = eval_box(h, w)
    wide = _pil(image).resize((size, h), Image.Resampling.BICUBIC, box=(left, 0, right, h))
    return _array(wide.resize((size, size), Image.Resampling.BICUBIC, box=(0, top, size, bottom)), c)


def shrink_to_fit(image: np.ndarray, size: int) -> np.ndarray:
    """``image`` unchanged if both sides are at most ``size``, else shrunk (bilinear, aspect kept) to fit."""
    h, w, c = image.shape
    if max(h, w) <= size:
        return image
    shrink = size / max(h, w)
    img = _pil(image).resize((max(1, round(w * shrink)), max(1, round(h * shrink))), Image.Resampling.BILINEAR)
    return _array(img, c)


def normalize(image: np.ndarray | jax.Array) -> np.ndarray | jax.Array:
    """0..255 pixels [..., C] (numpy or jax; C = 3 or 1) -> float32 CLIP-normalised (grey: the mean of
    CLIP's channel statistics)."""
    if image.shape[-1] == 3:
        return (image.astype(np.float32) / 255.0 - CLIP_MEAN) / CLIP_STD
    return (image.astype(np.float32) / 255.0 - CLIP_MEAN.mean()) / CLIP_STD.mean()


# ---------------------------------------------------------------------------------------------------
# Batched, on-device augmentation. The host only decodes: each example arrives as a uint8 canvas
# [M, M, C] holding the image in its top-left ``size`` = (h, w) pixels, plus a per-example seed drawn
# from the example's (seed, epoch, global position) RNG. Crop boxes, flips, resampling and
# normalisation run here, vectorised over the batch inside ``jax.jit``.


def crop_box(
    key: jax.Array, size: jax.Array, scale: tuple[float, float], ratio: tuple[float, float] = (3 / 4, 4 / 3),
    tries: int = 10,
) -> jax.Array:
    """(top, left, height, width) of an Inception-style random crop of an image of ``size`` = (h, w).

    torchvision's RandomResizedCrop, vectorised: ``tries`` (area fraction in ``scale``, log-uniform
    aspect in ``ratio``) candidates, the first that fits wins; if none does, the largest centre crop
    within ``ratio``.
    """
    h, w = size[0].astype(jnp.float32), size[1].astype(jnp.float32)
    k_area, k_aspect, k_top, k_left = jax.random.split(key, 4)
    target = h * w * jax.random.uniform(k_area, (tries,), minval=scale[0], maxval=scale[1])
    aspect = jnp.exp(jax.random.uniform(k_aspect, (tries,), minval=math.log(ratio[0]), maxval=math.log(ratio[1])))
    cw, ch = jnp.sqrt(target * aspect), jnp.sqrt(target / aspect)
    fits = (cw <= w) & (ch <= h)
    first = jnp.argmax(fits)
    image_aspect = w / h
    fallback_w = jnp.where(image_aspect > ratio[1], h * ratio[1], w)
    fallback_h = jnp.where(image_aspect < ratio[0], w / ratio[0], h)
    found = fits[first]
    cw = jnp.where(found, cw[first], fallback_w)
    ch = jnp.where(found, ch[first], fallback_h)
    top = jnp.where(found, jax.random.uniform(k_top) * (h - ch), (h - ch) / 2)
    left = jnp.where(found, jax.random.uniform(k_left) * (w - cw), (w - cw) / 2)
    return jnp.stack([top, left, ch, cw])


def center_box(size: jax.Array) -> jax.Array:
    """(top, left, height, width) of the centred square of side min(h, w): the eval transform's crop."""
    h, w = size[0].astype(jnp.float32), size[1].astype(jnp.float32)
    side = jnp.minimum(h, w)
    return jnp.stack([(h - side) / 2, (w - side) / 2, side, side])


def crop_resize(canvas: jax.Array, box: jax.Array, out: int) -> jax.Array:
    """float32 [out, out, C]: the ``box`` of ``canvas`` [M, M, C] resampled (bilinear, antialiased)."""
    top, left, ch, cw = box[0], box[1], box[2], box[3]
    scale = jnp.stack([out / ch, out / cw])
    return jax.image.scale_and_translate(
        canvas.astype(jnp.float32), (out, out, canvas.shape[-1]), (0, 1), scale,
        -jnp.stack([top, left]) * scale, method="linear", antialias=True,
    )


def _convert_channels(image: jax.Array, num_channels: int) -> jax.Array:
    """[..., C] -> [..., num_channels]: grey -> RGB by repetition, RGB -> grey by luma (as PIL's "L")."""
    have = image.shape[-1]
    if have == 1 and num_channels == 3:
        return jnp.repeat(image, 3, axis=-1)
    if have == 3 and num_channels == 1:
        return image @ jnp.asarray([[0.299], [0.587], [0.114]], jnp.float32)
    if have != num_channels:
        raise ValueError(f"cannot convert a {have}-channel image to {num_channels} channels")
    return image


# ProtoCLIP's "light augmentation" (the released ``protoclip-light-augmentation`` transform), after the crop
# and flip: colour jitter (brightness, contrast and saturation factors in [0.2, 1.8], a hue shift in
# [-0.2, 0.2], in a random order), grey and a Gaussian blur (21 taps, sigma in [0.1, 2]), each with p 0.2.
LIGHT_P = 0.2
AUGMENTS = (False, True, "light")  # augment_batch's modes (config_lib.train_augment picks one)
JITTER = (0.8, 0.8, 0.8, 0.2)
BLUR_TAPS, BLUR_SIGMA = 21, (0.1, 2.0)
_LUMA = np.asarray([0.299, 0.587, 0.114], np.float32)  # numpy: importing must not start a JAX backend


def _grey(image: jax.Array) -> jax.Array:
    """[..., C] in [0, 1] -> its luma [..., 1] (C = 1: itself)."""
    return image if image.shape[-1] == 1 else image @ _LUMA[:, None]


def _hsv(image: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """RGB [..., 3] in [0, 1] -> hue (in turns, [0, 1)), saturation and value [...]."""
    r, g, b = image[..., 0], image[..., 1], image[..., 2]
    value, low = image.max(-1), image.min(-1)
    chroma = value - low
    saturation = chroma / jnp.where(value == 0, 1.0, value)
    c = jnp.where(chroma == 0, 1.0, chroma)
    hue = jnp.where(value == r, (g - b) / c, jnp.where(value == g, 2.0 + (b - r) / c, 4.0 + (r - g) / c))
    return jnp.where(chroma == 0, 0.0, hue / 6.0) % 1.0, saturation, value


def _rgb(hue: jax.Array, saturation: jax.Array, value: jax.Array) -> jax.Array:
    """The inverse of :func:`_hsv`: [...] each -> RGB [..., 3]."""
    k = (jnp.asarray([5.0, 3.0, 1.0]) + hue[..., None] * 6.0) % 6.0
    return value[..., None] - value[..., None] * saturation[..., None] * jnp.clip(jnp.minimum(k, 4.0 - k), 0.0, 1.0)


def shift_hue(image: jax.Array, shift: jax.Array) -> jax.Array:
    """RGB [..., 3] in [0, 1] with its hue rotated by ``shift`` turns (grey images: unchanged)."""
    if image.shape[-1] == 1:
        return image
    hue, saturation, value = _hsv(image)
    return _rgb((hue + shift) % 1.0, saturation, value)


def colour_jitter(image: jax.Array, key: jax.Array) -> jax.Array:
    """torchvision's ``ColorJitter(*JITTER)`` of one image [S, S, C] in [0, 1]: brightness, contrast
    (against the mean grey), saturation (against the pixel's grey) and hue, in a random order."""
    k_order, k_factors, k_hue = jax.random.split(key, 3)
    factors = jax.random.uniform(k_factors, (3,), minval=1.0 - jnp.asarray(JITTER[:3]), maxval=1.0 + jnp.asarray(JITTER[:3]))
    hue = jax.random.uniform(k_hue, (), minval=-JITTER[3], maxval=JITTER[3])

    def blend(x: jax.Array, other: jax.Array, f: jax.Array) -> jax.Array:
        return jnp.clip(f * x + (1.0 - f) * other, 0.0, 1.0)

    ops = (lambda x: blend(x, 0.0, factors[0]), lambda x: blend(x, _grey(x).mean(), factors[1]),
           lambda x: blend(x, _grey(x), factors[2]), lambda x: shift_hue(x, hue))
    for op in jax.random.permutation(k_order, 4):
        image = jax.lax.switch(op, ops, image)
    return image


def gaussian_blur(image: jax.Array, sigma: jax.Array) -> jax.Array:
    """One image [S, S, C] blurred by a :data:`BLUR_TAPS`-tap Gaussian of ``sigma`` pixels, separably,
    the border reflected (torchvision's ``GaussianBlur``); S must exceed ``BLUR_TAPS // 2``."""
    half = BLUR_TAPS // 2
    weights = jnp.exp(-0.5 * (jnp.arange(-half, half + 1, dtype=jnp.float32) / sigma) ** 2)
    weights = weights / weights.sum()
    for axis in (0, 1):
        padded = jnp.pad(image, [(half, half) if a == axis else (0, 0) for a in range(3)], mode="reflect")
        size = image.shape[axis]
        image = sum(w * jax.lax.slice_in_dim(padded, i, i + size, axis=axis) for i, w in enumerate(weights))
    return image


def light_augment(image: jax.Array, key: jax.Array) -> jax.Array:
    """ProtoCLIP's light augmentation after the crop and flip, of one image [S, S, C] of 0..255 pixels:
    colour jitter, grey (kept in C channels) and blur, each with probability :data:`LIGHT_P`."""
    k_jitter, k_sigma, k_apply = jax.random.split(key, 3)
    apply = jax.random.bernoulli(k_apply, LIGHT_P, (3,))
    x = image / 255.0
    x = jnp.where(apply[0], colour_jitter(x, k_jitter), x)
    x = jnp.where(apply[1], jnp.broadcast_to(_grey(x), x.shape), x)
    sigma = jax.random.uniform(k_sigma, (), minval=BLUR_SIGMA[0], maxval=BLUR_SIGMA[1])
    x = jnp.where(apply[2], gaussian_blur(x, sigma), x)
    return x * 255.0


def augment_batch(
    canvas: jax.Array, size: jax.Array, seed: jax.Array, *, image_size: int, augment: bool | str,
    crop_scale: tuple[float, float] = (0.08, 1.0), num_channels: int = 3,
) -> jax.Array:
    """uint8 canvases [B, M, M, C] -> float32 model inputs [B, S, S, num_channels], jit-able.

    ``size`` int [B, 2] is each image's (h, w) within its canvas; ``seed`` uint32 [B, 2] its own
    random stream (a threefry key), so crops and flips depend on the example alone, never on the
    batch, the device or the process layout. ``augment``: True, a random crop (area in ``crop_scale``)
    and flip; ``"light"``, that and ProtoCLIP's :func:`light_augment`; False, centre crop, no flip (the
    eval transform, bilinear instead of bicubic).
    """
    if augment not in AUGMENTS:
        raise ValueError(f"augment={augment!r}: choose one of {AUGMENTS}")
    seed = seed.astype(jnp.uint32)

    def one(image: jax.Array, hw: jax.Array, key_data: jax.Array) -> jax.Array:
        key_crop, key_flip = jax.random.split(jax.random.wrap_key_data(key_data, impl="threefry2x32"))
        if augment:
            out = crop_resize(image, crop_box(key_crop, hw, crop_scale), image_size)
            return jnp.where(jax.random.bernoulli(key_flip), out[:, ::-1], out)
        return crop_resize(image, center_box(hw), image_size)

    images = _convert_channels(jax.vmap(one)(canvas, size, seed), num_channels)
    if augment == "light":  # its own stream of each example's key (the crop and flip keep theirs)
        light_keys = jax.vmap(lambda k: jax.random.fold_in(jax.random.wrap_key_data(k, impl="threefry2x32"), 1))(seed)
        images = jax.vmap(light_augment)(images, light_keys)
    return normalize(images)
