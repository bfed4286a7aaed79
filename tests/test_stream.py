"""Streamed eval features (mlcd_jax/evaluate/stream.py, issue 30): batch by batch from any source, images of
any sizes, the same features and metrics as a split loaded whole, and one-line errors naming the image."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mlcd_jax import experiment, runs
from mlcd_jax.data.pipeline import eval_pixels
from mlcd_jax.data.source_base import SourceError
from mlcd_jax.data.sources import FolderSource, load_arrays, open_source, open_split
from mlcd_jax.evaluate import evaluators as ev
from mlcd_jax.evaluate import stream
from mlcd_jax.evaluate.knn import knn_accuracy
from mlcd_jax.evaluate.linear_probe import linear_probe
from mlcd_jax.models.features import pixel_features

ROOT = Path(__file__).resolve().parents[1]


def _write(root: Path, images: np.ndarray, labels: np.ndarray, ext: str = "png") -> None:
    for i, (image, label) in enumerate(zip(images, labels)):
        (root / f"c{label}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(root / f"c{label}" / f"{i:04d}.{ext}")


def test_a_folder_streams_the_pixels_of_the_arrays_it_was_written_from(tmp_path, monkeypatch):
    """Batches of 16 (a partial last one) from PNG files: the features and labels of the arrays, exactly."""
    monkeypatch.setattr(stream, "BATCH", 16)
    images, labels = load_arrays("digits", "test", 40)
    _write(tmp_path, images, labels)
    folder = FolderSource(str(tmp_path))
    order = np.argsort([f"c{y}/{i:04d}" for i, y in enumerate(labels)])  # the folder's sorted order
    features, got_labels = stream.split_features(pixel_features, folder, 40, 16, "test")
    np.testing.assert_array_equal(features, pixel_features(images[order]))
    np.testing.assert_array_equal(got_labels, labels[order])
    array_features, array_labels = stream.split_features(pixel_features, open_split("digits", "test"), 40, 16, "t")
    np.testing.assert_array_equal(array_features, pixel_features(images))
    np.testing.assert_array_equal(array_labels, labels)


def test_images_of_mixed_sizes_are_each_resized_and_centre_cropped_to_the_model_size(tmp_path):
    rng = np.random.default_rng(0)
    shapes = [(20, 30, 3), (16, 16, 3), (40, 24, 1), (16, 16, 3)]
    images = [rng.integers(0, 256, shape, np.uint8) for shape in shapes]
    for i, image in enumerate(images):
        (tmp_path / "a").mkdir(exist_ok=True)
        Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(tmp_path / "a" / f"{i}.png")
    features, labels = stream.split_features(pixel_features, FolderSource(str(tmp_path)), 4, 16, "train")
    expected = np.concatenate([eval_pixels(image[None], 16) for image in images])
    np.testing.assert_array_equal(features, pixel_features(expected))
    assert labels.tolist() == [0, 0, 0, 0] and features.dtype == np.float32


def test_an_image_that_does_not_decode_or_has_no_label_is_named(tmp_path):
    _write(tmp_path / "split", *load_arrays("digits", "test", 3))
    (tmp_path / "split" / "c9").mkdir(exist_ok=True)
    (tmp_path / "split" / "c9" / "broken.png").write_bytes(b"not a png")  # sorts last
    with pytest.raises(SourceError, match=r"^c9/broken.png: "):
        stream.split_features(pixel_features, FolderSource(str(tmp_path / "split")), 4, 8, "test")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "loose.png")
    with pytest.raises(SourceError, match=r"^loose.png has no class label"):
        stream.split_features(pixel_features, FolderSource(str(tmp_path)), 5, 8, "test")
    with pytest.raises(SourceError, match="emoji/test has no class label"):
        stream.split_features(pixel_features, open_source("emoji:test"), 3, 8, "test")


def _demo_config(arg: str):
    spec = importlib.util.spec_from_file_location("demo_config", ROOT / "configs" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config(arg)
    c.eval.train_limit, c.eval.test_limit = 1000, 300  # batches of 256: a partial last one in each split
    return c


@pytest.mark.parametrize("demo", ["", "digits"])
def test_streamed_features_and_metrics_equal_the_split_loaded_whole(demo):
    """A random-init ViT on the demo sources (Fashion-MNIST, digits): kNN and linear-probe figures of the
    evaluators (streamed) are those of the images loaded whole and embedded at once."""
    c = _demo_config(demo)
    target = experiment.model_target(c, "random-init", runs.build_model(c, c.seed))
    train_x, train_y = load_arrays(c.eval.source, "train", c.eval.train_limit)
    test_x, test_y = load_arrays(c.eval.source, "test", c.eval.test_limit)
    whole = target.embed(train_x), train_y, target.embed(test_x), test_y
    streamed = ev.eval_features(c, target)
    for got, want in zip(streamed, whole):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    knn, probe = (ev.build_evaluators(c)[i] for i in (0, 1))
    assert knn(target) == {"knn_top1": knn_accuracy(*whole, k=knn.k)}
    assert probe(target) == {"linear_top1": linear_probe(*whole, seed=c.seed)["top1"]}


def _tars(root: Path, folder: Path, split: str, per_tar: int) -> None:
    """``folder``'s images in its own (sorted) order as WebDataset tars ``root/<split>-<t>.tar``: each
    sample ``<class>_<name>.png`` with ``.cls`` (the folder's label for it) and ``.txt``."""
    import io
    import tarfile

    files = sorted((folder / split).rglob("*.png"))
    classes = sorted({path.parent.name for path in files})  # the folder's labels: its class folders' order
    for t in range(0, len(files), per_tar):
        with tarfile.open(root / f"{split}-{t // per_tar}.tar", "w") as tar:
            for path in files[t : t + per_tar]:
                stem = f"{path.parent.name}_{path.stem}"
                label = str(classes.index(path.parent.name)).encode()
                for name, data in ((f"{stem}.png", path.read_bytes()), (f"{stem}.cls", label), (f"{stem}.txt", b"a digit")):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


def test_a_wds_split_streams_as_the_same_images_in_a_folder(tmp_path, monkeypatch):
    """``wds:DIR/{split}-{0..1}.tar``: indexed once, read by offset, labels from ``.cls``: the folder's
    pixels, labels and features, in the tars' order; mistakes are one line naming the tar or sample."""
    monkeypatch.setattr(stream, "BATCH", 16)
    for split, n in (("train", 40), ("test", 20)):
        images, labels = load_arrays("digits", split, n)
        _write(tmp_path / "folder" / split, images, labels)
        (tmp_path / "wds").mkdir(exist_ok=True)
        _tars(tmp_path / "wds", tmp_path / "folder", split, per_tar=-(-n // 2))
    spec = f"wds:{tmp_path}/wds/{{split}}-{{0..1}}.tar"
    for split, n in (("train", 40), ("test", 20)):
        tars, folder = open_split(spec, split), open_split(f"folder:{tmp_path / 'folder'}", split)
        assert len(tars) == len(folder) == n and tars[3]["caption"] == "a digit"
        assert tars.key(0).startswith(f"{split}-0/c")
        got = stream.split_features(pixel_features, tars, n, 16, split)
        want = stream.split_features(pixel_features, folder, n, 16, split)
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a, b)
    with pytest.raises(SourceError, match="has no {split} to name the 'test' split"):
        open_split(f"wds:{tmp_path}/wds/test-{{0..1}}.tar", "test")
    (tmp_path / "bad").mkdir()
    _tars(tmp_path / "bad", tmp_path / "folder", "test", per_tar=20)
    import tarfile

    with tarfile.open(tmp_path / "bad" / "test-0.tar", "a") as tar:  # a sample whose class id is a word
        import io

        info = tarfile.TarInfo("zz.cls")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"two"))
    with pytest.raises(SourceError, match="zz.cls holds 'two', not a class id"):
        open_source(f"wds:{tmp_path}/bad/test-0.tar")


