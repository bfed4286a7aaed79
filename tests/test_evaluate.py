"""Evaluation library: kNN, linear probe, PCA / cosine pictures, results table."""

import json

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from mlcd_jax.evaluate import knn, pictures, report
from mlcd_jax.evaluate import linear_probe as lp


@pytest.fixture(scope="module")
def digits():
    """scikit-learn's 8x8 digits, raw pixels as features, a stratified 75/25 split."""
    x, y = load_digits(return_X_y=True)
    return train_test_split(x.astype(np.float32), y, test_size=0.25, random_state=0, stratify=y)


def _random_like(*arrays, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(a.shape).astype(np.float32) for a in arrays]


# ---------------------------------------------------------------- kNN


def _brute_force_knn(train, train_y, test, k, temperature, num_classes):
    """Independent reference: full similarity matrix in float64, stable argsort, loop over test rows."""
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    test = test / np.linalg.norm(test, axis=1, keepdims=True)
    sims = test.astype(np.float64) @ train.astype(np.float64).T
    preds = []
    for row in sims:
        nearest = np.argsort(-row, kind="stable")[:k]
        votes = np.zeros(num_classes)
        for i in nearest:
            votes[train_y[i]] += np.exp(row[i] / temperature)
        preds.append(int(np.argmax(votes)))
    return np.array(preds)


def test_knn_on_digits_pixels_is_accurate_and_random_features_are_at_chance(digits):
    x_train, x_test, y_train, y_test = digits
    assert knn.knn_accuracy(x_train, y_train, x_test, y_test) > 0.96  # measured 0.978
    r_train, r_test = _random_like(x_train, x_test)
    assert knn.knn_accuracy(r_train, y_train, r_test, y_test) < 0.2  # 10 classes: chance 0.1


@pytest.mark.parametrize("k,temperature,batch_size", [(1, 0.07, 64), (20, 0.07, 1024), (7, 0.5, 33)])
def test_knn_matches_brute_force_numpy(k, temperature, batch_size):
    rng = np.random.default_rng(k)
    train, test = rng.standard_normal((300, 16)), rng.standard_normal((100, 16))
    train_y = rng.integers(0, 5, 300)
    got = knn.knn_classify(train, train_y, test, k=k, temperature=temperature, batch_size=batch_size)
    np.testing.assert_array_equal(got, _brute_force_knn(train, train_y, test, k, temperature, 5))


def test_knn_temperature_decides_between_nearest_and_majority():
    # The query is almost on the single class-1 sample; two class-0 samples are farther away.
    train = np.array([[1.0, 0.05], [1.0, 1.0], [1.0, 1.1]])
    train_y = np.array([1, 0, 0])
    query = np.array([[1.0, 0.0]])
    # Sharp vote: exp(cos/T) makes the nearest neighbour outweigh two farther ones.
    assert knn.knn_classify(train, train_y, query, k=3, temperature=0.01)[0] == 1
    # Flat vote: every neighbour counts about the same, so the majority wins.
    assert knn.knn_classify(train, train_y, query, k=3, temperature=100.0)[0] == 0
    # Vote ties go to the smaller class id.
    assert knn.knn_classify(np.eye(2), np.array([1, 0]), np.ones((1, 2)), k=2)[0] == 0


def test_knn_num_classes_and_label_dtype_are_kept():
    train_y = np.array([3, 3, 5], np.int64)
    preds = knn.knn_classify(np.eye(3), train_y, np.eye(3), k=1, num_classes=10)
    np.testing.assert_array_equal(preds, train_y)
    assert preds.dtype == np.int64


