"""Which record each process reads at each step: a global, seeded order split by process.

The global batch of step t is the same whatever the number of processes: one seeded bijection per
epoch from global positions to records (:class:`EpochOrder`), cut into global batches, each global
batch cut into ``process_count`` contiguous slices. So a 2-process run sees exactly the batches of a
1-process run (its losses match), every record is read once per epoch by exactly one process, and the
``drop-remainder`` tail of an epoch (fewer than a global batch) is the only thing left out. The order
is computed per position in O(1) memory, never materialised (an N-record permutation is 8N bytes).
"""

from __future__ import annotations

import math

import numpy as np

_MASK64 = (1 << 64) - 1
_ROUNDS = 6


def _mix(value: int | np.ndarray, key: int) -> int | np.ndarray:
    """splitmix64 finaliser of ``value ^ key``, for Python ints and uint64 arrays alike."""
    z = ((value ^ key) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 31)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 32)


class EpochOrder:
    """The seeded order of ``num_records`` records in ``epoch``: a bijection position -> record.

    A Feistel cipher on the grid ``rows x cols`` (cols = ceil(sqrt(num_records)), rows * cols the
    first multiple of cols >= num_records), position = row * cols + col, whose rounds alternately add
    a keyed hash of one coordinate to the other modulo its size (each round is a bijection), then
    cycle-walking (re-encrypt while the value is >= num_records) to make it a permutation of
    [0, num_records). The grid has fewer than cols surplus cells, so for large datasets one pass almost
    always suffices. Round keys hash (seed, epoch, round). O(1) memory; :meth:`records` does a whole
    batch of positions in a few dozen numpy operations.
    """

    def __init__(self, num_records: int, seed: int, epoch: int) -> None:
        if num_records < 1:
            raise ValueError(f"num_records={num_records}: an order needs at least one record")
        self.num_records = num_records
        self._cols = math.isqrt(num_records - 1) + 1
        self._rows = -(-num_records // self._cols)
        base = _mix(_mix(seed & _MASK64, 0x9E3779B97F4A7C15) ^ (epoch & _MASK64), 0xD1B54A32D192ED03)
        self._keys = [_mix(base, r) for r in range(_ROUNDS)]

    def _encrypt(self, x: int | np.ndarray) -> int | np.ndarray:
        """One pass of the cipher over [0, rows * cols), for a Python int or a uint64 array."""
        row, col = x // self._cols, x % self._cols
        for r, key in enumerate(self._keys):
            if r % 2:
                col = (col + _mix(row, key) % self._cols) % self._cols
            else:
                row = (row + _mix(col, key) % self._rows) % self._rows
        return row * self._cols + col

    def record(self, position: int) -> int:
        """The record at global ``position`` (0 <= position < num_records) of the epoch."""
        if not 0 <= position < self.num_records:
            raise IndexError(f"position {position} out of range [0, {self.num_records})")
        x = self._encrypt(position)
        while x >= self.num_records:
            x = self._encrypt(x)
        return x

    def records(self, positions: np.ndarray) -> np.ndarray:
        """int64 records at an array of global ``positions`` (vectorised :meth:`record`)."""
        positions = np.asarray(positions)
        if positions.size and (positions.min() < 0 or positions.max() >= self.num_records):
            raise IndexError(f"positions out of range [0, {self.num_records})")
        out = self._encrypt(positions.astype(np.uint64))
        walk = np.flatnonzero(out >= self.num_records)
        while walk.size:
            again = self._encrypt(out[walk])
            out[walk] = again
            walk = walk[again >= self.num_records]
        return out.astype(np.int64)


def steps_per_epoch(num_records: int, global_batch: int) -> int:
    """Full global batches in one epoch; raises when the dataset is smaller than one batch."""
    if num_records < global_batch:
        raise ValueError(
            f"the dataset has {num_records} records, fewer than one global batch of {global_batch}"
        )
    return num_records // global_batch


def global_position(
    element: int, *, num_records: int, global_batch: int, process_index: int, process_count: int
) -> tuple[int, int]:
    """(epoch, position in the global stream) of this process's ``element``-th example.

    Seeds per-example randomness (augmentation) by global position, so it too is independent of the
    process count.
    """
    local = global_batch // process_count
    steps = steps_per_epoch(num_records, global_batch)
    per_epoch = steps * local
    epoch, within = divmod(element, per_epoch)
    step, offset = divmod(within, local)
    return epoch, step * global_batch + process_index * local + offset


def example_seeds(seed: int, epoch: int, positions: np.ndarray) -> np.ndarray:
    """uint32 [n, 2] random seeds of the examples at global ``positions`` of ``epoch`` (a splitmix64
    hash of (seed, epoch, position)): per-example randomness that no batch, process or worker layout
    can change, computed for a whole batch at once."""
    with np.errstate(over="ignore"):
        x = (np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)) ^ (np.uint64(epoch) * np.uint64(0xD1B54A32D192ED03))
        x = x + np.asarray(positions, np.uint64) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return np.ascontiguousarray(x).view(np.uint32).reshape(-1, 2)


def sample_episode(num_pairs: int, episode_size: int, seed: int, episode: int) -> np.ndarray:
    """The pair indices [episode_size] int64 of ``episode``, drawn with replacement from ``[0, num_pairs)``.

    A pure function of ``(seed, episode)`` (NumPy's generator seeded with both), so a resumed run
    replays the same episodes and every process agrees without communicating.
    """
    if num_pairs < 1 or episode_size < 1:
        raise ValueError(f"need num_pairs >= 1 and episode_size >= 1; got {num_pairs} and {episode_size}")
    if seed < 0 or episode < 0:
        raise ValueError(f"seed and episode must be >= 0; got {seed} and {episode}")
    rng = np.random.default_rng([seed, episode])
    return rng.integers(0, num_pairs, size=episode_size, dtype=np.int64)
