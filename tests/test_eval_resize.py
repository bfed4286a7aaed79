"""The eval transform on the device (mlcd_jax/data/eval_resize.py, issue 30): PIL's bicubic resize of the
shorter side and centre crop, bit for bit, for images of any size, and a ViT's features of mixed-size
images equal to those of the same images resized on the host."""

import jax
import numpy as np
import pytest

from mlcd_jax import runs
from mlcd_jax.configs import demo
from mlcd_jax.data import augment, eval_resize
from mlcd_jax.data.pipeline import eval_pixels
from mlcd_jax.models.features import FeatureExtractor


def _images(rng: np.random.Generator, shapes: list[tuple[int, int, int]]) -> list[np.ndarray]:
    """Noise (overshoots that the 8-bit clipping between the passes must catch) and smooth images."""
    out = []
    for i, shape in enumerate(shapes):
        noise = rng.integers(0, 256, shape, dtype=np.uint8)
        smooth = np.clip(np.cumsum(rng.normal(0, 6, shape), axis=1) + 128, 0, 255).astype(np.uint8)
        out.append(noise if i % 2 else smooth)
    return out


SHAPES = [(28, 28, 1), (8, 8, 3), (375, 500, 3), (500, 333, 3), (224, 224, 3), (225, 224, 1), (300, 1000, 3),
          (17, 45, 3), (1000, 1000, 3), (1500, 600, 3), (99, 100, 3), (1, 5, 3), (3, 400, 1), (469, 2, 3),
          (53, 12, 3), (216, 29, 3)]


@pytest.mark.parametrize("size", [16, 28, 224])
def test_the_device_resize_is_the_host_transform_bit_for_bit(size):
    """Up- and downsampling, tall and wide, grey and RGB, images already at the size, and images whose
    window is past the limit (resized on the host): every pixel equals resize_center_crop's."""
    rng = np.random.default_rng(size)
    shapes = SHAPES + [(int(h), int(w), 3) for h, w in rng.integers(1, 700, (30, 2))]
    images = _images(rng, shapes)
    plans = [eval_resize.plan(image, size) for image in images]
    assert any(p.window.shape[:2] != (size, size) for p in plans)  # most are resized on the device
    side, taps = eval_resize.canvas_side(plans, size)
    got = np.asarray(jax.jit(eval_resize.resize)(*eval_resize.pack(plans, len(plans) + 2, size, side, taps)))
    want = np.stack([augment.resize_center_crop(augment.to_channels(image, 3), size) for image in images])
    np.testing.assert_array_equal(got[: len(images)], want)
    assert not got[len(images):].any()  # padding rows stay black
    fixed_side, fixed_taps = eval_resize.fixed_canvas(size)
    dirty = np.full((len(plans), fixed_side, fixed_side, 3), 255, np.uint8)  # a reused canvas: only zero taps
    again = jax.jit(eval_resize.resize)(*eval_resize.pack(plans, len(plans), size, fixed_side, fixed_taps, out=dirty))
    np.testing.assert_array_equal(np.asarray(again), want)  # the multi-process canvas gives the same bits


def test_a_window_is_only_the_pixels_the_resize_reads_and_a_wide_one_is_resized_on_the_host():
    image = np.random.default_rng(0).integers(0, 256, (500, 333, 3), dtype=np.uint8)
    plan = eval_resize.plan(image, 224)
    assert plan.window.shape[1] == 333 and 333 < plan.window.shape[0] < 345  # the crop's rows plus the taps' reach
    big = eval_resize.plan(np.zeros((2000, 3000, 3), np.uint8), 224)
    assert big.window.shape == (224, 224, 3)  # past default_limit: PIL on the host, identity taps on the device


def test_the_crop_box_of_a_thin_image_is_exact():
    """size / (size / min(h, w)) is not min(h, w) for every h: the old box could start at -2e-16, which
    PIL refuses ("box offset can't be negative")."""
    assert augment.eval_box(3, 400) == (198.5, 0.0, 201.5, 3.0)
    assert augment.resize_center_crop(np.zeros((3, 400, 3), np.uint8), 16).shape == (16, 16, 3)


def test_a_vits_features_of_mixed_sizes_match_the_host_resized_images():
    """The extractor (8 devices, batches of 8 with a partial last one) on a list of images of any sizes
    gives the features of the same images resized on the host, to the bit."""
    config = demo.get_config("digits")
    model = runs.build_model(config, 0)
    size = config.data.image_size
    rng = np.random.default_rng(1)
    images = _images(rng, [(int(h), int(w), 3) for h, w in rng.integers(4, 90, (19, 2))] + [(size, size, 3)])
    extract = FeatureExtractor(model, size, batch_size=8)
    got = extract(images)
    want = extract(eval_pixels(np.stack([augment.resize_center_crop(im, size) for im in images]), size))
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(extract(images[::-1]), got[::-1])  # reused canvases: nothing left over
    assert got.shape[0] == 20 and np.isfinite(got).all()
