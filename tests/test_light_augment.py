"""ProtoCLIP's light augmentation (``data.augment="light"``): its colour ops against independent references
(the standard library's ``colorsys``, a NumPy convolution) and its probabilities over many seeds."""

import colorsys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlcd_jax.data import augment


def test_hue_shift_matches_colorsys():
    rng = np.random.default_rng(0)
    pixels = rng.uniform(0, 1, (500, 3)).astype(np.float32)
    pixels[:20] = pixels[:20, :1]  # grey pixels (no hue) among them
    pixels[20:40] = np.round(pixels[20:40])  # ties between channels (primaries, secondaries, black, white)
    for shift in (0.0, 0.13, -0.2, 0.5):
        got = np.asarray(augment.shift_hue(jnp.asarray(pixels), jnp.float32(shift)))
        want = np.array([colorsys.hsv_to_rgb((h + shift) % 1.0, s, v) for h, s, v in
                         (colorsys.rgb_to_hsv(*p) for p in pixels.astype(np.float64))])
        np.testing.assert_allclose(got, want, atol=2e-6)


def _blur_reference(image: np.ndarray, sigma: float) -> np.ndarray:
    half = augment.BLUR_TAPS // 2
    weights = np.exp(-0.5 * (np.arange(-half, half + 1) / sigma) ** 2)
    weights /= weights.sum()
    for axis in (0, 1):
        padded = np.pad(image, [(half, half) if a == axis else (0, 0) for a in range(3)], mode="reflect")
        image = np.apply_along_axis(lambda line: np.convolve(line, weights[::-1], mode="valid"), axis, padded)
    return image


@pytest.mark.parametrize("sigma", [0.1, 0.7, 2.0])
def test_gaussian_blur_matches_a_numpy_convolution_with_reflected_borders(sigma):
    image = np.random.default_rng(1).uniform(0, 1, (24, 17, 3)).astype(np.float32)
    got = np.asarray(augment.gaussian_blur(jnp.asarray(image), jnp.float32(sigma)))
    np.testing.assert_allclose(got, _blur_reference(image.astype(np.float64), sigma), atol=1e-5)
    assert sigma > 0.5 or np.abs(got - image).max() < 1e-3  # a tenth of a pixel leaves the image as it is


def test_colour_jitter_on_grey_is_brightness_and_contrast_only():
    """Saturation and hue leave grey alone: a 1-channel image jitters as its 3-channel grey copy does, and
    what stays (brightness, contrast, clipping) keeps the pixels' order."""
    image = np.random.default_rng(2).uniform(0, 1, (16, 16, 1)).astype(np.float32)
    order = np.argsort(image.ravel(), kind="stable")
    for seed in range(20):
        key = jax.random.key(seed)
        out = np.asarray(augment.colour_jitter(jnp.asarray(image), key))
        rgb = np.asarray(augment.colour_jitter(jnp.asarray(np.repeat(image, 3, -1)), key))
        np.testing.assert_allclose(rgb, np.repeat(out, 3, -1), atol=1e-6)
        assert out.min() >= 0 and out.max() <= 1 and np.all(np.diff(out.ravel()[order]) >= -1e-6)
        assert np.abs(out - image).max() > 1e-3


def test_colour_jitter_keeps_rgb_in_range_and_changes_colour():
    image = jnp.asarray(np.random.default_rng(3).uniform(0, 1, (16, 16, 3)), jnp.float32)
    outs = np.stack([np.asarray(augment.colour_jitter(image, jax.random.key(s))) for s in range(30)])
    assert outs.min() >= 0 and outs.max() <= 1
    assert np.all(np.abs(outs - np.asarray(image)).reshape(30, -1).max(1) > 0.01)  # every draw changes it


def test_light_augment_applies_each_op_with_probability_one_fifth():
    """Over 2,000 seeds: about 1 - 0.8^3 of the images change, about a fifth come out grey."""
    rng = np.random.default_rng(4)
    image = jnp.asarray(rng.uniform(0, 255, (12, 12, 3)), jnp.float32)
    outs = np.asarray(jax.vmap(lambda k: augment.light_augment(image, k))(jax.random.split(jax.random.key(0), 2000)))
    changed = np.abs(outs - np.asarray(image)).reshape(2000, -1).max(1) > 1e-3
    grey = np.abs(outs - outs[..., :1]).reshape(2000, -1).max(1) < 1e-3
    assert abs(changed.mean() - (1 - 0.8**3)) < 0.04, changed.mean()
    assert abs(grey.mean() - 0.2) < 0.03, grey.mean()
    assert outs.min() >= 0 and outs.max() <= 255 + 1e-3


def test_light_batches_depend_on_each_seed_only_and_keep_the_crop_and_flip():
    rng = np.random.default_rng(5)
    canvas = jnp.asarray(rng.integers(0, 256, (6, 20, 20, 3)), jnp.uint8)
    size, seeds = jnp.full((6, 2), 20, jnp.int32), jnp.asarray(rng.integers(0, 2**32, (6, 2)), jnp.uint32)
    kwargs = dict(image_size=16, crop_scale=(0.5, 1.0))
    light = np.asarray(augment.augment_batch(canvas, size, seeds, augment="light", **kwargs))
    again = np.asarray(augment.augment_batch(canvas[::-1], size, seeds[::-1], augment="light", **kwargs))
    np.testing.assert_array_equal(light, again[::-1])
    plain = np.asarray(augment.augment_batch(canvas, size, seeds, augment=True, **kwargs))
    # the same crop and flip underneath: an unchanged image (no op drawn) equals the plain one exactly
    same = [np.array_equal(a, b) for a, b in zip(light, plain)]
    assert any(same) or not np.allclose(light, plain)
    with pytest.raises(ValueError, match="augment='heavy'"):
        augment.augment_batch(canvas, size, seeds, augment="heavy", **kwargs)


def test_light_augment_needs_the_crop_and_a_side_the_blur_fits():
    from mlcd_jax.config_lib import ConfigError, base_config, train_augment
    from mlcd_jax import train

    c = base_config()
    c.model.name, c.data.image_size, c.model.overrides = "tiny", 16, {"patch_size": 8}
    assert train_augment(c) is True
    c.data.light_augment = True
    assert train_augment(c) == "light"
    train.checked_mesh(c)
    c.data.augment = False
    with pytest.raises(ConfigError, match="data.light_augment adds to the training augmentation"):
        train.checked_mesh(c)
    c.data.augment, c.data.image_size, c.model.overrides = True, 8, {"patch_size": 4}
    with pytest.raises(ConfigError, match="blurs with 21 taps: data.image_size must exceed 10"):
        train.checked_mesh(c)
