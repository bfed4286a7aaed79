"""``tfds:NAME[:SPLIT]``: a prepared TFDS dataset in ArrayRecord format through ``tfds.data_source``
(never downloads; :func:`prepare_command` prepares one, ImageNet from its tars in a ``manual_dir``). The
image feature is read undecoded, so the bytes are the stored originals (``tfds:fashion_mnist`` loads as
uint8 [N, 28, 28, 1], like the IDX files). Class names from the builder's ``ClassLabel`` where it is
available offline."""

from __future__ import annotations

import zlib
from collections.abc import Iterable
from typing import Any

from mlcd_jax.data.source_base import CAPTION_TEMPLATES, SourceError, decode_caption, item
from mlcd_jax.data.sources.base import Kind

TFDS_CAPTION_KEYS = ("caption", "text", "captions")  # a tfds dataset's text features that are its captions


def prepare_command(name: str) -> str:
    """The one command that prepares dataset ``name`` for this source (ArrayRecord files under tfds's data
    dir); ``manual_dir`` holds the files of a dataset that cannot be downloaded (imagenet2012: ILSVRC2012's
    ``ILSVRC2012_img_train.tar`` and ``ILSVRC2012_img_val.tar``)."""
    return (f'python -c "import tensorflow_datasets as tfds; tfds.builder(\'{name}\', file_format=\'array_record\')'
            f'.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=\'DIR\'))"')


class TfdsSource:
    """A prepared TFDS split through ``tfds.data_source`` with the image feature left encoded."""

    def __init__(self, name: str, split: str) -> None:
        import tensorflow_datasets as tfds

        try:
            builder = tfds.builder(name)
            image_key = next(k for k, f in builder.info.features.items() if isinstance(f, tfds.features.Image))
            self.source = tfds.data_source(
                name, split=split, download=False, decoders={image_key: tfds.decode.SkipDecoding()}
            )
        except StopIteration:
            raise SourceError(f"tfds dataset {name!r} has no Image feature") from None
        except Exception as e:  # tfds raises many types for missing / unprepared datasets
            raise SourceError(f"tfds:{name}:{split} is not available locally ({type(e).__name__}: {e}); prepare it "
                              f"once in ArrayRecord format: {prepare_command(name)}") from e
        self.name, self.split, self.image_key = name, split, image_key
        features = builder.info.features
        self.label_key = "label" if "label" in features else None
        # captions: the dataset's own text feature, else its class name in one of CAPTION_TEMPLATES
        self.text_key = next((k for k in TFDS_CAPTION_KEYS if k in features and isinstance(features[k], tfds.features.Text)),
                             None)
        label = features[self.label_key] if self.label_key else None
        self.names = list(label.names) if isinstance(label, tfds.features.ClassLabel) else None

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        example = self.source[index]
        label = int(example[self.label_key]) if self.label_key else None
        image = bytes(example[self.image_key])
        caption = None
        if self.text_key:
            text = example[self.text_key]
            caption = decode_caption(text) if isinstance(text, bytes) else str(text)
        elif self.names and label is not None:
            caption = CAPTION_TEMPLATES[zlib.crc32(image) % len(CAPTION_TEMPLATES)].format(self.names[label])
        return item(self.key(index), image, label, caption)

    def key(self, index: int) -> str:
        return f"{self.name}/{self.split}/{index:08d}"

    def identity_parts(self, num_images: int) -> Iterable[str]:
        return [self.name, self.split, str(num_images), f"captions: {self.text_key or ('classes' if self.names else '')}"]

    def __repr__(self) -> str:
        return f"TfdsSource({self.name!r}, {self.split!r}, n={len(self)})"


def _open(spec: str, args: list[str], split: str | None) -> TfdsSource:
    """``tfds:NAME[:SPLIT]``; asked for the ``test`` split (the evaluation's), a dataset whose ``test``
    split is missing or unlabelled (labels -1, as imagenet2012's) gives its ``validation`` split."""
    if not args or not args[0]:
        raise SourceError(f"source {spec!r} needs a dataset name: tfds:NAME[:SPLIT]")
    if split != "test":
        return TfdsSource(args[0], split or (args[1] if len(args) > 1 else "train"))
    try:
        source = TfdsSource(args[0], "test")
    except SourceError:
        return TfdsSource(args[0], "validation")
    labelled = source.label_key is None or len(source) == 0 or source[0]["label"] >= 0
    return source if labelled else TfdsSource(args[0], "validation")


def _class_names(args: list[str], split: str | None) -> list[str] | None:
    """The ``label`` feature's names, where the builder is available offline and has a ClassLabel."""
    import tensorflow_datasets as tfds

    try:
        feature = tfds.builder(args[0]).info.features["label"]
        return [name.replace("_", " ") for name in feature.names]
    except Exception:  # unknown or unprepared dataset, no "label" feature or not a ClassLabel
        return None


KIND = Kind("tfds", "tfds:NAME[:SPLIT]", _open, _class_names)