@pytest.mark.parametrize(
    "args,kw,match",
    [
        ((np.ones((4, 3)), np.zeros(3, int), np.ones((2, 3))), {}, "one per feature row"),
        ((np.ones((4, 3)), np.zeros(4, int), np.ones((2, 5))), {}, "differ in width"),
        ((np.ones((4, 3)), np.zeros(4, int), np.ones((2, 3))), {"k": 5}, "k=5"),
        ((np.ones((4, 3)), np.zeros(4, int), np.ones((2, 3))), {"k": 0}, "k=0"),
        ((np.ones((0, 3)), np.zeros(0, int), np.ones((2, 3))), {}, "non-empty"),
        ((np.ones((4, 3)), np.zeros(4, int), np.ones((0, 3))), {}, "non-empty"),
        ((np.ones((4, 3)), np.zeros(4), np.ones((2, 3))), {}, "integer class ids"),
        ((np.ones((4, 3)), np.array([0, 1, 2, 3]), np.ones((2, 3))), {"k": 1, "num_classes": 2}, "num_classes=2"),
        ((np.ones((4, 3)), np.zeros(4, int), np.ones((2, 3))), {"k": 1, "temperature": 0.0}, "temperature"),
    ],
)
def test_knn_bad_input_raises(args, kw, match):
    with pytest.raises(ValueError, match=match):
        knn.knn_classify(*args, **kw)


def test_knn_accuracy_checks_test_labels():
    with pytest.raises(ValueError, match="test_labels"):
        knn.knn_accuracy(np.ones((4, 3)), np.zeros(4, int), np.ones((2, 3)), np.zeros(3, int), k=1)


# ---------------------------------------------------------------- linear probe


def test_linear_probe_on_digits_pixels_is_accurate_and_random_features_are_at_chance(digits):
    x_train, x_test, y_train, y_test = digits
    result = lp.linear_probe(x_train, y_train, x_test, y_test)
    assert result["top1"] > 0.95  # measured 0.973
    assert result["best_c"] in result["val_top1"]
    assert result["val_top1"][result["best_c"]] == max(result["val_top1"].values())
    assert list(result["val_top1"]) == sorted(result["val_top1"])
    # The coarse sweep stops once past the peak: the slow, weakly regularised end is never fitted.
    assert max(result["val_top1"]) < max(lp.COARSE_C_GRID)
    r_train, r_test = _random_like(x_train, x_test, seed=1)
    assert lp.linear_probe(r_train, y_train, r_test, y_test)["top1"] < 0.2


def test_linear_probe_uses_the_given_grid_and_is_deterministic(digits):
    x_train, x_test, y_train, y_test = digits
    grid = [1e-3, 1e-1, 10.0]
    first = lp.linear_probe(x_train, y_train, x_test, y_test, c_grid=grid, seed=3)
    assert first["best_c"] in grid
    assert sorted(first["val_top1"]) == grid  # an explicit grid is swept in full, not refined
    assert lp.linear_probe(x_train, y_train, x_test, y_test, c_grid=grid, seed=3) == first
    json.dumps(first)  # results go to results.json as they are


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"val_fraction": 0.0}, "val_fraction"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"c_grid": []}, "c_grid"),
        ({"c_grid": [1.0, -1.0]}, "c_grid"),
    ],
)
def test_linear_probe_bad_options_raise(kw, match):
    x, y = np.ones((10, 3)), np.arange(10) % 2
    with pytest.raises(ValueError, match=match):
        lp.linear_probe(x, y, x, y, **kw)


def test_linear_probe_bad_input_raises():
    x, y = np.ones((10, 3)), np.arange(10) % 2
    with pytest.raises(ValueError, match="one per feature row"):
        lp.linear_probe(x, y[:9], x, y)
    with pytest.raises(ValueError, match="single class"):
        lp.linear_probe(x, np.zeros(10, int), x, y)
    with pytest.raises(ValueError, match="differ in width"):
        lp.linear_probe(x, y, np.ones((10, 4)), y)


# ---------------------------------------------------------------- pictures


