"""The evaluator registry (config.evals): what it builds, the rows it gives, and the same evaluators during
training (their scalars in metrics.jsonl at their cadence), with a profiler trace of a few steps."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from ml_collections.config_flags import config_path

from mlcd_jax import experiment, train
from mlcd_jax.config_lib import ConfigError
from mlcd_jax.data.sources import load_arrays
from mlcd_jax.evaluate import evaluators as ev
from mlcd_jax.evaluate.knn import knn_accuracy
from mlcd_jax.evaluate.linear_probe import linear_probe
from mlcd_jax.models.features import pixel_features

ROOT = Path(__file__).resolve().parents[1]


def _config(**overrides):
    spec = importlib.util.spec_from_file_location("demo_config", ROOT / "configs" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config("digits")
    c.eval.train_limit, c.eval.test_limit = 400, 150
    for key, value in overrides.items():
        config_path.set_value(key, c, value)
    return c


def test_registry_builds_the_configured_evaluators_and_rejects_bad_entries():
    c = _config()
    built = ev.build_evaluators(c)
    assert [(e.name, type(e).__name__, e.every) for e in built] == [
        ("knn", "Knn", 0), ("linear", "LinearProbe", 0), ("pictures", "Pictures", 0)]
    assert built[0].k == 20
    c.evals.linear.every = -1
    assert [e.name for e in ev.build_evaluators(c)] == ["knn", "pictures"]
    c.evals.knn.type = "knnn"
    with pytest.raises(ConfigError, match=r"evals.knn.type='knnn': choose one of knn, linear_probe, zero_shot, retrieval, pictures"):
        ev.build_evaluators(c)
    c = _config()
    with c.evals.knn.unlocked():
        c.evals.knn.kk = 3
    with pytest.raises(ConfigError, match=r"evals.knn: knn has no options \['kk'\]; its options: \['k'\]"):
        ev.build_evaluators(c)


def test_zero_shot_reads_the_class_names_once_and_they_are_no_option(monkeypatch):
    from mlcd_jax.data import sources

    calls = []
    class_names = sources.class_names
    monkeypatch.setattr(sources, "class_names", lambda *args: calls.append(args) or class_names(*args))
    c = _config()
    zero_shot = ev.ZeroShot(name="zs", every=0, config=c)
    names = class_names(c.eval.source, "test")
    test_y = load_arrays(c.eval.source, "test", c.eval.test_limit)[1]
    target = ev.Target(  # a perfect image tower (one-hot labels) and a text tower that names the prompt's class
        name="oracle", embed=lambda images: np.eye(len(names))[test_y],
        encode_text=lambda prompts: np.eye(len(names))[[names.index(p[len("a photo of a "):-1]) for p in prompts]])
    assert zero_shot(target) == zero_shot(target) == {"zero_shot_top1": 1.0}
    assert calls == [(c.eval.source, "test")]  # once, when built
    with c.unlocked():
        c.evals.zs = {"type": "zero_shot", "names": ["x"]}
    with pytest.raises(ConfigError, match=r"zero_shot has no options \['names'\]; its options: \['templates', 'class_names'\]"):
        ev.build_evaluators(c)


def test_a_baseline_row_is_what_the_metrics_give_on_the_eval_split():
    c = _config(**{"evals.pictures.every": -1})
    row = experiment.baseline_row(c, "pixels")
    train_x, train_y = load_arrays(c.eval.source, "train", c.eval.train_limit)  # the split loaded whole
    test_x, test_y = load_arrays(c.eval.source, "test", c.eval.test_limit)
    f_train, f_test = pixel_features(train_x), pixel_features(test_x)
    assert row == {
        "model": "raw pixels",
        "knn_top1": knn_accuracy(f_train, train_y, f_test, test_y, k=20),
        "linear_top1": linear_probe(f_train, train_y, f_test, test_y, seed=c.seed)["top1"],
    }
    c.evals.knn.k = 1
    assert experiment.baseline_row(c, "pixels")["knn_top1"] == knn_accuracy(f_train, train_y, f_test, test_y, k=1)


def test_evaluators_run_during_training_at_their_cadence_and_a_profile_is_written(tmp_path):
    c = _config(**{
        "num_train_steps": 12, "batch_size": 32, "log_every_steps": 100, "checkpoint_every_steps": 100,
        "loss.num_classes": 32, "data.cluster.num_clusters": 32, "loss.top_l": 2, "data.cluster.top_l": 2,
        "data.cache_dir": str(tmp_path / "cache"), "evals.knn.every": 5, "evals.linear.every": -1,
        "evals.pictures.every": 10, "profile_steps": 2,
    })
    c = experiment.with_shards(c)
    workdir = tmp_path / "run"
    train.train_and_evaluate(c, str(workdir), experiment.periodic_evals(c, str(workdir)))
    rows = {r["step"]: r for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())}
    assert sorted(rows) == [5, 10, 12]  # the evaluators' steps are logged, and the last one
    assert all(0.0 < rows[s]["heldout/knn_top1"] <= 1.0 for s in (5, 10)) and "heldout/knn_top1" not in rows[12]
    assert not any("knn_top1" in row for row in rows.values())  # no test-split score during training
    assert (workdir / "patch_pca.png").stat().st_size > 0  # pictures at step 10
    assert list((workdir / "plugins" / "profile").glob("*/*.xplane.pb")), "profile of steps 5-6"


def test_training_time_evaluation_holds_out_part_of_train_and_never_reads_test(monkeypatch):
    """``heldout=True`` (what the trainer asks for): the queries are a fixed tenth of the train split, the
    references the other nine tenths, disjoint and together the whole split; the test split is not read."""
    c = _config()
    train_x, train_y = load_arrays(c.eval.source, "train", c.eval.train_limit)
    read = []
    real = ev._split.__wrapped__

    def spy(source, split, limit):
        read.append(split)
        return real(source, split, limit)

    monkeypatch.setattr(ev, "_split", spy)
    target = ev.Target("pixels", pixel_features)
    fit_x, fit_y, held_x, held_y = ev.eval_features(c, target, heldout=True)
    assert set(read) == {"train"} and (len(fit_x), len(held_x)) == (360, 40)
    rows = {x.tobytes(): y for x, y in zip(np.concatenate([fit_x, held_x]), np.concatenate([fit_y, held_y]))}
    assert len(rows) == len({x.tobytes() for x in pixel_features(train_x)})
    assert sorted(rows.values()) == sorted(train_y.tolist())
    order = np.random.default_rng(0).permutation(400)  # the draw held-out images always had: seed 0, last 40
    np.testing.assert_array_equal(held_x, pixel_features(train_x[np.sort(order[360:])]))
    np.testing.assert_array_equal(fit_y, train_y[np.sort(order[:360])])
    assert ev.eval_features(c, target, heldout=True)[2] is held_x  # one draw per target: features computed once
    np.testing.assert_array_equal(ev.eval_images(c, 8, heldout=True), train_x[np.sort(order[360:])][:8])
    scores = ev.Knn(name="knn", every=5, config=c, k=20)(target, heldout=True)
    assert scores == {"knn_top1": knn_accuracy(fit_x, fit_y, held_x, held_y, k=20)}
    assert set(read) == {"train"}


def test_training_time_retrieval_scores_the_held_out_tail_of_the_train_split():
    images, captions, image_of = ev._captioned_split("digits", "train", 0, 8)
    held, held_captions, held_of = ev._captioned_split("digits", "train", 0, 8, 0.1)
    assert len(held) == round(0.1 * len(images)) and (held == images[-len(held):]).all()
    assert held_captions == captions[-len(held):] and held_of.tolist() == list(range(len(held)))


def test_eval_batch_size_below_one_is_one_line_in_training_and_evaluation():
    """``eval.batch_size=0`` is refused before anything runs, by the trainer's checks and by the
    evaluation's own target (``python -m mlcd_jax.evaluate`` does not run the trainer's checks)."""
    from mlcd_jax import runs

    c = _config(**{"eval.batch_size": 0})
    with pytest.raises(ConfigError, match=r"^eval.batch_size=0 must be positive$"):
        train.checked_mesh(c)
    with pytest.raises(ConfigError, match=r"^eval.batch_size=0 must be positive$"):
        experiment.model_target(c, "random-init", runs.build_model(c, 0))
