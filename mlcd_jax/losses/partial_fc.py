"""The sharded prototype head: sampled negatives (the paper's or PartialFC's) and the MLCD/MLC/softmax losses.

The prototype matrix W [k, d] is row-sharded over the mesh axes of the ``proto`` sharding rule (by default
all devices, in mesh order), so shard n of N owns rows ``[n·k/N, (n+1)·k/N)``. In one step every device

1. gathers the global batch of embeddings and labels (all-gather over the batch axes; cheap, B x d);
2. keeps every row of its range that is a positive of some sample in the global batch, plus uniformly
   sampled negatives: ``sampling="paper"`` (the MLCD paper's |N'| = r·|N|) draws ``ceil(r · negatives)``
   of the shard's real non-positive rows; ``sampling="partial_fc"`` (PartialFC) fills up to
   ``ceil(r · k/N)`` rows, positives included (all positives are kept if they exceed that, so once B·l
   approaches r·k the positives fill the budget and r stops mattering);
3. computes cosines only against those rows ([B, S], S ≪ k) and the per-row partial log-sum-exps;
4. joins the partials with ``pmax`` / ``psum``. Nothing of size B x k exists on any device.

Only sampled rows receive gradient; the optimizer still holds state for all k rows (and by default,
``loss.proto_update=dense``, updates all of them).

Static shapes: a device gathers ``capacity`` rows, room for the positives it may meet plus the
negatives: ``P + ceil(r·(k/N − P))`` (paper) or ``min(k/N, max(ceil(r·k/N), P))`` (partial_fc), where P
is the shard's positive budget. By default (``positive_budget=None``) P = min(B·l, k/N), every positive a
batch could bring, so at the paper's batch (B·l = 262,144 against k/N = 15,625 rows on 64 chips) every
shard scores all its rows. :func:`positive_budget` sizes P from the labels a batch actually carries:
B·l labels spread over k classes hit (k/N)·(1 − e^(−B·l/k)) distinct rows of a shard on average (23 % of
them at the paper's B = 32,768, l = 8, k = 1M), plus four standard deviations of that count and 8 rows
of slack. A batch whose positives overflow a shard's budget would lose the excess: the trainer checks
each batch first (:func:`most_positives`) and runs such a batch through the step compiled with
``positive_budget=None`` instead, so the loss is always exact. Rows past a step's count (positives +
sampled negatives, resp. ``max(ceil(r·k/N), #positives)``) are masked out.

The row choice is also its own step (:func:`select_rows`, the same draw): with ``loss.proto_update=lazy``
the train step gathers the chosen rows (:func:`take_rows`), passes them as ``selection``, so the loss is
differentiated by them alone, and writes the updated rows back (:func:`put_rows`).
"""

from __future__ import annotations

import dataclasses
import fractions
import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from mlcd_jax.losses import core
from mlcd_jax.losses.dense import label_mask

SAMPLING_MODES: tuple[str, ...] = ("paper", "partial_fc")
POSITIVE_BUDGETS: tuple[str, ...] = ("expected", "all")


