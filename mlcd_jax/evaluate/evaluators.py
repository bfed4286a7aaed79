"""Evaluators as a registry driven by the config: the same objects run during training and after it.

As big_vision's ``config.evals``: each entry ``config.evals.<name> = dict(type=..., every=..., **options)``
names one of :data:`EVALUATORS`. ``every > 0`` runs it every that many training steps (its scalars go into
``metrics.jsonl`` / TensorBoard with the training metrics) and after training; ``every = 0`` only after
training (``results.json``); ``every < 0`` turns it off (``--config.evals.linear.every=-1``).

During training no evaluator looks at a test split: it scores a held-out part of the train split
(``eval.heldout_fraction`` of it, a fixed draw) against the rest, and its scalars are logged as
``heldout/<name>`` (``heldout/knn_top1``), so the curves say which images they come from. After training
the train split is the reference and the test split the queries, as the papers report.

An evaluator looks at a :class:`Target`: a named feature function (a trained or random-init ViT, raw
pixels, the clustering teacher) and, for a trained run, its model and workdir. The labelled images come
from ``config.eval.source`` (train split -> test split), streamed in batches through the target once
(:mod:`mlcd_jax.evaluate.stream`): what is kept, per target, is features and labels, never the images, so
host memory does not grow with the eval set, and the images may be of any sizes.

- ``knn`` (option ``k``): cosine k-NN top-1, ``knn_top1``.
- ``linear_probe`` (option ``on_device``: the fits in JAX on the devices, :mod:`mlcd_jax.evaluate.device_probe`,
  for sets too large for scikit-learn): CLIP-protocol logistic regression top-1, ``linear_top1``.
- ``zero_shot`` (options ``templates``, a name in :data:`mlcd_jax.evaluate.zero_shot.TEMPLATES`, e.g.
  ``clip80``; ``class_names``, ``imagenet`` for CLIP's ImageNet-1K names where the source's are WordNet
  ids): CLIP-protocol zero-shot top-1 on the test split with the class names of ``eval.source``,
  ``zero_shot_top1``; targets with a text tower only (LiT and CLIP runs).
- ``retrieval`` (options ``source``, ``split``, ``limit``): image<->text Recall@1/5/10 on a captioned
  source's split (e.g. ``emoji``, or ``karpathy:DIR/dataset_coco.json`` with split ``test``: COCO /
  Flickr30k with their five captions per image, :mod:`mlcd_jax.data.karpathy`), ``i2t_r@K`` /
  ``t2i_r@K``; targets with a text tower only. ``limit`` counts images.
- ``pictures``: ``patch_pca.png`` (patch-feature PCA of 8 test images, paper Fig. 6) and
  ``cosine_curves.png`` (loss terms and cosines over training, Fig. 3) in the workdir; trained runs only.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Hashable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import jax
import ml_collections
import numpy as np
from etils import epath
from flax import nnx

from mlcd_jax.config_lib import ConfigError
from mlcd_jax.data import karpathy

if TYPE_CHECKING:
    from mlcd_jax.data.sources import Source

Embed = Callable[[np.ndarray], np.ndarray]
EncodeText = Callable[[Sequence[str]], np.ndarray]


@dataclasses.dataclass
class Target:
    """What evaluators look at: ``embed`` (uint8 images -> features) under a row name, for a trained
    run its ``model`` and ``workdir`` (pictures need them), and for an image-text run ``encode_text``
    (strings -> embeddings in the image features' space). Features of each split are computed once."""

    name: str
    embed: Embed
    model: nnx.Module | None = None
    workdir: str | None = None
    encode_text: EncodeText | None = None
    _cache: dict[Hashable, Any] = dataclasses.field(default_factory=dict, repr=False)

    def cached(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        """``compute()``, once per ``key`` for this target (its features of one split, say)."""
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

    def features(self, images: np.ndarray) -> np.ndarray:
        """``embed(images)``, cached per (read-only, shared) image array."""
        return self.cached(id(images), lambda: self.embed(images))


@functools.cache
def _split(source: str, split: str, limit: int) -> tuple[Source, int]:
    """One split's source and how many of its images are evaluated, opened once per process."""
    from mlcd_jax.data.sources import open_split

    opened = open_split(source, split)
    return opened, min(limit, len(opened)) if limit else len(opened)


def eval_split(config: ml_collections.ConfigDict, split: str) -> tuple[Source, int]:
    """The source of one split, ``"train"`` or ``"test"``, of ``config.eval.source`` and its image count,
    its limit applied."""
    if not config.eval.source:
        raise ConfigError("eval.source is empty: name a labelled source, e.g. fashion_mnist or digits")
    return _split(config.eval.source, split, config.eval[f"{split}_limit"])


HELDOUT = "heldout/"  # the prefix of what evaluators report during training


def _heldout_start(num_images: int, fraction: float) -> int:
    """Where a split's held-out part starts: ``fraction`` of its images (at least one) are held out."""
    return num_images - max(1, round(fraction * num_images))


def _heldout_rows(num_images: int, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(fit rows, held-out rows) of a train split, each ascending: ``fraction`` of it (at least one image,
    a permutation drawn with seed 0) held out."""
    order = np.random.default_rng(0).permutation(num_images)
    cut = _heldout_start(num_images, fraction)
    if cut < 1:
        raise ConfigError(f"eval.heldout_fraction={fraction} leaves no train images to score against")
    return np.sort(order[:cut]), np.sort(order[cut:])


def _read_only(arrays: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
    """``arrays``, made read-only: cached features are shared by every evaluator of a target."""
    for array in arrays:
        array.flags.writeable = False
    return arrays


def labelled_features(
    config: ml_collections.ConfigDict, target: Target, split: str
) -> tuple[np.ndarray, np.ndarray]:
    """``target``'s features and the labels of one split, streamed once per target (read-only)."""
    from mlcd_jax.evaluate.stream import split_features

    source, count = eval_split(config, split)
    size = config.data.image_size
    return target.cached((config.eval.source, split, count, size),
                         lambda: _read_only(split_features(target.embed, source, count, size, split)))


def eval_features(
    config: ml_collections.ConfigDict, target: Target, heldout: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train features, train labels, test features, test labels) of ``target`` on ``config.eval.source``,
    limits applied; ``heldout``: the rows of the train split's held-out part in place of the test split,
    the rest as train (what evaluators score during training; the test split is not read)."""
    train = labelled_features(config, target, "train")
    if not heldout:
        return (*train, *labelled_features(config, target, "test"))
    fraction, count = float(config.eval.get("heldout_fraction", 0.1)), len(train[1])
    return target.cached(
        (config.eval.source, "heldout", count, config.data.image_size, fraction),
        lambda: _read_only(tuple(array[rows] for rows in _heldout_rows(count, fraction) for array in train)))


def eval_images(config: ml_collections.ConfigDict, count: int, heldout: bool = False) -> np.ndarray:
    """The first ``count`` query images of :func:`eval_features` (of the test split, or with ``heldout`` of
    the train split's held-out part), read alone."""
    from mlcd_jax.evaluate.stream import read_images

    source, total = eval_split(config, "train" if heldout else "test")
    if heldout:
        rows = _heldout_rows(total, float(config.eval.get("heldout_fraction", 0.1)))[1][:count]
    else:
        rows = np.arange(min(count, total))
    return read_images(source, rows, config.data.image_size)[0]


@dataclasses.dataclass
class Evaluator:
    """One configured evaluator: ``name`` (its config key), ``every`` (see the module docstring)."""

    name: str
    every: int
    config: ml_collections.ConfigDict  # the run's config (eval data, image size, seed)
    labelled: ClassVar[bool] = True  # reads the labelled splits of eval.source

    def __call__(self, target: Target, heldout: bool = False) -> dict[str, float]:
        """The evaluator's scalars for ``target``; ``heldout``: during training, on the train split's
        held-out part instead of the test split (:func:`eval_features`)."""
        raise NotImplementedError


@dataclasses.dataclass
class Knn(Evaluator):
    k: int = 20

    def __call__(self, target: Target, heldout: bool = False) -> dict[str, float]:
        from mlcd_jax.evaluate.knn import knn_accuracy

        top1 = knn_accuracy(*eval_features(self.config, target, heldout), k=self.k)
        return {"knn_top1": top1}


@dataclasses.dataclass
class LinearProbe(Evaluator):
    on_device: bool = False  # fit in JAX on this process's devices (device_probe), else scikit-learn

    def __call__(self, target: Target, heldout: bool = False) -> dict[str, float]:
        from mlcd_jax.evaluate.device_probe import device_linear_probe
        from mlcd_jax.evaluate.linear_probe import linear_probe

        probe = device_linear_probe if self.on_device else linear_probe
        result = probe(*eval_features(self.config, target, heldout), seed=self.config.seed)
        return {"linear_top1": result["top1"]}


@dataclasses.dataclass
class Pictures(Evaluator):
    num_images: int = 8

    def __call__(self, target: Target, heldout: bool = False) -> dict[str, float]:
        if target.model is None or target.workdir is None:
            return {}  # baselines have no patch tokens or training curves
        from mlcd_jax.models.features import FeatureExtractor
        from mlcd_jax.evaluate.pictures import cosine_curves_png, patch_pca_image, pca_grid_png

        images = eval_images(self.config, self.num_images, heldout)
        size = self.config.data.image_size
        tokens = FeatureExtractor(target.model, size, batch_size=len(images), tokens=True)(images)
        if jax.process_index() != 0:
            return {}  # every process ran the forward (its weights may span them all); one writes the files
        grid = size // target.model.config.patch_size
        out = epath.Path(target.workdir)
        pca_grid_png(images, patch_pca_image(tokens, (grid, grid), upscale=1), out / "patch_pca.png")
        curves = {self.config.loss.kind.upper(): out / "metrics.jsonl",
                  "single-label": out / "single_label" / "metrics.jsonl"}
        curves = {name: path for name, path in curves.items() if path.exists()}
        if curves:
            cosine_curves_png(curves, out / "cosine_curves.png")
        print(f"pictures: {out / 'patch_pca.png'}, {out / 'cosine_curves.png'}", flush=True)
        return {}


@functools.cache
def _captioned_split(
    source: str, split: str, limit: int, image_size: int, heldout_fraction: float = 0.0
) -> tuple[np.ndarray, tuple[str, ...], np.ndarray]:
    """One split's (images, captions, the image of each caption) of a captioned source, read once per
    process (read-only): a Karpathy JSON's (several captions per image, stored at ``image_size``), or
    any other captioned source's (one caption per image). ``heldout_fraction > 0``: only the split's
    last that fraction of images (at least one) and their captions."""
    if source.startswith(karpathy.PREFIX):
        found = karpathy.load(source, split, image_size, limit or None)
        images, captions, image_of = found.images, found.captions, found.image_of
    else:
        from mlcd_jax.data.sources import load_captioned

        images, captions = load_captioned(source, split=split, limit=limit or None)
        image_of = np.arange(len(captions))
    if heldout_fraction:
        first = _heldout_start(len(images), heldout_fraction)
        keep = image_of >= first
        images, captions, image_of = images[first:], [c for c, k in zip(captions, keep) if k], image_of[keep] - first
    images.flags.writeable = False
    return images, tuple(captions), image_of


@dataclasses.dataclass
class ZeroShot(Evaluator):
    templates: str = "simple"
    class_names: str = ""  # "" = eval.source's own; "imagenet" = CLIP's 1,000 ImageNet names (label order)
    # the class names of the prompts, read once when the evaluator is built (None without eval.source)
    _names: list[str] | None = dataclasses.field(init=False, default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        from mlcd_jax.evaluate.zero_shot import CLASS_NAMES, TEMPLATES

        from mlcd_jax.data.sources import class_names

        if self.templates not in TEMPLATES:
            raise ConfigError(f"evals.{self.name}.templates={self.templates!r}: choose one of {', '.join(TEMPLATES)}")
        if self.class_names and self.class_names not in CLASS_NAMES:
            raise ConfigError(f"evals.{self.name}.class_names={self.class_names!r}: use '' (the source's own) or "
                              f"one of {', '.join(CLASS_NAMES)}")
        if self.config.eval.source:  # checked before any training
            own = class_names(self.config.eval.source, "test")
            self._names = list(CLASS_NAMES[self.class_names]) if self.class_names else own
            if not self._names:
                raise ConfigError(f"evals.{self.name}: eval.source={self.config.eval.source!r} has no class names "
                                  "for zero-shot prompts (class_names='imagenet' gives ImageNet-1K's)")
            if own and len(own) != len(self._names):
                raise ConfigError(f"evals.{self.name}: eval.source={self.config.eval.source!r} has {len(own)} classes "
                                  f"but class_names={self.class_names!r} names {len(self._names)}")

    def __call__(self, target: Target, heldout: bool = False) -> dict[str, float]:
        if target.encode_text is None:
            return {}  # an image-only model has no zero-shot classifier
        from mlcd_jax.evaluate.zero_shot import TEMPLATES, class_embeddings, zero_shot_top1

        # the queries only (a ConfigError without eval.source)
        test_f, test_y = (eval_features(self.config, target, heldout)[2:] if heldout
                          else labelled_features(self.config, target, "test"))
        classes = class_embeddings(target.encode_text, self._names, TEMPLATES[self.templates])
        return {"zero_shot_top1": zero_shot_top1(test_f, test_y, classes)}


@dataclasses.dataclass
class Retrieval(Evaluator):
    source: str = ""  # a captioned source spec; "" = eval.source
    split: str = "test"
    limit: int = 0
    labelled: ClassVar[bool] = False  # captions, not class labels

    def __call__(self, target: Target, heldout: bool = False) -> dict[str, float]:
        if target.encode_text is None:
            return {}
        from mlcd_jax.evaluate.zero_shot import retrieval_recall

        # During training a test split is replaced by the held-out part of the train split.
        split = "train" if heldout and self.split == "test" else self.split
        fraction = float(self.config.eval.get("heldout_fraction", 0.1)) if split != self.split else 0.0
        try:
            images, captions, image_of = _captioned_split(self.source or self.config.eval.source, split,
                                                          self.limit, self.config.data.image_size, fraction)
        except ValueError as err:  # a SourceError, or a Karpathy JSON / image that does not read
            raise ConfigError(f"evals.{self.name}: {err}") from None
        return retrieval_recall(target.features(images), target.encode_text(captions), image_of=image_of)


EVALUATORS: dict[str, type[Evaluator]] = {
    "knn": Knn, "linear_probe": LinearProbe, "zero_shot": ZeroShot, "retrieval": Retrieval, "pictures": Pictures,
}


def build_evaluators(config: ml_collections.ConfigDict) -> list[Evaluator]:
    """The enabled evaluators of ``config.evals`` in config order; a bad entry is a ConfigError."""
    out = []
    for name, entry in config.get("evals", {}).items():
        options = dict(entry)
        kind = options.pop("type", None)
        if kind not in EVALUATORS:
            raise ConfigError(f"evals.{name}.type={kind!r}: choose one of {', '.join(EVALUATORS)}")
        every = int(options.pop("every", 0))
        if every < 0:
            continue
        known = [f.name for f in dataclasses.fields(EVALUATORS[kind]) if f.init][3:]  # after name, every, config
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ConfigError(f"evals.{name}: {kind} has no options {unknown}; its options: {known}")
        out.append(EVALUATORS[kind](name=name, every=every, config=config, **options))
    return out


def evaluate(evaluators: list[Evaluator], target: Target) -> dict[str, Any]:
    """One results row: ``{"model": target.name, **every evaluator's scalars}``, printed as it lands."""
    row: dict[str, Any] = {"model": target.name}
    for evaluator in evaluators:
        row.update(evaluator(target))
    print(f"  {target.name}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items() if k != "model"), flush=True)
    return row
