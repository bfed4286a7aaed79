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


@pytest.mark.parametrize("train_block", [1, 7, 64, 128, 300, 1000])
@pytest.mark.parametrize("k", [1, 20])
def test_blocked_knn_matches_brute_force_for_any_train_block(k, train_block):
    """Train rows in blocks with a running top-k (301 rows: at most 64, 128 or 300 per block leave padded
    rows, 7 divides it, 1 is narrower than k, 1000 is all rows in one block) give the brute force's
    predictions."""
    rng = np.random.default_rng(train_block)
    train, test = rng.standard_normal((301, 16)), rng.standard_normal((100, 16))
    train_y = rng.integers(0, 5, 301)
    got = knn.knn_classify(train, train_y, test, k=k, batch_size=33, train_block=train_block)
    np.testing.assert_array_equal(got, _brute_force_knn(train, train_y, test, k, 0.07, 5))


@pytest.mark.parametrize("train_block", [1, 2, 3, 5])
def test_blocked_knn_ties_go_to_the_smaller_train_index(train_block):
    """Equal cosines across (and within) blocks: the neighbours are the earliest rows, as one top_k over
    all rows (and the brute force's stable sort) picks them."""
    train = np.array([[0.0, 1.0], [1.0, 0.0], [2.0, 0.0], [1.0, 0.0], [3.0, 0.0]])
    train_y = np.array([0, 1, 2, 3, 4])
    query = np.array([[1.0, 0.0]])
    sims, index = knn._top_k_neighbours(query.astype(np.float32), _blocks(train, train_block), 5, k=3)
    assert index.tolist() == [[1, 2, 3]]
    for k in (1, 2, 4):
        got = knn.knn_classify(train, train_y, query, k=k, temperature=100.0, train_block=train_block)
        np.testing.assert_array_equal(got, _brute_force_knn(train, train_y, query, k, 100.0, 5))


def _blocks(train, rows):
    """``train`` L2-normalised, zero-padded and cut into blocks of ``rows`` (what knn_classify passes)."""
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    return np.pad(train, ((0, -len(train) % rows), (0, 0))).reshape(-1, rows, train.shape[1]).astype(np.float32)


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
    assert set(lp.COARSE_C_GRID) <= set(result["val_top1"])  # the whole coarse grid, then 2 per refinement
    assert len(result["val_top1"]) <= len(lp.COARSE_C_GRID) + 2 * lp.REFINE_ROUNDS
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


def _far_tail_features(n=2000, seed=0):
    """Binary features on which validation accuracy is not unimodal in C, by construction.

    Class 0 (60 %) is a cluster at z = 0 plus a far tail at z = 10 (a fifth of it); class 1 sits at
    z = 3. A second feature flags the tail (+3) under noise of std 10 that a third feature measures,
    so only a weakly regularised fit can subtract the noise and see the flag. Strong regularisation
    predicts class 0 (accuracy 0.6); moderate regularisation follows the class means along z and
    flips the tail to class 1 first (below 0.6); weak regularisation uses the flag (over 0.9).
    """
    rng = np.random.default_rng(seed)
    group = rng.choice(3, n, p=[0.48, 0.12, 0.4])  # class 0 near, class 0 tail, class 1
    noise = 10.0 * rng.standard_normal(n)
    x = np.stack([np.array([0.0, 10.0, 3.0])[group] + rng.standard_normal(n),
                  3.0 * (group == 1) + noise, noise + 0.1 * rng.standard_normal(n)], axis=1)
    y = (group == 2).astype(np.int64)
    m = 3 * n // 4
    return x[:m], y[:m], x[m:], y[m:]


def test_linear_probe_searches_past_a_dip_in_validation_accuracy():
    x_train, y_train, x_test, y_test = _far_tail_features()
    result = lp.linear_probe(x_train, y_train, x_test, y_test)
    val = result["val_top1"]
    assert val[1e-2] < val[1e-4] == val[1e-6] < val[result["best_c"]]  # plateau, dip, peak (measured .59 .49 .94)
    grid = lp.linear_probe(x_train, y_train, x_test, y_test, c_grid=lp.COARSE_C_GRID)
    assert result["top1"] >= grid["top1"] - 0.01 and result["top1"] > 0.9  # measured 0.932, grid 0.930
    assert result["best_c"] >= 1.0