def _two_region_tokens(n=3, h=6, w=8, d=24, class_token=True):
    """Patch tokens whose left half and right half have different mean vectors, plus a little noise."""
    rng = np.random.default_rng(0)
    left = (np.arange(w) < w // 2)[None, :].repeat(h, 0)
    means = rng.standard_normal((2, d)) * 3
    patches = means[(~left).astype(int)].reshape(1, h * w, d) + 0.05 * rng.standard_normal((n, h * w, d))
    if class_token:
        patches = np.concatenate([rng.standard_normal((n, 1, d)), patches], axis=1)
    return patches.astype(np.float32), left


@pytest.mark.parametrize("class_token", [True, False])
def test_patch_pca_colours_two_regions_differently(class_token):
    tokens, left = _two_region_tokens(class_token=class_token)
    pictures_ = pictures.patch_pca_image(tokens, (6, 8), has_class_token=class_token, upscale=4)
    assert pictures_.shape == (3, 24, 32, 3) and pictures_.dtype == np.uint8
    patch_colours = pictures_[:, ::4, ::4].astype(float)  # one pixel per patch
    left_colour, right_colour = patch_colours[:, left].mean(axis=(0, 1)), patch_colours[:, ~left].mean(axis=(0, 1))
    assert np.linalg.norm(left_colour - right_colour) > 200  # the first component alone spans 0..255
    assert patch_colours[:, left].std(axis=(0, 1)).max() < 80
    assert patch_colours[:, ~left].std(axis=(0, 1)).max() < 80


def test_patch_pca_foreground_mask_blacks_out_the_border_side():
    rng = np.random.default_rng(0)
    h = w = 8
    centre = np.zeros((h, w), bool)
    centre[2:6, 2:6] = True
    tokens = 0.1 * rng.standard_normal((2, h * w, 16))
    tokens[:, centre.ravel()] += 3 * rng.standard_normal(16)
    out = pictures.patch_pca_image(tokens, (h, w), has_class_token=False, upscale=1, foreground=True)
    assert (out[:, ~centre] == 0).all()  # background (the side holding the border) is black
    assert (out[:, centre].max(axis=-1) > 0).mean() > 0.9


def test_patch_pca_bad_input_raises():
    with pytest.raises(ValueError, match="do not match grid"):
        pictures.patch_pca_image(np.ones((2, 10, 8)), (3, 3), has_class_token=False)
    with pytest.raises(ValueError, match="upscale"):
        pictures.patch_pca_image(np.ones((2, 10, 8)), (3, 3), upscale=0)
    with pytest.raises(ValueError, match="3 feature dimensions"):
        pictures.patch_pca_image(np.ones((2, 10, 2)), (3, 3))


def test_pca_grid_png_places_image_next_to_its_picture(tmp_path):
    images = np.zeros((3, 16, 16, 1), np.uint8)
    images[:, 4:12, 4:12] = 255
    pca = np.full((3, 8, 8, 3), (10, 200, 30), np.uint8)
    sheet = pictures.pca_grid_png(images, pca, tmp_path / "grid.png", pairs_per_row=2)
    with Image.open(tmp_path / "grid.png") as img:
        assert img.size == (sheet.shape[1], sheet.shape[0]) and img.mode == "RGB"
    gap = 2
    assert sheet.shape == (2 * (16 + gap) + gap, 4 * (16 + gap) + gap, 3)
    first_image = sheet[gap : gap + 16, gap : gap + 16]
    first_pca = sheet[gap : gap + 16, 2 * gap + 16 : 2 * gap + 32]
    assert (first_image[8, 8] == 255).all() and (first_image[0, 0] == 0).all()
    assert (first_pca == (10, 200, 30)).all()  # upscaled nearest-neighbour to the image's size
    with pytest.raises(ValueError, match="as many images"):
        pictures.pca_grid_png(images[:2], pca, tmp_path / "bad.png")


def test_save_png_round_trips_and_rejects_floats(tmp_path):
    picture = np.arange(12 * 10 * 3, dtype=np.uint8).reshape(12, 10, 3)
    pictures.save_png(picture, tmp_path / "sub" / "p.png")
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "sub" / "p.png")), picture)
    with pytest.raises(ValueError, match="uint8"):
        pictures.save_png(picture.astype(np.float32), tmp_path / "f.png")


