"""grain input pipelines: MLCD record shards -> host-local training batches; arrays -> eval inputs.

Training: ``ArrayRecordDataSource`` over the shards -> ``GlobalOrderSampler`` (the seeded global order
of ``mlcd_jax.data.order``, cut by JAX process) -> decode -> random resized crop + flip (or resize +
centre crop) -> CLIP normalisation -> batch of ``global_batch_size / process_count``. Because the order
and the per-example augmentation seeds are functions of the *global* position, a run on N processes
sees the batches of a 1-process run, and the iterator state (``get_state`` / ``set_state``, saved by
the trainer's checkpoints) restores the exact next batches.

Corrupt records (undecodable record or image) are dropped, logged, and counted: every skip is appended
to a per-loader log that all worker processes share, read with ``TrainLoader.skipped_records`` (a
count) or ``TrainLoader.skipped()`` (record ids and reasons). A dropped record is replaced by the next
one of the same process, so only a run with corrupt records departs from the process-count-invariant
order. Records whose positives are fewer than ``top_l`` are padded with label -1.
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
import sys
import tempfile
import weakref
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import grain
import numpy as np
from absl import flags

from mlcd_jax import fileio
from mlcd_jax.data import augment, order, records
from mlcd_jax.data.augment import CLIP_MEAN, CLIP_STD

__all__ = [
    "CLIP_MEAN", "CLIP_STD", "GlobalOrderSampler", "TrainLoader", "make_train_loader", "preprocess_eval",
    "resolve_shards",
]

_SKIPPED = "skipped"


def resolve_shards(spec: str | Sequence[str]) -> tuple[list[str], dict[str, Any]]:
    """(shard paths, manifest or {}) for a clustering output dir, a glob, or a list of paths."""
    if not isinstance(spec, str):
        paths, manifest = list(spec), {}
    elif os.path.exists(os.path.join(spec, "manifest.json")):
        manifest = fileio.load_json(os.path.join(spec, "manifest.json"))
        paths = [os.path.join(spec, s["path"]) for s in manifest["shards"] if s["num_records"]]
    else:
        paths, manifest = sorted(glob.glob(spec)), {}
    if not paths:
        raise FileNotFoundError(f"no record shards at {spec!r}: give a clustering output dir or a glob of shards")
    return paths, manifest


class GlobalOrderSampler:
    """grain sampler that walks ``order.epoch_permutation`` in global batches, split by process.

    grain's DataLoader asks for sampler index ``j = i * process_count + process_index`` for this
    process's ``i``-th local index, and with W worker processes worker ``w`` takes local indices
    ``w, w + W, ...`` and batches them itself, batches coming out round-robin over workers. So local
    index ``i`` is mapped to this process's element ``e`` such that worker ``w`` builds exactly batches
    ``w, w + W, ...``: the batches are the same with or without workers. Element ``e`` sits at global
    position ``order.global_position(e, ...)``, and its RNG is seeded by (seed, epoch, global position),
    independent of process and worker counts.
    """

    def __init__(
        self, num_records: int, global_batch_size: int, seed: int, process_count: int,
        num_epochs: int | None, worker_count: int = 0,
    ) -> None:
        self.num_records, self.global_batch_size, self.seed = num_records, global_batch_size, seed
        self.process_count, self.num_epochs, self.worker_count = process_count, num_epochs, worker_count
        self.local_batch = global_batch_size // process_count
        steps = order.steps_per_epoch(num_records, global_batch_size)
        self.per_epoch = steps * global_batch_size
        if num_epochs is not None and worker_count > 1 and (num_epochs * steps) % worker_count:
            raise ValueError(
                f"{num_epochs} epochs of {steps} batches do not split over {worker_count} workers: "
                "use num_epochs=None (repeat) or a worker count that divides the number of batches"
            )

    def __len__(self) -> int:
        return sys.maxsize if self.num_epochs is None else self.num_epochs * self.per_epoch

    @lru_cache(maxsize=2)
    def _permutation(self, epoch: int) -> np.ndarray:
        return order.epoch_permutation(self.num_records, self.seed, epoch)

    def element(self, local_index: int) -> int:
        """This process's element (in batch order) that its ``local_index``-th sampler call serves."""
        workers, b = max(self.worker_count, 1), self.local_batch
        k, w = divmod(local_index, workers)  # k-th element of worker w
        return ((k // b) * workers + w) * b + k % b

    def __getitem__(self, index: int) -> grain.RecordMetadata:
        if index < 0 or index >= len(self):
            raise IndexError(f"sampler index {index} out of range [0, {len(self)})")
        local_index, process = divmod(index, self.process_count)
        epoch, position = order.global_position(
            self.element(local_index), num_records=self.num_records, global_batch=self.global_batch_size,
            process_index=process, process_count=self.process_count,
        )
        rng = np.random.default_rng([self.seed, epoch, position])
        return grain.RecordMetadata(index=index, record_key=int(self._permutation(epoch)[position]), rng=rng)

    def __repr__(self) -> str:
        return (f"GlobalOrderSampler(num_records={self.num_records}, global_batch_size={self.global_batch_size}, "
                f"seed={self.seed}, process_count={self.process_count}, num_epochs={self.num_epochs}, "
                f"worker_count={self.worker_count})")


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


def _normalize(image: np.ndarray) -> np.ndarray:
    if image.shape[2] == 3:
        return augment.normalize(image)
    return (image.astype(np.float32) / 255.0 - CLIP_MEAN.mean()) / CLIP_STD.mean()


class DecodeAndAugment(grain.transforms.RandomMap):
    """Record bytes -> dict(image float32 [S, S, C], labels int32 [top_l]); corrupt -> a skip marker."""

    def __init__(
        self, image_size: int, top_l: int, augment: bool, num_channels: int,
        crop_scale: tuple[float, float], skip_log: SkipLog,
    ) -> None:
        self.image_size, self.top_l, self.augment = image_size, top_l, augment
        self.num_channels, self.crop_scale, self.skip_log = num_channels, crop_scale, skip_log

    def random_map(self, element: bytes, rng: np.random.Generator) -> dict[str, Any]:
        try:
            rec = records.decode(element)
            image = augment.to_channels(augment.decode_image(rec["image"]), self.num_channels)
        except ValueError as e:  # RecordError, UnsupportedRecordVersion and undecodable images
            logging.warning("skipping a corrupt record: %s", e)
            self.skip_log.add(f"record of {len(element)} bytes", str(e))
            return {_SKIPPED: True}
        if self.augment:
            image = augment.random_resized_crop(image, self.image_size, rng, scale=self.crop_scale)
            if rng.random() < 0.5:
                image = image[:, ::-1]
        else:
            image = augment.resize_center_crop(image, self.image_size)
        labels, _ = records.pad_positives(rec["labels"], rec["scores"], self.top_l)
        return {"image": _normalize(image), "labels": labels}


class DropSkipped(grain.transforms.Filter):
    def filter(self, element: dict[str, Any]) -> bool:
        return _SKIPPED not in element


class TrainLoader(grain.DataLoader):
    """A grain DataLoader that also reports the corrupt records its transforms skipped."""

    skip_log: SkipLog

    @property
    def skipped_records(self) -> int:
        """How many corrupt records were skipped so far (all worker processes)."""
        return len(self.skip_log.entries())

    def skipped(self) -> list[tuple[str, str]]:
        """(record description, reason) of each skipped record."""
        return self.skip_log.entries()


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
) -> TrainLoader:
    """Loader whose iterator yields ``dict(image=float32 [b, S, S, C], labels=int32 [b, top_l])``.

    ``b = global_batch_size / process_count`` (process count and index from ``shard_options``, default
    ``ShardByJaxProcess``). ``num_epochs=None`` repeats forever; each epoch drops its last partial
    global batch. ``num_workers`` > 0 decodes in that many processes (``worker_buffer_size`` batches
    prefetched each). ``skip_log_dir`` keeps the corrupt-record log (default: a temp dir removed with
    the loader).
    """
    if num_channels not in (1, 3):
        raise ValueError(f"num_channels={num_channels}: choose 1 or 3")
    if num_workers and not flags.FLAGS.is_parsed():
        # grain's worker processes read its absl flags; outside an absl app (notebooks, tests) nothing
        # parsed them, so take the defaults.
        flags.FLAGS.mark_as_parsed()
    paths, _ = resolve_shards(shard_paths_or_glob)
    source = grain.sources.ArrayRecordDataSource(paths)
    shard_options = shard_options or grain.sharding.ShardByJaxProcess(drop_remainder=True)
    count = shard_options.shard_count
    if global_batch_size % count:
        raise ValueError(f"global_batch_size={global_batch_size} does not split over {count} processes")
    sampler = GlobalOrderSampler(len(source), global_batch_size, seed, count, num_epochs, num_workers)
    if skip_log_dir is None:
        skip_log_dir = tempfile.mkdtemp(prefix="mlcd_skipped_")
        owned = True
    else:
        owned = False
    skip_log = SkipLog(skip_log_dir)
    loader = TrainLoader(
        data_source=source,
        sampler=sampler,
        operations=[
            DecodeAndAugment(image_size, top_l, augment, num_channels, tuple(crop_scale), skip_log),
            DropSkipped(),
            grain.transforms.Batch(global_batch_size // count, drop_remainder=True),
        ],
        worker_count=num_workers,
        worker_buffer_size=worker_buffer_size,
        shard_options=shard_options,
    )
    loader.skip_log = skip_log
    if owned:
        weakref.finalize(loader, shutil.rmtree, skip_log_dir, True)
    return loader


def preprocess_eval(images: np.ndarray, image_size: int, num_channels: int = 3) -> np.ndarray:
    """uint8 [N, H, W, C] -> float32 [N, S, S, num_channels]: resize shorter side, centre crop, normalise."""
    images = np.asarray(images, np.uint8)
    if images.ndim == 3:
        images = images[..., None]
    out = np.empty((len(images), image_size, image_size, num_channels), np.float32)
    for i, image in enumerate(images):
        out[i] = _normalize(augment.resize_center_crop(augment.to_channels(image, num_channels), image_size))
    return out