def test_linear_probe_at_vanishing_c_predicts_the_class_prior_in_search_and_refit():
    """At C -> 0 the optimum has weights 0: every prediction is the most frequent training class. A fit
    that stops early with its intercepts still at 0 scores far better (measured 0.79 on validation at
    C = 1e-7 here, against 0.11 at 1e-8 and 1e-6), and the refit need not stop at the same place."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, 3000)  # class counts differ a little
    x = np.maximum((rng.standard_normal((10, 64))[y] + 2 * rng.standard_normal((3000, 64)))
                   @ rng.standard_normal((64, 64)), 0).astype(np.float32)
    results = [lp.linear_probe(x[:2400], y[:2400], x[2400:], y[2400:], c_grid=[c]) for c in (1e-8, 1e-7, 1e-6)]
    assert len({a for r in results for a in r["val_top1"].values()}) == 1
    for r in results:
        assert r["top1"] == pytest.approx(np.mean(y[2400:] == np.bincount(y[:2400]).argmax()))


def test_linear_probe_refits_when_a_rare_class_is_missing_from_the_fit_split():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 200)
    y[0] = 3  # one example, so no stratified split
    x = rng.standard_normal((200, 5)) + y[:, None]
    assert 0 in lp.split(y, 0.2, seed=6)[1]  # with seed 6 it is in the validation part only
    assert lp.linear_probe(x, y, x, y, seed=6)["top1"] > 0.8  # measured 0.86


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


def _runs(mask_1d):
    """(first, last) index of each run of True in a 1-D mask."""
    idx = np.flatnonzero(mask_1d)
    breaks = np.flatnonzero(np.diff(idx) > 1)
    return list(zip(idx[np.r_[0, breaks + 1]], idx[np.r_[breaks, len(idx) - 1]]))


def test_pca_grid_png_is_legible_with_each_image_above_its_picture(tmp_path):
    """16-px digits and 8-px PCA maps become >= 160-px tiles (nearest neighbour), images above their maps,
    wrapping after `columns`, with a title and row labels; a regression to tiny output fails here."""
    images = np.zeros((3, 16, 16, 3), np.uint8)
    images[:] = (30, 60, 220)
    images[:, 4:12, 4:12] = 255
    pca = np.full((3, 8, 8, 3), (10, 200, 30), np.uint8)
    sheet = pictures.pca_grid_png(images, pca, tmp_path / "grid.png", columns=2)
    with Image.open(tmp_path / "grid.png") as img:
        assert img.size == (sheet.shape[1], sheet.shape[0]) and img.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(img), sheet)
    image_mask, pca_mask = (sheet == (30, 60, 220)).all(-1), (sheet == (10, 200, 30)).all(-1)
    image_cols, image_rows = _runs(image_mask.any(0)), _runs(image_mask.any(1))
    pca_cols, pca_rows = _runs(pca_mask.any(0)), _runs(pca_mask.any(1))
    assert len(image_cols) == len(pca_cols) == 2 and len(image_rows) == len(pca_rows) == 2  # 2 columns, 2 bands
    for first, last in image_cols + image_rows + pca_cols + pca_rows:
        assert last - first + 1 == 160, (first, last)  # every tile is 160 px, not the input's 16 or 8
    assert image_cols == pca_cols  # each map sits in its image's column ...
    for (_, image_bottom), (pca_top, _) in zip(image_rows, pca_rows):
        assert image_bottom < pca_top < image_bottom + 20  # ... right below it
    (left, _), (top, _) = image_cols[0], image_rows[0]
    tile = sheet[top : top + 160, left : left + 160]
    assert (tile[40:120, 40:120] == 255).all() and (tile[:40] == (30, 60, 220)).all()  # 10x nearest neighbour
    assert (pca_mask[pca_rows[1][0] : pca_rows[1][1] + 1].any(0)).sum() == 160  # the third pair alone in band 2
    dark = sheet.max(axis=-1) < 100
    assert dark[:top].sum() > 200, "no title above the tiles"
    assert dark[:, :left].sum() > 200, "no row labels left of the tiles"
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


def test_cosine_curves_png_names_image_text_pair_cosines(tmp_path, monkeypatch):
    _write_metrics(tmp_path / "mlcd.jsonl")
    with open(tmp_path / "clip.jsonl", "w") as f:  # CLIP / LiT / ProtoCLIP rows: InfoNCE terms, pair cosines
        for step in range(1, 6):
            f.write(json.dumps({"step": step, "loss_i2t": 2.0, "loss_t2i": 2.1, "mean_pos_cos": 0.1 * step,
                                "mean_neg_cos": 0.0}) + "\n")
    figures = []
    monkeypatch.setattr(pictures, "save_figure", lambda fig, path: figures.append(fig))

    def panel_b(runs):
        pictures.cosine_curves_png(runs, tmp_path / "c.png")
        ax = figures[-1].axes[1]
        return ax.get_title(), [line.get_label() for line in ax.get_lines()]

    assert panel_b(tmp_path / "mlcd.jsonl") == (
        "(b) mean cosine to positive / negative prototypes", ["mean_pos_cos", "mean_neg_cos"])
    assert panel_b(tmp_path / "clip.jsonl") == (
        "(b) mean cosine of matched / unmatched image-text pairs",
        ["mean_pos_cos (matched pairs)", "mean_neg_cos (unmatched pairs)"])
    assert panel_b({"CLIP": tmp_path / "clip.jsonl", "single-label": tmp_path / "mlcd.jsonl"}) == (
        "(b) mean positive / negative cosine",
        ["CLIP: mean_pos_cos (matched pairs)", "CLIP: mean_neg_cos (unmatched pairs)",
         "single-label: mean_pos_cos", "single-label: mean_neg_cos"])


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


# ---------------------------------------------------------------- encoders


def test_image_and_text_encoders_pad_batches_over_the_devices_and_match_the_models():
    import jax
    from flax import nnx

    from mlcd_jax.data import augment
    from mlcd_jax.data.tokenizer import tokenize
    from mlcd_jax.models.features import FeatureExtractor, TextEncoder
    from mlcd_jax.models import TextTransformer, VisionTransformer, get_preset, get_text_preset

    vit = VisionTransformer(get_preset("tiny"), rngs=nnx.Rngs(0))
    images = np.random.default_rng(0).integers(0, 256, (11, 32, 32, 3), np.uint8)
    extract = FeatureExtractor(vit, 32, batch_size=5)
    assert extract.batch_size == 8 == jax.local_device_count()  # 5 rounded up to the 8 devices
    np.testing.assert_allclose(extract(images), vit(augment.normalize(images))[0], rtol=1e-5, atol=1e-5)
    text = TextTransformer(get_text_preset("tiny", context_length=16), rngs=nnx.Rngs(0))
    texts = [f"a photo of a {i}." for i in range(11)]
    encode = TextEncoder(text, batch_size=9, devices=jax.local_devices()[:4])
    assert encode.batch_size == 12  # 9 rounded up to the 4 devices given
    ids = tokenize(texts, text.config.context_length)
    np.testing.assert_allclose(encode(texts), text(ids), rtol=1e-5, atol=1e-5)
