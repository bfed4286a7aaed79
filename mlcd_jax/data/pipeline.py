"""grain input pipelines: MLCD record shards -> host-local training batches; arrays -> eval inputs.

Training: ``ShardSource`` (grain's ``ArrayRecordDataSource`` naming each record's shard) over the shards -> ``GlobalOrderSampler`` (:mod:`mlcd_jax.data.sampling`: the seeded global order
of ``mlcd_jax.data.order``, cut by JAX process) -> **decode only** -> batch. The host does no
resampling: each example becomes a uint8 canvas ``[M, M, C]`` holding the decoded image in its
top-left ``size`` = (h, w) pixels and a per-example ``seed`` (uint32 [2]) drawn from the example's
RNG, which the sampler seeds with (seed, epoch, global position). The random resized crop, flip and
normalisation then run batched on the accelerator (:func:`mlcd_jax.data.augment.augment_batch`,
jitted by the trainer). So a run on N processes sees the batches of a 1-process run, and the iterator
state (``get_state`` / ``set_state``, saved by the trainer's checkpoints) restores the exact next
batches.

Small datasets (decoded size up to ``in_memory_bytes``, one image shape) are decoded once into a
uint8 array when the loader is made; each example then costs an array lookup. Larger ones decode per
example; JPEGs use PIL's draft mode (DCT scaling) to the smallest size whose shorter side still
covers ``decode_size`` pixels (default: the training size), and images larger than the canvas are
shrunk to fit it.

Corrupt records (unreadable from a damaged shard, undecodable record or image) are dropped, logged with
their shard and position, and counted: every skip is appended to a per-loader log (the trainer keeps it in
``workdir/skipped_records``) that all worker processes share, read with ``TrainLoader.skipped_records`` (a
count) or ``TrainLoader.skipped()`` (record ids and reasons). A dropped record is replaced by the next
one of the same process, so only a run with corrupt records departs from the process-count-invariant
order. Records whose positives are fewer than ``top_l`` are padded with label -1; records with more
keep their best ``top_l``.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import shutil
import tempfile
import weakref
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np
from absl import flags
from etils import epath

from mlcd_jax import fileio
from mlcd_jax.data import augment, records
from mlcd_jax.data.augment import CLIP_MEAN, CLIP_STD, augment_batch
from mlcd_jax.data.sampling import DecodedBatches, GlobalOrderSampler, PortableIterator

__all__ = ["CLIP_MEAN", "CLIP_STD", "TrainLoader", "eval_pixels", "make_train_loader", "preprocess_eval", "resolve_shards"]

_SKIPPED = "skipped"


def _glob(pattern: str) -> list[str]:
    """Sorted paths matching ``pattern``, local or on an object store (``gs://b/shards/*.array_record``)."""
    parts = pattern.split("/")
    magic = [i for i, part in enumerate(parts) if glob.has_magic(part)]
    if not magic:
        return [pattern] if epath.Path(pattern).exists() else []
    base = "/".join(parts[: magic[0]]) or ("/" if pattern.startswith("/") else ".")
    return sorted(str(p) for p in epath.Path(base).glob("/".join(parts[magic[0]:])))


def resolve_shards(spec: str | Sequence[str]) -> tuple[list[str], dict[str, Any]]:
    """(shard paths, manifest or {}) for a clustering output dir, a glob, or a list of paths; local or
    ``gs://`` (read through etils.epath; ArrayRecord reads ``gs://`` shards itself)."""
    if not isinstance(spec, str):
        paths, manifest = list(spec), {}
    elif (manifest_path := epath.Path(spec) / "manifest.json").exists():
        manifest = fileio.load_json(manifest_path)
        paths = [str(manifest_path.parent / s["path"]) for s in manifest["shards"] if s["num_records"]]
    else:
        paths, manifest = _glob(spec), {}
    if not paths:
        raise FileNotFoundError(f"no record shards at {spec!r}: give a clustering output dir or a glob of shards")
    return paths, manifest


class SkipLog:
    """Append-only log of skipped records shared by worker processes (one file per process)."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        os.makedirs(directory, exist_ok=True)

    def add(self, what: str, error: str) -> None:
        line = f"{what}\t{error}".replace("\n", " ") + "\n"
        with open(os.path.join(self.directory, f"skipped-{os.getpid()}.tsv"), "a", encoding="utf-8") as f:
            f.write(line)

    def entries(self) -> list[tuple[str, str]]:
        out = []
        for path in sorted(glob.glob(os.path.join(self.directory, "skipped-*.tsv"))):
            with open(path, encoding="utf-8") as f:
                out += [tuple(line.rstrip("\n").split("\t", 1)) for line in f if line.strip()]
        return out


class ShardSource(grain.sources.ArrayRecordDataSource):
    """ArrayRecord shards as one source of ``(where, record bytes)``: ``where`` names the shard file and
    the record's position in it, for the skip log. A record that cannot be read (a damaged shard: riegeli
    raises) comes back with ``None`` bytes and is skipped like an undecodable one, instead of stopping
    every re-run at the same step with an error that names no file."""

    def __repr__(self) -> str:
        """What the data order depends on (grain compares it on resume): each shard's file name and record
        count, not where the shards live, so a run resumes from shards copied elsewhere."""
        shards = [(os.path.basename(str(r.filename)), r.num_records) for r in self._read_instructions]
        digest = hashlib.sha256(json.dumps(shards).encode()).hexdigest()[:16]
        return f"ShardSource(num_shards={len(shards)}, num_records={len(self)}, names_and_counts={digest})"

    def __getitem__(self, key: Any) -> tuple[str, bytes | None]:
        reader, position = self._reader_idx_and_position(key)
        where = f"{os.path.basename(str(self.paths[reader]))} record {position}"
        try:
            return where, super().__getitem__(key)
        except Exception as e:  # riegeli / array_record raise RuntimeError, OSError, ... for damage
            logging.warning("unreadable record (%s): %s", where, e)
            return where, None


def _decode_record(
    data: bytes | None, num_channels: int, min_side: int = 0, context_length: int = 0
) -> tuple[np.ndarray, np.ndarray, str | None, np.ndarray | None]:
    """MLCD record bytes -> (uint8 image [h, w, num_channels], its positive ids, its caption (str or None),
    the caption's tokens int32 [context_length] or None without ``context_length``), parsing the record
    once; ``ValueError`` if corrupt (or unreadable: ``None``), or without a caption when tokens are asked for."""
    if data is None:
        raise ValueError("unreadable record (damaged shard)")
    rec = records.decode(data)
    caption, tokens = rec["caption"], None
    if context_length:
        from mlcd_jax.data.tokenizer import tokenize

        if caption is None:
            raise ValueError("record has no caption")
        tokens = tokenize([caption], context_length)[0]
    image = augment.to_channels(augment.decode_image(rec["image"], min_side), num_channels)
    return image, rec["labels"], caption, tokens


def _check_captions(source: grain.sources.RandomAccessDataSource) -> None:
    """Raises a one-line ValueError when the first readable record has no caption (the shards were made
    from a source without captions, so an image-text objective cannot train on them)."""
    for i in range(min(len(source), 16)):
        where, data = source[i]
        try:
            caption = records.decode(data)["caption"] if data is not None else None
        except ValueError:
            continue
        if caption is None:
            raise ValueError(f"{where} has no caption: the image-text objectives need shards whose records carry "
                             "captions (cluster a captioned source: folder: with .txt files, fashion_mnist, digits, emoji)")
        return


def decode_all(
    source: grain.sources.RandomAccessDataSource, top_l: int, num_channels: int, max_bytes: int,
    context_length: int = 0,
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray], dict[int, tuple[str, str]]] | None:
    """Every record of ``source`` decoded: (images uint8 [n, M, M, C], each in the top-left (h, w) of
    its square canvas, (h, w), targets ``{"labels": int32 [n, top_l]}`` plus ``"tokens"`` int32
    [n, context_length] and ``"captions"`` (object [n]) when ``context_length``, {record index: (shard
    and position, error)} of undecodable records).

    None when the images would take more than ``max_bytes`` or differ in size (then stream).
    """
    n = len(source)
    images: np.ndarray | None = None
    labels = np.zeros((n, top_l), np.int32)
    tokens = np.zeros((n, context_length), np.int32)
    captions = np.empty(n, object)
    good = np.zeros(n, bool)
    errors: dict[int, tuple[str, str]] = {}
    for i in range(n):
        where, data = source[i]
        try:
            image, record_labels, caption, record_tokens = _decode_record(
                data, num_channels, context_length=context_length)
        except ValueError as e:  # RecordError, UnsupportedRecordVersion and undecodable images
            errors[i] = (where, str(e))
            continue
        if images is None:
            side = max(image.shape[:2])
            if side * side * image.shape[2] * n > max_bytes:
                return None
            images = np.zeros((n, side, side, image.shape[2]), np.uint8)
            size = image.shape[:2]
        elif image.shape[:2] != size:
            return None
        images[i, : size[0], : size[1]] = image
        labels[i] = records.pad_labels(record_labels, top_l)
        if context_length:
            tokens[i] = record_tokens
            captions[i] = caption
        good[i] = True
    if images is None:
        return None
    targets = {"labels": labels[good], **({"tokens": tokens[good], "captions": captions[good]} if context_length else {})}
    return images[good], np.asarray(size, np.int32), targets, errors


class ToCanvas(grain.transforms.RandomMap):
    """Record bytes -> dict(image uint8 [M, M, C] canvas, size int32 [2], seed uint32 [2], labels int32 [l],
    and tokens int32 [context_length] when ``context_length``).

    Corrupt records become a skip marker. The seed comes from the example's RNG, so the on-device
    crop and flip are a function of (seed, epoch, global position) alone.
    """

    def __init__(self, top_l: int, decode_size: int, canvas_size: int, num_channels: int,
                 skip_log: SkipLog, context_length: int = 0) -> None:
        self.top_l, self.decode_size, self.canvas_size = top_l, decode_size, canvas_size
        self.num_channels, self.skip_log, self.context_length = num_channels, skip_log, context_length

    def random_map(self, element: tuple[str, bytes | None], rng: np.random.Generator) -> dict[str, Any]:
        seed = rng.integers(0, 2**32, size=2, dtype=np.uint32)
        where, data = element
        try:
            image, labels, _, tokens = _decode_record(data, self.num_channels, self.decode_size, self.context_length)
            image = augment.shrink_to_fit(image, self.canvas_size)
        except ValueError as e:  # RecordError, UnsupportedRecordVersion and undecodable images
            logging.warning("skipping a corrupt record (%s): %s", where, e)
            self.skip_log.add(where, str(e))
            return {_SKIPPED: True}
        h, w, _ = image.shape
        if (h, w) != (self.canvas_size, self.canvas_size):
            canvas = np.zeros((self.canvas_size, self.canvas_size, image.shape[2]), np.uint8)
            canvas[:h, :w] = image
            image = canvas
        out = {"image": image, "size": np.array([h, w], np.int32), "seed": seed,
               "labels": records.pad_labels(labels, self.top_l)}
        if tokens is not None:
            out["tokens"] = tokens
        return out


class DropSkipped(grain.transforms.Filter):
    def filter(self, element: dict[str, Any]) -> bool:
        return _SKIPPED not in element


class TrainLoader(grain.DataLoader):
    """A grain DataLoader that also reports the corrupt records its transforms skipped.

    Its batches are canvases: pass them through :meth:`augment` (jit-able) for model inputs.
    """

    skip_log: SkipLog
    decoded: DecodedBatches | None  # the in-memory dataset, when it was decoded once
    elements_per_batch: int  # sampler elements per local batch (examples when streamed, 1 in memory)
    image_size: int
    augment_images: bool
    crop_scale: tuple[float, float]
    num_channels: int

    @property
    def skipped_records(self) -> int:
        """How many corrupt records were skipped so far (all worker processes)."""
        return len(self.skip_log.entries())

    def skipped(self) -> list[tuple[str, str]]:
        """(record description, reason) of each skipped record."""
        return self.skip_log.entries()

    def __iter__(self) -> PortableIterator:
        return PortableIterator(super().__iter__(), self.elements_per_batch)



    def augment(self, batch: dict[str, Any]) -> dict[str, Any]:
        """A canvas batch (numpy or sharded jax arrays) -> ``dict(image=float32 [b, S, S, C], labels)``."""
        return canvas_to_inputs(batch, image_size=self.image_size, augment=self.augment_images,
                                crop_scale=self.crop_scale, num_channels=self.num_channels)


def canvas_to_inputs(
    batch: dict[str, Any], *, image_size: int, augment: bool = True,
    crop_scale: tuple[float, float] = (0.08, 1.0), num_channels: int = 3,
) -> dict[str, Any]:
    """The train step's preprocessing (jit-able): canvas batch -> ``dict(image=float32 [b, S, S, C], labels)``
    (and the batch's ``tokens`` and ``episode_pos`` when it has them)."""
    image = augment_batch(
        batch["image"], batch["size"], batch["seed"], image_size=image_size,
        augment=augment, crop_scale=tuple(crop_scale), num_channels=num_channels,
    )
    return {"image": image, **{k: batch[k] for k in ("labels", "tokens", "episode_pos") if k in batch}}


def make_train_loader(
    shard_paths_or_glob: str | Sequence[str],
    *,
    global_batch_size: int,
    image_size: int,
    top_l: int,
    seed: int,
    augment: bool = True,
    num_workers: int = 0,
    worker_buffer_size: int = 2,
    shard_options: grain.sharding.ShardOptions | None = None,
    num_epochs: int | None = None,
    num_channels: int = 3,
    crop_scale: tuple[float, float] = (0.08, 1.0),
    skip_log_dir: str | None = None,
    in_memory_bytes: int = 2**30,
    decode_size: int | None = None,
    canvas_size: int | None = None,
    read_threads: int = 4,
    context_length: int = 0,
    episode_size: int = 0,
) -> TrainLoader:
    """Loader whose iterator yields canvas batches ``dict(image=uint8 [b, M, M, C], size=int32 [b, 2],
    seed=uint32 [b, 2], labels=int32 [b, top_l])``; ``loader.augment(batch)`` makes the model inputs
    float32 [b, image_size, image_size, num_channels].

    ``b = global_batch_size / process_count`` (process count and index from ``shard_options``, default
    ``ShardByJaxProcess``). ``num_epochs=None`` repeats forever; each epoch drops its last partial
    global batch. ``num_workers`` > 0 decodes in that many processes (``worker_buffer_size`` batches
    prefetched each). ``skip_log_dir`` keeps the corrupt-record log (default: a temp dir removed with
    the loader). ``in_memory_bytes``: decode the whole dataset once when it fits (0 = never).
    ``decode_size``: JPEG draft target for the shorter side (default ``image_size``; 0 = full size).
    ``canvas_size``: M for streamed images (default ``2 * image_size``); in memory, the images' size.
    ``read_threads``: threads reading (and decoding) streamed records ahead, per process.
    ``context_length`` > 0: batches also carry ``tokens`` int32 [b, context_length], each record's caption
    tokenised with CLIP's BPE (``mlcd_jax.data.tokenizer``); a record without a caption is skipped.
    ``episode_size`` > 0: ProtoCLIP's episodes (see :class:`DecodedBatches`); the dataset must be decoded
    in memory; ``loader.decoded`` gives an episode's records and their images and tokens for its feature pass.
    """
    if num_channels not in (1, 3):
        raise ValueError(f"num_channels={num_channels}: choose 1 or 3")
    if num_workers and not flags.FLAGS.is_parsed():
        # grain's worker processes read its absl flags; outside an absl app (notebooks, tests) nothing
        # parsed them, so take the defaults.
        flags.FLAGS.mark_as_parsed()
    paths, _ = resolve_shards(shard_paths_or_glob)
    source = ShardSource(paths)
    if context_length:
        _check_captions(source)
    shard_options = shard_options or grain.sharding.ShardByJaxProcess(drop_remainder=True)
    count = shard_options.shard_count
    if global_batch_size % count:
        raise ValueError(f"global_batch_size={global_batch_size} does not split over {count} processes")
    if skip_log_dir is None:
        skip_log_dir = tempfile.mkdtemp(prefix="mlcd_skipped_")
        owned = True
    else:
        owned = False
    skip_log = SkipLog(skip_log_dir)
    decoded = decode_all(source, top_l, num_channels, in_memory_bytes, context_length) if in_memory_bytes else None
    if episode_size and decoded is None:
        raise ValueError(f"episodes (ProtoCLIP) need the dataset decoded in memory: one image size and at most "
                         f"in_memory_bytes={in_memory_bytes} decoded")
    if episode_size % global_batch_size:
        raise ValueError(f"episode_size={episode_size} is not a multiple of global_batch_size={global_batch_size}")
    if decoded is not None:
        images, size, targets, errors = decoded
        for where, why in errors.values():  # dropped before the order is drawn: all processes agree
            logging.warning("skipping a corrupt record (%s): %s", where, why)
            skip_log.add(where, why)
        batches = DecodedBatches(
            images, size, targets, global_batch_size=global_batch_size, seed=seed,
            process_index=shard_options.shard_index, process_count=count, num_epochs=num_epochs,
            episode_size=episode_size,
        )
        loader = TrainLoader(
            data_source=batches,
            sampler=grain.samplers.SequentialSampler(len(batches), grain.sharding.NoSharding()),
            worker_count=num_workers,
            worker_buffer_size=worker_buffer_size,
            read_options=grain.ReadOptions(num_threads=0, prefetch_buffer_size=1),
        )
    else:
        sampler = GlobalOrderSampler(len(source), global_batch_size, seed, count, num_epochs, num_workers)
        loader = TrainLoader(
            data_source=source,
            sampler=sampler,
            operations=[
                ToCanvas(top_l, image_size if decode_size is None else decode_size,
                         canvas_size or 2 * image_size, num_channels, skip_log, context_length),
                DropSkipped(),
                grain.transforms.Batch(global_batch_size // count, drop_remainder=True),
            ],
            worker_count=num_workers,
            worker_buffer_size=worker_buffer_size,
            shard_options=shard_options,
            # grain's default read-ahead (16 threads, 500 elements) scans its whole buffer for every
            # element (~3 ms each here); one batch ahead is enough.
            read_options=grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=global_batch_size // count),
        )
    loader.skip_log, loader.image_size, loader.augment_images = skip_log, image_size, augment
    loader.decoded = batches if decoded is not None else None
    loader.elements_per_batch = 1 if decoded is not None else global_batch_size // count
    loader.crop_scale, loader.num_channels = tuple(crop_scale), num_channels
    if owned:
        weakref.finalize(loader, shutil.rmtree, skip_log_dir, True)
    return loader


def eval_pixels(images: np.ndarray, image_size: int, num_channels: int = 3) -> np.ndarray:
    """uint8 [N, H, W, C] -> uint8 [N, S, S, num_channels]: shorter side resized (bicubic), centre crop.
    A batch already of that shape passes through untouched (no per-image work)."""
    images = np.asarray(images, np.uint8)
    if images.ndim == 3:
        images = images[..., None]
    if images.shape[1:] == (image_size, image_size, num_channels):
        return images
    out = np.empty((len(images), image_size, image_size, num_channels), np.uint8)
    for i, image in enumerate(images):
        out[i] = augment.resize_center_crop(augment.to_channels(image, num_channels), image_size)
    return out


def preprocess_eval(images: np.ndarray, image_size: int, num_channels: int = 3) -> np.ndarray:
    """uint8 [N, H, W, C] -> float32 [N, S, S, num_channels]: :func:`eval_pixels`, then CLIP-normalised."""
    return augment.normalize(eval_pixels(images, image_size, num_channels))