"""Which records each batch serves, for grain: the seeded global order of :mod:`mlcd_jax.data.order` as a
sampler of streamed records (:class:`GlobalOrderSampler`) or as whole batches of a dataset decoded in
memory (:class:`DecodedBatches`, ProtoCLIP's episodes included), and the loader's iterator whose state
resumes under another worker count (:class:`PortableIterator`). Used by :mod:`mlcd_jax.data.pipeline`."""

from __future__ import annotations

import json
import re
import sys
from functools import lru_cache
from typing import Any

import grain
import numpy as np

from mlcd_jax.config_lib import ResumeMismatch
from mlcd_jax.data import order


class GlobalOrderSampler:
    """grain sampler that walks the seeded order (``order.EpochOrder``) in global batches, split by process.

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
    def _order(self, epoch: int) -> order.EpochOrder:
        return order.EpochOrder(self.num_records, self.seed, epoch)

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
        return grain.RecordMetadata(index=index, record_key=self._order(epoch).record(position), rng=rng)

    def __repr__(self) -> str:
        return (f"GlobalOrderSampler(num_records={self.num_records}, global_batch_size={self.global_batch_size}, "
                f"seed={self.seed}, process_count={self.process_count}, num_epochs={self.num_epochs}, "
                f"worker_count={self.worker_count})")


class DecodedBatches(grain.sources.RandomAccessDataSource):
    """A small dataset decoded once into memory, served a whole local batch per element.

    Element ``j`` is this process's slice of global batch ``j`` of the seeded global order
    (``mlcd_jax.data.order``, over the decodable records), with per-example seeds from
    ``order.example_seeds``: one array gather per batch instead of a Python call per image.

    With ``episode_size`` (ProtoCLIP), the batches instead walk episodes: episode ``e`` is
    ``order.sample_episode`` (pairs drawn with replacement, a function of (seed, e)) cut into
    ``episode_size / global_batch_size`` global batches, and each example also carries its
    ``episode_pos`` (its index within the episode, where the trainer finds its cluster labels).
    """

    def __init__(
        self, images: np.ndarray, size: np.ndarray, targets: dict[str, np.ndarray], *, global_batch_size: int,
        seed: int, process_index: int, process_count: int, num_epochs: int | None, episode_size: int = 0,
    ) -> None:
        self.images, self.size, self.targets = images, size, dict(targets)
        self.captions = self.targets.pop("captions", None)
        self.global_batch, self.seed, self.num_epochs = global_batch_size, seed, num_epochs
        self.process_index, self.local_batch = process_index, global_batch_size // process_count
        self.episode_size = episode_size
        self.steps = (episode_size // global_batch_size if episode_size
                      else order.steps_per_epoch(len(images), global_batch_size))

    def __len__(self) -> int:
        return sys.maxsize if self.num_epochs is None else self.num_epochs * self.steps

    @lru_cache(maxsize=2)
    def _order(self, epoch: int) -> order.EpochOrder:
        return order.EpochOrder(len(self.images), self.seed, epoch)

    @lru_cache(maxsize=2)
    def episode_rows(self, episode: int) -> np.ndarray:
        """The records of ``episode`` (int64 [episode_size]), in the order its batches serve them."""
        return order.sample_episode(len(self.images), self.episode_size, self.seed, episode)

    def gather(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Canvases, sizes and tokens of ``rows`` (ProtoCLIP's episode feature pass, a batch at a time)."""
        return {"image": self.images[rows], "size": np.broadcast_to(self.size, (len(rows), 2)).copy(),
                "tokens": self.targets["tokens"][rows]}

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        epoch, step = divmod(index, self.steps)  # an episode when episode_size is set
        start = step * self.global_batch + self.process_index * self.local_batch
        positions = np.arange(start, start + self.local_batch)
        rows = self.episode_rows(epoch)[positions] if self.episode_size else self._order(epoch).records(positions)
        batch = {
            "image": self.images[rows],
            "size": np.broadcast_to(self.size, (self.local_batch, 2)).copy(),
            "seed": order.example_seeds(self.seed, epoch, positions),
            **{name: values[rows] for name, values in self.targets.items()},
        }
        if self.episode_size:
            batch["episode_pos"] = positions.astype(np.int32)
        return batch

    def __repr__(self) -> str:
        return (f"DecodedBatches(num_records={len(self.images)}, image={self.images.shape[1:]}, "
                f"global_batch_size={self.global_batch}, seed={self.seed}, num_epochs={self.num_epochs})")


_WORKER_COUNT_RE = re.compile(r",? ?worker_count=\d+")


class PortableIterator:
    """grain's DataLoader iterator whose saved state resumes under another ``num_workers``.

    grain refuses a state saved with another worker count, although :class:`GlobalOrderSampler` makes
    the batches the same for any count. The state records, per worker ``w`` of ``W``, the last sampler
    index it read (``w``, ``w + W``, ... in turn; ``w - W`` before its first): from it follows the
    number of batches served, and from that the state of ``W'`` workers that have served as many.
    The data source and sampler (worker count aside) must still match: :class:`ResumeMismatch` says
    which differs.
    """

    def __init__(self, inner: Any, elements_per_batch: int) -> None:
        self._inner, self._per_batch = inner, elements_per_batch

    def __next__(self) -> Any:
        return next(self._inner)

    def __iter__(self) -> PortableIterator:
        return self

    def get_state(self) -> bytes:
        return self._inner.get_state()

    def start_prefetch(self) -> None:
        self._inner.start_prefetch()

    def set_state(self, state: bytes) -> None:
        saved, here = json.loads(state), json.loads(self._inner.get_state())
        for key, what in (("data_source", "data"), ("sampler", "data order")):
            if _WORKER_COUNT_RE.sub("", saved[key]) != _WORKER_COUNT_RE.sub("", here[key]):
                raise ResumeMismatch(f"the checkpoint's {what}: {saved[key]}; this run's: {here[key]} "
                                     "(resume with the run's shards and settings, or use a new workdir)")
        if saved["worker_count"] != here["worker_count"]:
            saved = {**saved, **self._layout(self._batches_served(saved), here["worker_count"]),
                     "worker_count": here["worker_count"], "sampler": here["sampler"]}
        self._inner.set_state(json.dumps(saved).encode())

    def _batches_served(self, state: dict[str, Any]) -> int:
        workers = max(state["worker_count"], 1)
        read = sum((last - int(w)) // workers + 1 for w, last in state["last_seen_indices"].items())
        return read // self._per_batch

    def _layout(self, batches: int, worker_count: int) -> dict[str, Any]:
        """``last_seen_indices`` / ``last_worker_index`` of ``worker_count`` workers after ``batches``."""
        workers = max(worker_count, 1)
        last_seen = {}
        for w in range(workers):
            served = max(0, -(-(batches - w) // workers))  # batches w, w + W, ... below ``batches``
            last_seen[str(w)] = w + (served * self._per_batch - 1) * workers
        last_worker = (batches - 1) % workers if worker_count and batches else -1
        return {"last_seen_indices": last_seen, "last_worker_index": last_worker}