def test_each_process_reads_only_its_own_rows_and_gets_every_feature(tmp_path, monkeypatch):
    """The multi-process path (run here in one process on 8 devices): each batch's rows are read per
    device block, only the blocks this process holds, and the features and labels equal the whole
    batches' (a partial last batch included); read_labels reads a folder's labels from its paths."""
    from mlcd_jax.models.features import FeatureExtractor

    images, labels = load_arrays("digits", "test", 40)
    _write(tmp_path, images, labels)
    folder = FolderSource(str(tmp_path))
    c = _demo_config("digits")  # a 16 px ViT
    embed = FeatureExtractor(runs.build_model(c, 0), c.data.image_size, batch_size=16)
    assert embed.own_rows() == [(2 * i, 2 * i + 2) for i in range(8)]  # 8 devices, 2 rows each
    read = []
    get = FolderSource.__getitem__
    monkeypatch.setattr(FolderSource, "__getitem__", lambda self, i: read.append(i) or get(self, i))
    got = stream._own_rows_features(embed, folder, 40, 16, "test")
    assert sorted(read) == list(range(40))  # every image once (one process holds every block)
    want = stream.split_features(embed, folder, 40, 16, "test")
    np.testing.assert_allclose(got[0], want[0], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(stream.read_labels(folder, np.arange(40)), want[1])
