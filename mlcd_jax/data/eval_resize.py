"""The eval transform on the device: shorter side resized (bicubic), centre crop, bit for bit as PIL does it.

The host only decodes and cuts out the window of each image that the resize reads; the resampling runs
on the accelerators, batched under ``jax.jit``, so images of any size are evaluated at the model's size
without a resize per image on the host (issue 30). The result equals
:func:`mlcd_jax.data.augment.resize_center_crop` (PIL's ``BICUBIC`` with a crop box, the transform of
HF's CLIP image processor) exactly: the host computes PIL's filter taps for each image in float64 and
rounds them to PIL's 22-bit fixed point (:func:`_taps`), and the device applies them with PIL's integer
arithmetic, two passes (along the width, then the height) each rounded and clipped to 8 bits.

One image's part is a :class:`Plan` (its window and taps); :func:`pack` lays a batch of plans on one
canvas ``[n, M, M, C]`` (the window in each canvas' top-left corner) plus the taps, and :func:`resize`
turns that into uint8 ``[n, S, S, C]`` on the device. Images whose window is wider than ``limit``
pixels (many times the model's size) are resized on the host by PIL itself, with the same result, so
that one large image does not widen every canvas of its batch.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mlcd_jax.data import augment

PRECISION_BITS = 22  # PIL's fixed point for 8-bit images: 32 - 8 - 2
ALIGN = 32  # canvas sides are rounded up to this, so that few canvas shapes are compiled


def default_limit(size: int) -> int:
    """The widest window resized on the device for a model of ``size`` pixels (2S + 64: an image whose
    shorter side is up to about twice the model's); wider ones are resized on the host."""
    return 2 * size + 64


def _bicubic(x: np.ndarray) -> np.ndarray:
    """PIL's bicubic kernel (a = -0.5), in its own order of operations."""
    x = np.abs(x)
    near = ((-0.5 + 2.0) * x - (-0.5 + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * -0.5
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def _tap_count(scale: float) -> int:
    """PIL's taps per output pixel (``ksize``) for ``scale`` input pixels per output pixel: bicubic's
    support of 2, widened by the scale when downsampling, on both sides, plus one."""
    return int(math.ceil(2.0 * max(scale, 1.0))) * 2 + 1


@functools.lru_cache(maxsize=4096)
def _taps(in_size: int, in0: float, in1: float, out: int) -> tuple[np.ndarray, np.ndarray]:
    """PIL's resampling taps along one axis (``precompute_coeffs`` and ``normalize_coeffs_8bpc``): the
    first input pixel int32 [out] and the 22-bit fixed-point weights int32 [out, taps] of each output
    pixel, for the input span [in0, in1) (float32, as PIL takes the box) of an axis of ``in_size``."""
    scale = float(np.float32(in1) - np.float32(in0)) / out
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale
    taps = _tap_count(scale)
    center = float(np.float32(in0)) + (np.arange(out) + 0.5) * scale
    first = np.maximum((center - support + 0.5).astype(np.int64), 0)  # C's (int): truncation
    count = np.minimum((center + support + 0.5).astype(np.int64), in_size) - first
    t = np.arange(taps)
    weights = _bicubic(((t[None, :] + first[:, None]) - center[:, None] + 0.5) * (1.0 / filterscale))
    weights = np.where(t[None, :] < count[:, None], weights, 0.0)
    total = np.zeros(out)
    for i in range(taps):  # PIL sums the weights in order; so does this, for the same last bit
        total = total + weights[:, i]
    weights = np.where(total[:, None] != 0.0, weights / np.where(total == 0.0, 1.0, total)[:, None], weights)
    scaled = weights * (1 << PRECISION_BITS)
    fixed = np.where(weights < 0, scaled - 0.5, scaled + 0.5).astype(np.int64)  # truncation toward zero
    return first.astype(np.int32), fixed.astype(np.int32)


@dataclasses.dataclass(frozen=True)
class Plan:
    """One image's part of the eval transform: the ``window`` of it that the resize reads (uint8
    [h, w, C]) and, per axis, the first window pixel and fixed-point taps of each output pixel."""

    window: np.ndarray
    rows: tuple[np.ndarray, np.ndarray]
    cols: tuple[np.ndarray, np.ndarray]

    @property
    def taps(self) -> int:
        return max(self.rows[1].shape[1], self.cols[1].shape[1])


def plan(image: np.ndarray, size: int, channels: int = 3, limit: int | None = None) -> Plan:
    """The :class:`Plan` that makes uint8 ``image`` [H, W, C] into its ``size`` x ``size`` eval pixels
    (``channels`` of them) on the device, with the crop box of
    :func:`~mlcd_jax.data.augment.eval_box`; a window wider than ``limit``
    (default :func:`default_limit`) is resized here by PIL instead."""
    image = augment.to_channels(image, channels)
    h, w, _ = image.shape
    limit = default_limit(size) if limit is None else limit
    if not h == w == size:
        left, top, right, bottom = augment.eval_box(h, w)
        rows, cols = _taps(h, top, bottom, size), _taps(w, left, right, size)
        (y0, y1), (x0, x1) = _span(rows), _span(cols)
        if max(y1 - y0, x1 - x0) <= limit:
            return Plan(image[y0:y1, x0:x1], (rows[0] - y0, rows[1]), (cols[0] - x0, cols[1]))
        image = augment.resize_center_crop(image, size)
    same = _taps(size, 0.0, float(size), size)
    return Plan(image, same, same)


def _span(taps: tuple[np.ndarray, np.ndarray]) -> tuple[int, int]:
    """The input pixels [a, b) that an axis' taps read (PIL's ``ybox_first`` / ``ybox_last``)."""
    first, weights = taps
    count = int(np.max(np.nonzero(weights[-1])[0], initial=0)) + 1
    return int(first[0]), int(first[-1]) + count


def canvas_side(plans: Sequence[Plan], size: int) -> tuple[int, int]:
    """(canvas side, taps) that hold every plan of a batch: the model's size when every window fits in
    it, else the widest window rounded up to :data:`ALIGN`."""
    widest = max((max(p.window.shape[:2]) for p in plans), default=size)
    side = size if widest <= size else -(-widest // ALIGN) * ALIGN
    return side, max((p.taps for p in plans), default=5)


def fixed_canvas(size: int, limit: int | None = None) -> tuple[int, int]:
    """(canvas side, taps) that hold any plan made with ``limit``: for processes that must agree on the
    batch's shapes without seeing each other's images."""
    limit = default_limit(size) if limit is None else limit
    return limit, _tap_count(limit / size)


def pack(
    plans: Sequence[Plan], rows: int, size: int, side: int, taps: int, channels: int = 3,
    out: np.ndarray | None = None,
) -> tuple[np.ndarray, ...]:
    """``plans`` (for ``size`` x ``size`` outputs) as the inputs of :func:`resize`, padded to ``rows``
    images (zero taps): canvas uint8 [rows, side, side, channels] (``out`` when given), then first row
    int32 [rows, size], row taps int32 [rows, size, taps], first column and column taps alike. Canvas
    pixels outside the windows are left as they were: only zero taps reach them."""
    canvas = np.empty((rows, side, side, channels), np.uint8) if out is None else out
    firsts = np.zeros((2, rows, size), np.int32)
    weights = np.zeros((2, rows, size, taps), np.int32)
    for i, p in enumerate(plans):
        h, w, _ = p.window.shape
        canvas[i, :h, :w] = p.window
        for axis, (first, k) in enumerate((p.rows, p.cols)):
            firsts[axis, i], weights[axis, i, :, : k.shape[1]] = first, k
    return canvas, firsts[0], weights[0], firsts[1], weights[1]


def _pass(image: jax.Array, first: jax.Array, weights: jax.Array, axis: int) -> jax.Array:
    """One PIL resampling pass along ``axis`` of int32 ``image``: out[j] = clip8(sum_t
    image[first[j] + t] * weights[j, t] + 2^21 >> 22), exact integer arithmetic."""
    acc = jnp.int32(1 << (PRECISION_BITS - 1))
    shape = [1, 1, 1]
    shape[axis] = -1
    for t in range(weights.shape[1]):
        acc = acc + jnp.take(image, first + t, axis=axis, mode="clip") * weights[:, t].reshape(shape)
    return jnp.clip(acc >> PRECISION_BITS, 0, 255)


def resize(canvas: jax.Array, row_first: jax.Array, row_taps: jax.Array, col_first: jax.Array,
           col_taps: jax.Array) -> jax.Array:
    """uint8 [n, S, S, C] eval pixels from :func:`pack`'s arrays, jit-able: along the width first, then
    the height, as PIL does."""

    def one(image: jax.Array, y0: jax.Array, yk: jax.Array, x0: jax.Array, xk: jax.Array) -> jax.Array:
        wide = _pass(image.astype(jnp.int32), x0, xk, axis=1)
        return _pass(wide, y0, yk, axis=0).astype(jnp.uint8)

    return jax.vmap(one)(canvas, row_first, row_taps, col_first, col_taps)
