"""Which record each process reads at each step: a global, seeded order split by process.

The global batch of step t is the same whatever the number of processes: one seeded permutation per
epoch over all records, cut into global batches, each global batch cut into ``process_count``
contiguous slices. So a 2-process run sees exactly the batches of a 1-process run (its losses match),
every record is read once per epoch by exactly one process, and the ``drop-remainder`` tail of an
epoch (fewer than a global batch) is the only thing left out.
"""

from __future__ import annotations

import numpy as np


def epoch_permutation(num_records: int, seed: int, epoch: int) -> np.ndarray:
    """The seeded order of all records in ``epoch`` (independent of process count)."""
    return np.random.default_rng([seed, epoch]).permutation(num_records)


def steps_per_epoch(num_records: int, global_batch: int) -> int:
    """Full global batches in one epoch; raises when the dataset is smaller than one batch."""
    if num_records < global_batch:
        raise ValueError(
            f"the dataset has {num_records} records, fewer than one global batch of {global_batch}"
        )
    return num_records // global_batch


def process_batch_indices(
    num_records: int, global_batch: int, *, process_index: int, process_count: int, seed: int, epoch: int
) -> np.ndarray:
    """Record indices [steps_per_epoch, global_batch / process_count] this process reads in ``epoch``."""
    if global_batch % process_count:
        raise ValueError(f"global batch {global_batch} does not split over {process_count} processes")
    steps = steps_per_epoch(num_records, global_batch)
    local = global_batch // process_count
    order = epoch_permutation(num_records, seed, epoch)[: steps * global_batch]
    return order.reshape(steps, process_count, local)[:, process_index]


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