def _write_metrics(path, steps=30):
    rng = np.random.default_rng(0)
    with open(path, "w") as f:
        for step in range(1, steps + 1):
            row = {"step": step, "loss": 5.0 - step / 10}
            if step % 5:  # some rows carry only the loss (and are left out of the cosine panels)
                row |= {
                    "loss_pos": 3 - step / 20,
                    "loss_neg": 2 - step / 30,
                    "mean_pos_cos": step / steps,
                    "mean_neg_cos": 0.1 - step / (10 * steps),
                }
            if step % 10 == 0:
                pos = rng.normal(step / steps - 0.2, 0.1, 500).clip(-1, 1)
                row["pos_cos_hist"] = np.histogram(pos, pictures.COS_HIST_EDGES)[0].tolist()
                row["neg_cos_hist"] = np.histogram(rng.normal(0, 0.05, 5000), pictures.COS_HIST_EDGES)[0].tolist()
            f.write(json.dumps(row) + "\n")
        f.write('{"step": 31, "loss_p')  # a line cut short by a hard kill


def test_cosine_curves_png_writes_a_picture_of_the_requested_size(tmp_path):
    _write_metrics(tmp_path / "metrics.jsonl")
    pictures.cosine_curves_png(tmp_path / "metrics.jsonl", tmp_path / "curves.png", figsize=(9, 6), dpi=80)
    with Image.open(tmp_path / "curves.png") as img:
        assert img.format == "PNG" and img.size == (720, 480)
        assert np.asarray(img.convert("L")).std() > 10  # not a blank canvas
    runs = {"MLC": tmp_path / "metrics.jsonl", "MLCD": tmp_path / "metrics.jsonl"}
    pictures.cosine_curves_png(runs, tmp_path / "compare.png")
    assert (tmp_path / "compare.png").stat().st_size > 10_000


def test_cosine_curves_png_rejects_metrics_without_cosines(tmp_path):
    (tmp_path / "m.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    with pytest.raises(ValueError, match="no rows with any of"):
        pictures.cosine_curves_png(tmp_path / "m.jsonl", tmp_path / "c.png")
    (tmp_path / "h.jsonl").write_text('{"step": 1, "pos_cos_hist": [1, 2, 3]}\n')
    with pytest.raises(ValueError, match="3 bins; expected 40"):
        pictures.cosine_curves_png(tmp_path / "h.jsonl", tmp_path / "c.png")


def test_cos_hist_edges_match_the_losses_binning():
    import jax.numpy as jnp

    from mlcd_jax.losses import core

    values = np.array([-1.0, -0.951, -0.21, 0.0, 0.33, 0.99, 1.0], np.float32)
    counts = core._histogram(jnp.asarray(values), jnp.ones(len(values), bool), core.identity)
    expected = np.histogram(values, pictures.COS_HIST_EDGES)[0]
    np.testing.assert_array_equal(np.asarray(counts), expected)


# ---------------------------------------------------------------- report


def test_results_table_formats_accuracies_as_percentages():
    rows = [
        {"model": "pixels", "knn_top1": 0.9777, "linear_top1": 0.97333, "best_c": 0.1778},
        {"model": "mlcd-vit-tiny", "knn_top1": np.float32(0.5), "steps": 300},
    ]
    table = report.results_table(rows, ["model", "knn_top1", "linear_top1", "best_c", "steps"])
    lines = table.splitlines()
    assert lines[0].split() == ["model", "knn_top1", "linear_top1", "best_c", "steps"]
    assert set(lines[1]) <= {"-", " "}
    assert lines[2].split() == ["pixels", "97.8%", "97.3%", "0.1778", "-"]
    assert lines[3].split() == ["mlcd-vit-tiny", "50.0%", "-", "-", "300"]
    assert len({len(line) for line in lines[:3]}) == 1  # aligned
    assert lines[2].index("97.8%") + len("97.8%") == lines[0].index("knn_top1") + len("knn_top1")  # right-aligned


def test_write_results_is_json_and_atomic(tmp_path):
    rows = [{"model": "pixels", "knn_top1": np.float64(0.9), "val_top1": {0.1: 0.8}, "curve": np.arange(3)}]
    path = tmp_path / "out" / "results.json"
    report.write_results(rows, path)
    assert json.loads(path.read_text()) == [
        {"model": "pixels", "knn_top1": 0.9, "val_top1": {"0.1": 0.8}, "curve": [0, 1, 2]}
    ]
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]  # no temp file left behind