def pad_num_classes(num_classes: int, num_shards: int) -> int:
    """Rows the prototype matrix needs so that ``num_shards`` devices own equal slices (k rounded up)."""
    return -(-num_classes // num_shards) * num_shards


def sample_budget(rows_per_shard: int, sample_ratio: float) -> int:
    """Rows a shard keeps per step before positives overflow it: ``ceil(r · k/N)`` (at least 1)."""
    if not 0.0 < sample_ratio <= 1.0:
        raise ValueError(f"sample_ratio must be in (0, 1]; got {sample_ratio}")
    return max(1, min(rows_per_shard, math.ceil(sample_ratio * rows_per_shard - 1e-9)))


def check_sampling(sampling: str) -> None:
    """Raises a one-line ValueError for an unknown ``sampling`` mode."""
    if sampling not in SAMPLING_MODES:
        raise ValueError(f"unknown sampling {sampling!r}; choose one of {SAMPLING_MODES}")


def num_negatives(count: int | jax.Array, sample_ratio: float) -> int | jax.Array:
    """``ceil(r · count)``, exact in integers for Python ints and int32 arrays alike (no float rounding).

    r is taken as a fraction with denominator <= 2^15 (exact for any decimal r a config holds), and the
    product is split so no intermediate exceeds int32.
    """
    ratio = fractions.Fraction(sample_ratio).limit_denominator(1 << 15)
    num, den = ratio.numerator, ratio.denominator
    return count // den * num + (count % den * num + den - 1) // den


def expected_positives(rows_per_shard: int, num_classes: int, num_labels: int) -> float:
    """Distinct rows of one shard that ``num_labels`` labels drawn uniformly from k classes hit on
    average: (k/N) · (1 − e^(−B·l/k)). Clustered data is less uniform, which only lowers the count."""
    return rows_per_shard * -math.expm1(-num_labels / num_classes)


def positive_budget(rows_per_shard: int, num_classes: int, num_labels: int) -> int:
    """Rows a shard reserves for positives: :func:`expected_positives` E plus 4·√E (the count is a sum of
    negatively correlated hits, so its standard deviation is at most √E) plus 8, never more than can
    occur (min(B·l, k/N))."""
    expected = expected_positives(rows_per_shard, num_classes, num_labels)
    return min(num_labels, rows_per_shard, math.ceil(expected + 4 * math.sqrt(expected) + 8))


def shard_capacity(
    rows_per_shard: int,
    sample_ratio: float,
    num_labels: int,
    sampling: str = "paper",
    positives: int | None = None,
) -> int:
    """Static number of rows a shard gathers: room for ``positives`` positives (default every possible
    one, min(B·l, k/N)) and the negatives sampled beside them."""
    check_sampling(sampling)
    budget = sample_budget(rows_per_shard, sample_ratio)
    most_positives = min(num_labels, rows_per_shard) if positives is None else positives
    if sampling == "paper":  # P + ceil(r·(rows - P)) grows with P, so this is its maximum
        return most_positives + num_negatives(rows_per_shard - most_positives, sample_ratio)
    return min(rows_per_shard, max(budget, most_positives))


@dataclasses.dataclass(frozen=True)
class HeadPlan:
    """The head's static sizes per shard for one global batch (what ``aot`` reports as ``head``)."""

    rows_per_shard: int  # k/N
    positive_budget: int | None  # rows reserved for positives; None = every possible positive (exact)
    capacity: int  # rows a shard gathers per step with that budget
    exact_capacity: int  # rows gathered by the exact step (positive_budget=None)

    @property
    def budgeted(self) -> bool:
        """Whether batches must be checked (some batch could overflow the budget)."""
        return self.positive_budget is not None

    def report(self) -> dict[str, int | None]:
        return dataclasses.asdict(self)


def plan_head(
    num_classes: int, num_shards: int, num_labels: int, sample_ratio: float, sampling: str, budget: str
) -> HeadPlan:
    """The per-shard sizes for k = ``num_classes`` split over ``num_shards``, ``num_labels`` = B·l labels
    per step; ``budget``: ``"expected"`` (:func:`positive_budget`) or ``"all"`` (every possible positive)."""
    if budget not in POSITIVE_BUDGETS:
        raise ValueError(f"unknown positive budget {budget!r}; choose one of {POSITIVE_BUDGETS}")
    rows = pad_num_classes(num_classes, num_shards) // num_shards
    exact = shard_capacity(rows, sample_ratio, num_labels, sampling)
    positives = positive_budget(rows, num_classes, num_labels) if budget == "expected" else None
    if positives is not None and shard_capacity(rows, sample_ratio, num_labels, sampling, positives) >= exact:
        positives = None  # the budget saves nothing: no batch needs checking
    capacity = exact if positives is None else shard_capacity(rows, sample_ratio, num_labels, sampling, positives)
    return HeadPlan(rows, positives, capacity, exact)


def most_positives(labels: jax.Array, rows_per_shard: int, num_shards: int, kind: str) -> jax.Array:
    """The largest number of distinct positive rows any shard meets in this global batch (int32 scalar;
    jittable, labels [B, l] with -1 padding): a batch with more than a shard's positive budget needs the
    exact step."""
    flat = core.task_labels(labels, kind).reshape(-1)
    ids = jnp.sort(jnp.where(flat >= 0, flat, jnp.iinfo(flat.dtype).max))
    new = jnp.concatenate([jnp.ones(1, bool), ids[1:] != ids[:-1]]) & (ids < rows_per_shard * num_shards)
    per_shard = jax.ops.segment_sum(new.astype(jnp.int32), jnp.where(new, ids // rows_per_shard, 0), num_shards)
    return jnp.max(per_shard)


def ratio_ignored_warning(
    num_classes: int, sample_ratio: float, num_labels: int, sampling: str
) -> str | None:
    """Why r may not matter for this setup (``partial_fc`` sampling with B·l >= r·k), or None.

    In ``partial_fc`` mode positives count toward the ``r·k`` budget, so up to B·l distinct positives
    can fill it and no random negative is drawn.
    """
    check_sampling(sampling)
    if sampling != "partial_fc" or num_labels < sample_ratio * num_classes:
        return None
    return (
        f"loss.sampling='partial_fc' with B·l = {num_labels} positive labels >= r·k = "
        f"{sample_ratio * num_classes:g}: positives can fill the sampling budget, so sample_ratio has "
        f"little or no effect; use sampling='paper' to sample r of the negatives"
    )


def _select_rows(
    labels: jax.Array,
    key: jax.Array,
    lo: jax.Array,
    rows_per_shard: int,
    num_classes: int,
    sample_ratio: float,
    sampling: str,
    capacity: int,
    positive_budget: int | None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Local row indices to use [capacity], which of them count [capacity] (positives first), and how many
    of the shard's positives exceed ``positive_budget`` (0 without one: the capacity holds them all)."""
    real_rows = jnp.clip(num_classes - lo, 0, rows_per_shard)
    budget = sample_budget(rows_per_shard, sample_ratio)
    if budget == rows_per_shard:  # r ~ 1: every real row in both modes, no sampling
        rows = jnp.arange(rows_per_shard)
        return rows, rows < real_rows, jnp.zeros((), jnp.int32)
    is_pos = jnp.zeros(rows_per_shard, bool).at[core.local_rows(labels, lo, rows_per_shard)].set(
        True, mode="drop"
    )
    row_ids = jnp.arange(rows_per_shard)
    # Positives rank first (2), real negatives by a uniform draw, padding rows last (-1): the top
    # ``capacity`` scores are all positives plus a uniformly random subset of the negatives.
    score = jnp.where(
        is_pos, 2.0, jnp.where(row_ids < real_rows, jax.random.uniform(key, (rows_per_shard,)), -1.0)
    )
    _, rows = jax.lax.top_k(score, capacity)
    positives = jnp.sum(is_pos, dtype=jnp.int32)
    if sampling == "paper":
        count = positives + num_negatives(real_rows - positives, sample_ratio)
    else:
        count = jnp.minimum(jnp.maximum(budget, positives), real_rows)
    overflow = jnp.zeros((), jnp.int32) if positive_budget is None else jnp.maximum(positives - positive_budget, 0)
    return rows, jnp.arange(capacity) < count, overflow


@functools.partial(jax.tree_util.register_dataclass, data_fields=("rows", "valid", "overflow"),
                   meta_fields=("rows_per_shard",))
@dataclasses.dataclass(frozen=True)
class Selection:
    """The rows one step's head scores (:func:`select_rows`), sharded over the prototype axes: each
    shard's ``capacity`` local row ids ``rows`` [N·capacity], which of them count ``valid`` (the rest
    are never scored nor updated), its positives past the budget ``overflow`` [N], and (static) k/N."""

    rows: jax.Array
    valid: jax.Array
    overflow: jax.Array
    rows_per_shard: int


def _layout(
    mesh: Mesh, batch_axes: tuple[str, ...] | None, proto_axes: tuple[str, ...] | None
) -> tuple[tuple[str, ...], int, tuple[str, ...]]:
    """(prototype axes, their shard count, batch axes) with their defaults: every mesh axis, its first."""
    axes = tuple(mesh.axis_names) if proto_axes is None else tuple(proto_axes)
    batch_axes = (mesh.axis_names[0],) if batch_axes is None else tuple(batch_axes)
    return axes, math.prod(mesh.shape[a] for a in axes), batch_axes


def _shard_selection(
    labels: jax.Array, key: jax.Array, axes: tuple[str, ...], rows_per_shard: int, num_classes: int,
    sample_ratio: float, sampling: str, capacity: int, positive_budget: int | None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """:func:`_select_rows` for the calling shard of ``axes`` (inside ``shard_map``), global labels."""
    shard = jax.lax.axis_index(axes) if axes else 0
    return _select_rows(labels, jax.random.fold_in(key, shard), shard * rows_per_shard, rows_per_shard,
                        num_classes, sample_ratio, sampling, capacity, positive_budget)


def select_rows(
    labels: jax.Array, rng: jax.Array, *, mesh: Mesh, num_rows: int, num_classes: int | None = None,
    sample_ratio: float = 0.1, sampling: str = "paper", kind: str = "mlcd",
    batch_axes: tuple[str, ...] | None = None, proto_axes: tuple[str, ...] | None = None,
    positive_budget: int | None = None,
) -> Selection:
    """The rows :func:`partial_fc_loss` with the same arguments scores this step (the same draw), chosen
    before the loss so that a step can gather them, differentiate the loss by them alone and update
    only them (``loss.proto_update=lazy``). ``num_rows``: k_pad, the prototype matrix's rows."""
    check_sampling(sampling)
    labels = core.task_labels(labels, kind)
    axes, num_shards, _ = _layout(mesh, batch_axes, proto_axes)
    if num_rows % num_shards:
        raise ValueError(f"{num_rows} prototype rows cannot be split evenly over {num_shards} shards")
    rows_per_shard = num_rows // num_shards
    capacity = shard_capacity(rows_per_shard, sample_ratio, labels.size, sampling, positive_budget)
    num_classes = num_rows if num_classes is None else num_classes

    def shard_fn(y_global, key):
        rows, valid, overflow = _shard_selection(y_global, key, axes, rows_per_shard, num_classes, sample_ratio,
                                                 sampling, capacity, positive_budget)
        return rows.astype(jnp.int32), valid, overflow[None]

    # Every shard reads the whole (small) label batch, replicated: the choice then varies over the
    # prototype axes only, as out_specs say, whichever batch axes the rows are not split over.
    rows, valid, overflow = jax.shard_map(
        shard_fn, mesh=mesh, in_specs=(P(), P()), out_specs=(P(axes or None),) * 3,
    )(labels, rng)
    return Selection(rows, valid, overflow, rows_per_shard)


def take_rows(matrix: jax.Array, selection: Selection, *, mesh: Mesh, proto_axes: tuple[str, ...]) -> jax.Array:
    """The selected rows of a row-sharded [k_pad, ...] array: [N·capacity, ...], sharded the same way."""
    spec = P(proto_axes or None)
    return jax.shard_map(lambda x, r: x[r], mesh=mesh, in_specs=(spec, spec), out_specs=spec)(matrix, selection.rows)


def put_rows(
    matrix: jax.Array, selection: Selection, values: jax.Array, *, mesh: Mesh, proto_axes: tuple[str, ...]
) -> jax.Array:
    """``matrix`` with its selected valid rows set to ``values`` (:func:`take_rows`' shape); every other
    row, the selected rows that do not count included, keeps its value."""
    spec = P(proto_axes or None)

    def put(x, rows, valid, v):  # rows that do not count move past the end, distinct, and are dropped
        return x.at[rows + jnp.where(valid, 0, x.shape[0])].set(v, mode="drop", unique_indices=True)

    return jax.shard_map(put, mesh=mesh, in_specs=(spec,) * 4, out_specs=spec)(
        matrix, selection.rows, selection.valid, values)


def partial_fc_loss(
    embeddings: jax.Array,
    prototypes: jax.Array,
    labels: jax.Array,
    rng: jax.Array,
    *,
    mesh: Mesh,
    sample_ratio: float = 0.1,
    sampling: str = "paper",
    kind: str = "mlcd",
    scale: float = 32.0,
    margin: float = 0.3,
    margin_type: str | None = None,
    num_classes: int | None = None,
    batch_axes: tuple[str, ...] | None = None,
    proto_axes: tuple[str, ...] | None = None,
    positive_budget: int | None = None,
    compute_dtype: jnp.dtype | None = None,
    return_metrics: bool = False,
    histograms: bool = False,
    selection: Selection | None = None,
) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
    """Sharded cluster-discrimination loss with PartialFC sampling; usable inside ``jax.jit``.

    Args:
      embeddings: [B, d] global batch, sharded over ``batch_axes`` or replicated.
      prototypes: [k_pad, d], row-sharded over ``proto_axes`` (``P(proto_axes, None)``).
        ``k_pad`` must be divisible by the number of shards; pad with :func:`pad_num_classes` and pass the real
        ``num_classes`` so the padding rows are never used.
      labels: int [B, l] positive prototype ids, ``-1`` = padding; sharded like ``embeddings``.
      rng: PRNG key, replicated; each shard folds in its index so shards sample independently.
      mesh: the device mesh.
      sample_ratio: r, the fraction sampled per step (1 = no sampling): of each shard's negatives with
        ``sampling="paper"``, of each shard's rows (positives included) with ``"partial_fc"``.
      sampling: ``"paper"`` (the MLCD paper) or ``"partial_fc"``; see the module docstring.
      kind, scale, margin, margin_type, histograms: as in :func:`mlcd_jax.losses.dense_loss`.
      batch_axes: mesh axes the batch is split over; default the mesh's first axis, ``()`` = replicated.
      proto_axes: mesh axes the prototype rows are split over, in that order (the ``proto`` sharding
        rule); default all of the mesh's axes. Devices that differ only on other axes hold the same rows.
      positive_budget: rows each shard reserves for positives (:func:`plan_head`); None = every
        possible positive. Positives past it are not scored, and ``positives_dropped`` counts them: pass
        a budget only for batches :func:`most_positives` found within it.
      compute_dtype: the cosine GEMM's input dtype (fp32 accumulation); default the promotion of the
        embeddings' and prototypes' dtypes (fp32 against fp32 prototypes).
      return_metrics: also return loss_pos / loss_neg / mean_pos_cos / mean_neg_cos / num_sampled.
      selection: the rows :func:`select_rows` chose with these arguments; ``prototypes`` are then those
        rows alone (:func:`take_rows`, [N·capacity, d]), so the gradient reaches only them.
    """
    core.check_labels(embeddings, prototypes, labels)
    margin_kind = core.check_kind(kind, margin_type)
    labels = core.task_labels(labels, kind)
    axes, num_shards, batch_axes = _layout(mesh, batch_axes, proto_axes)
    k_pad = prototypes.shape[0] if selection is None else selection.rows_per_shard * num_shards
    if selection is not None and prototypes.shape[0] != selection.rows.shape[0]:
        raise ValueError(f"with a selection, prototypes are its {selection.rows.shape[0]} rows; "
                         f"got {prototypes.shape[0]}")
    if k_pad % num_shards:
        raise ValueError(
            f"{k_pad} prototypes cannot be split evenly over {num_shards} shards: allocate "
            f"pad_num_classes({k_pad}, {num_shards}) = {pad_num_classes(k_pad, num_shards)} rows and pass "
            f"num_classes={k_pad} (padding rows are masked out)"
        )
    num_classes = k_pad if num_classes is None else num_classes
    if not 0 < num_classes <= k_pad:
        raise ValueError(f"num_classes={num_classes} must be in (0, {k_pad}] (the prototype rows)")
    dp = math.prod(mesh.shape[a] for a in batch_axes)
    if embeddings.shape[0] % dp:
        raise ValueError(
            f"batch of {embeddings.shape[0]} does not split over batch axes {batch_axes} ({dp} ways)"
        )
    rows_per_shard = k_pad // num_shards
    copies = tuple(a for a in batch_axes if a not in axes)  # after the gather, the same values there
    capacity = shard_capacity(rows_per_shard, sample_ratio, labels.size, sampling, positive_budget)
    if selection is not None and selection.rows.shape[0] != capacity * num_shards:
        raise ValueError(f"the selection holds {selection.rows.shape[0]} rows, these arguments score "
                         f"{capacity} per shard: select_rows takes the loss's own arguments")
    compute_dtype = compute_dtype or jnp.promote_types(embeddings.dtype, prototypes.dtype)

    def pmax(x: jax.Array) -> jax.Array:
        return jax.lax.pmax(x, axes) if axes else x

    def psum(x: jax.Array) -> jax.Array:
        return jax.lax.psum(x, axes) if axes else x

    def shard_fn(e_local, w_local, y_local, key, *chosen):
        if batch_axes:
            e_local = jax.lax.all_gather(e_local, batch_axes, tiled=True)
            y_local = jax.lax.all_gather(y_local, batch_axes, tiled=True)
        lo = (jax.lax.axis_index(axes) if axes else 0) * rows_per_shard
        if chosen:  # w_local holds the chosen rows already
            (rows, valid, overflow), w_rows = chosen, w_local
            overflow = overflow[0]
        else:
            rows, valid, overflow = _shard_selection(y_local, key, axes, rows_per_shard, num_classes,
                                                     sample_ratio, sampling, capacity, positive_budget)
            w_rows = w_local[rows]
        e = core.l2_normalize(e_local)
        c = core.cosine(e, w_rows, compute_dtype)
        # Position of each selected row in ``rows`` (-1: not selected, or not this shard's label), to mark
        # each sample's positives among them.
        slot = jnp.full(rows_per_shard + 1, -1, jnp.int32).at[rows].set(jnp.arange(capacity))
        pos_slot = slot[core.local_rows(y_local, lo, rows_per_shard)]
        pos = label_mask(pos_slot, capacity) & valid[None, :]
        neg = valid[None, :] & ~pos
        loss, metrics = core.loss_from_cosines(
            c, pos, neg, kind=kind, scale=scale, margin=margin, margin_type=margin_kind,
            pmax=pmax, psum=psum, histograms=histograms,
        )
        metrics["num_sampled"] = psum(jnp.sum(valid, dtype=jnp.int32))
        if positive_budget is not None:  # positives past the budget were not scored: the loss is not exact
            metrics["positives_dropped"] = psum(overflow)
        if copies:  # equal on devices that differ only on batch axes outside the proto axes: say so
            loss = jax.lax.pmean(loss, copies)
            metrics = jax.tree.map(lambda m: jax.lax.pmax(jax.lax.stop_gradient(m), copies), metrics)
        return loss, metrics

    batch_spec = P(batch_axes or None)
    chosen = () if selection is None else (selection.rows, selection.valid, selection.overflow)
    loss, metrics = jax.shard_map(
        shard_fn,
        mesh=mesh,
        in_specs=(batch_spec, P(axes, None), batch_spec, P()) + (P(axes or None),) * len(chosen),
        out_specs=(P(), P()),
    )(embeddings, prototypes, labels, rng, *chosen)
    return (loss, metrics) if return_metrics else loss
