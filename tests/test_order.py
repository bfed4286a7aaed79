"""The seeded per-epoch order (``order.EpochOrder``): a permutation of the records computed per
position in O(1) memory, and the sampler that splits it over processes."""

import tracemalloc

import numpy as np
import pytest

from mlcd_jax.data.order import EpochOrder
from mlcd_jax.data.sampling import GlobalOrderSampler


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 600, 1000, 1025, 4099])
def test_order_is_a_permutation_and_scalar_matches_vectorised(n):
    for seed, epoch in [(0, 0), (3, 1), (2**40 + 7, 12)]:
        order = EpochOrder(n, seed, epoch)
        records = order.records(np.arange(n))
        np.testing.assert_array_equal(np.sort(records), np.arange(n))
        assert [order.record(p) for p in range(n)] == records.tolist()


def test_positions_out_of_range_raise():
    order = EpochOrder(10, 0, 0)
    with pytest.raises(IndexError):
        order.record(10)
    with pytest.raises(IndexError):
        order.records(np.array([0, -1]))
    with pytest.raises(ValueError):
        EpochOrder(0, 0, 0)


def test_seed_and_epoch_change_the_order():
    orders = [EpochOrder(1000, seed, epoch).records(np.arange(1000)) for seed, epoch in [(0, 0), (0, 1), (1, 0)]]
    for i in range(3):
        for j in range(i):
            assert np.mean(orders[i] == orders[j]) < 0.01


def test_order_looks_random():
    n = 100_003
    records = EpochOrder(n, 5, 2).records(np.arange(n))
    positions = np.arange(n)
    assert np.sum(records == positions) <= 10  # a random permutation has ~1 fixed point
    assert len(np.unique(records - positions)) > n // 2  # no shift or stride pattern
    assert abs(np.corrcoef(records[:-1], records[1:])[0, 1]) < 0.02  # neighbours decorrelated
    assert abs(np.corrcoef(records, positions)[0, 1]) < 0.02
    jumps = np.abs(np.diff(records))
    assert abs(np.mean(jumps) / n - 1 / 3) < 0.01  # E|U - V| = n / 3 for independent uniforms
    first_batch = records[:10_000]  # the first positions draw from every part of the dataset
    counts = np.bincount(first_batch * 10 // n, minlength=10)
    assert counts.min() > 850 and counts.max() < 1150


def test_memory_does_not_grow_with_the_number_of_records():
    tracemalloc.start()
    try:
        order = EpochOrder(400_000_000, 0, 3)
        positions = np.linspace(0, 400_000_000 - 1, 1000).astype(np.int64)
        records = order.records(positions)
        assert [order.record(int(p)) for p in positions[:100]] == records[:100].tolist()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 50 * 2**20
    assert len(np.unique(records)) == 1000 and records.min() >= 0 and records.max() < 400_000_000


def _process_epoch(sampler: GlobalOrderSampler, process: int, steps: int) -> np.ndarray:
    """Record keys [steps, local batch] the sampler serves ``process`` in epoch 0 (no workers)."""
    local = sampler.local_batch
    keys = [sampler[i * sampler.process_count + process].record_key for i in range(steps * local)]
    return np.asarray(keys).reshape(steps, local)


def test_sampler_process_slices_partition_the_global_batches():
    """Each process's slices of the global batches partition one epoch, and concatenated they are
    the global batches of a single-process run."""
    num_records, global_batch, processes = 1000, 40, 4
    steps = num_records // global_batch
    sampler = GlobalOrderSampler(num_records, global_batch, seed=3, process_count=processes, num_epochs=1)
    slices = [_process_epoch(sampler, p, steps) for p in range(processes)]
    flat = np.concatenate([s.reshape(-1) for s in slices])
    assert len(flat) == steps * global_batch
    assert len(np.unique(flat)) == len(flat), "no record twice in an epoch"
    single = _process_epoch(GlobalOrderSampler(num_records, global_batch, 3, 1, 1), 0, steps)
    np.testing.assert_array_equal(np.concatenate(slices, axis=1), single)
