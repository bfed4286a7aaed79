"""The on-device linear probe against scikit-learn's (the small-set reference) on digits."""

import jax
import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from mlcd_jax.evaluate import device_probe
from mlcd_jax.evaluate import linear_probe as lp


@pytest.fixture(scope="module")
def digits():
    """scikit-learn's 8x8 digits, raw pixels as features, a stratified 75/25 split (1,347 train rows: not a
    multiple of the 8 devices, so the padding rows are exercised)."""
    x, y = load_digits(return_X_y=True)
    return train_test_split(x.astype(np.float32), y, test_size=0.25, random_state=0, stratify=y)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_device_probe_agrees_with_scikit_learn_within_half_a_point(digits, seed):
    x_train, x_test, y_train, y_test = digits
    reference = lp.linear_probe(x_train, y_train, x_test, y_test, seed=seed)
    device = device_probe.device_linear_probe(x_train, y_train, x_test, y_test, seed=seed)
    assert abs(device["top1"] - reference["top1"]) <= 0.005  # measured: equal on all three seeds
    # the same search: the coarse grid, then refinements around the best C (within a grid step of sklearn's)
    assert set(lp.COARSE_C_GRID) <= set(device["val_top1"])
    assert abs(np.log10(device["best_c"]) - np.log10(reference["best_c"])) <= 0.5
    assert max(device["iterations"].values()) < 1000  # every fit converged


def test_rows_sharded_over_devices_give_the_one_device_fit(digits):
    x_train, x_test, y_train, y_test = digits
    assert jax.device_count() == 8
    grid = [0.01, 1.0]
    one = device_probe.device_linear_probe(x_train, y_train, x_test, y_test, c_grid=grid, devices=jax.devices()[:1])
    eight = device_probe.device_linear_probe(x_train, y_train, x_test, y_test, c_grid=grid)
    assert one["best_c"] == eight["best_c"] and one["top1"] == pytest.approx(eight["top1"], abs=1 / len(y_test))
    for c in grid:
        assert one["val_top1"][c] == pytest.approx(eight["val_top1"][c], abs=1e-6 + 1 / len(y_train))


def test_mistakes_are_the_reference_probes_errors(digits):
    x_train, x_test, y_train, y_test = digits
    with pytest.raises(ValueError, match="differ in width"):
        device_probe.device_linear_probe(x_train, y_train, x_test[:, :10], y_test)
    with pytest.raises(ValueError, match="single class"):
        device_probe.device_linear_probe(x_train, np.zeros_like(y_train), x_test, y_test)


def test_the_linear_probe_evaluator_fits_on_device_when_asked(monkeypatch):
    from mlcd_jax.config_lib import base_config
    from mlcd_jax.data.sources import load_arrays
    from mlcd_jax.evaluate.evaluators import Target, build_evaluators, evaluate
    from mlcd_jax.models.features import pixel_features

    config = base_config()
    config.eval.source, config.eval.train_limit, config.eval.test_limit = "digits", 400, 200
    config.evals = {"linear": dict(type="linear_probe", every=0, on_device=True)}
    calls = []

    def fake(train_f, train_y, test_f, test_y, seed):  # the probe itself is tested above
        calls.append((train_f, train_y, test_f, test_y, seed))
        return {"top1": 0.5}

    monkeypatch.setattr(device_probe, "device_linear_probe", fake)
    (probe,) = build_evaluators(config)
    assert evaluate([probe], Target("raw pixels", pixel_features))["linear_top1"] == 0.5
    train_x, train_y = load_arrays("digits", "train", 400)
    test_y = load_arrays("digits", "test", 200)[1]
    (got,) = calls
    np.testing.assert_array_equal(got[0], pixel_features(train_x))
    np.testing.assert_array_equal(got[3], test_y)
    assert got[4] == config.seed
