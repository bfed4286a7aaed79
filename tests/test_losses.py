"""Dense reference losses against NumPy, and the sharded PartialFC head against the dense reference."""

import logging
import math
import re
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P
from scipy import stats

from mlcd_jax.losses import dense_loss, most_positives, pad_num_classes, partial_fc_loss, plan_head, sample_budget
from mlcd_jax.losses.partial_fc import SAMPLING_MODES, num_negatives, shard_capacity
from mlcd_jax.sharding import make_mesh

B, D, K, L = 16, 12, 96, 4


def _data(seed=0, b=B, d=D, k=K, l=L):
    rng = np.random.default_rng(seed)
    e = rng.normal(size=(b, d)).astype(np.float32)
    w = rng.normal(size=(k, d)).astype(np.float32)
    y = rng.integers(0, k, size=(b, l)).astype(np.int32)
    y[1, 2:] = -1  # padding
    y[2] = -1  # a row with no positive at all
    y[3, 1] = y[3, 0]  # a repeated id counts once
    return e, w, y


def numpy_loss(e, w, y, kind, scale, margin, margin_type):
    """Independent float64 formula of Eq. 4, Eq. 5 and the (ArcFace) softmax, one sample at a time."""
    e = e / np.linalg.norm(e, axis=1, keepdims=True)
    w = w / np.linalg.norm(w, axis=1, keepdims=True)
    c = e.astype(np.float64) @ w.T.astype(np.float64)

    def pos_cos(x):
        if margin_type == "cosine":
            return x - margin
        return np.cos(min(np.arccos(np.clip(x, -1, 1)) + margin, np.pi))

    losses = []
    for b in range(len(e)):
        pos = sorted({int(t) for t in y[b] if t >= 0})
        if kind == "softmax":
            pos = [int(y[b, 0])] if y[b, 0] >= 0 else []
            if not pos:
                continue
        neg = [j for j in range(w.shape[0]) if j not in pos]
        zp = np.array([scale * pos_cos(c[b, i]) for i in pos])
        zn = np.array([scale * c[b, j] for j in neg])
        if kind == "mlcd":
            losses.append(np.log1p(np.exp(-zp).sum()) + np.log1p(np.exp(zn).sum()))
        elif kind == "mlc":
            losses.append(np.log1p(sum(np.exp(zj - zi) for zj in zn for zi in zp)))
        else:
            losses.append(-zp[0] + np.log(np.exp(zp[0]) + np.exp(zn).sum()))
    return float(np.mean(losses))


@pytest.mark.parametrize(
    "kind,margin_type", [("mlcd", "cosine"), ("mlc", "cosine"), ("softmax", "angular"), ("mlcd", "angular")]
)
@pytest.mark.parametrize("scale,margin", [(32.0, 0.3), (10.0, 0.0)])
def test_dense_matches_numpy(kind, margin_type, scale, margin):
    e, w, y = _data()
    got = dense_loss(e, w, y, kind=kind, scale=scale, margin=margin, margin_type=margin_type)
    want = numpy_loss(e, w, y, kind, scale, margin, margin_type)
    np.testing.assert_allclose(float(got), want, rtol=2e-5)


def test_dense_defaults_and_padding_semantics():
    e, w, y = _data()
    # defaults: mlcd with cosine margin, softmax with angular margin
    np.testing.assert_allclose(
        float(dense_loss(e, w, y)), numpy_loss(e, w, y, "mlcd", 32.0, 0.3, "cosine"), rtol=2e-5
    )
    np.testing.assert_allclose(
        float(dense_loss(e, w, y, kind="softmax")),
        numpy_loss(e, w, y, "softmax", 32.0, 0.3, "angular"),
        rtol=2e-5,
    )
    # a repeated id is the same as the id once plus padding
    y2 = y.copy()
    y2[3, 1] = -1
    assert float(dense_loss(e, w, y)) == pytest.approx(float(dense_loss(e, w, y2)), rel=1e-6)
    # a row without positives contributes only its negative term
    _, m = dense_loss(e[2:3], w, y[2:3], return_metrics=True)
    assert float(m["loss_pos"]) == 0.0 and float(m["loss_neg"]) > 0


def test_bad_input_errors():
    e, w, y = _data()
    with pytest.raises(ValueError, match="unknown loss kind"):
        dense_loss(e, w, y, kind="circle")
    with pytest.raises(ValueError, match="labels must be"):
        dense_loss(e, w, y[:-1])
    with pytest.raises(ValueError, match="embedding dim"):
        dense_loss(e[:, :-1], w, y)
    with pytest.raises(ValueError, match="integers"):
        dense_loss(e, w, y.astype(np.float32))
    mesh = make_mesh({"x": 8})
    with pytest.raises(ValueError, match=r"pad_num_classes\(90, 8\) = 96"):
        partial_fc_loss(e, w[:90], y, jax.random.key(0), mesh=mesh)
    with pytest.raises(ValueError, match="sample_ratio"):
        partial_fc_loss(e, w, y, jax.random.key(0), mesh=mesh, sample_ratio=0.0)


def _place(mesh, e, w, y, batch_axes):
    names = tuple(mesh.axis_names)
    bspec = P(batch_axes or None)
    return (
        jax.device_put(e, NamedSharding(mesh, bspec)),
        jax.device_put(w, NamedSharding(mesh, P(names, None))),
        jax.device_put(y, NamedSharding(mesh, bspec)),
    )


@pytest.mark.parametrize("sampling", SAMPLING_MODES)
@pytest.mark.parametrize("shape", [(8, 1), (4, 2), (2, 4)])
@pytest.mark.parametrize("kind", ["mlcd", "mlc", "softmax"])
def test_sharded_equals_dense_at_ratio_one(shape, kind, sampling):
    mesh = make_mesh({"x": shape[0], "y": shape[1]})
    e, w, y = _data(seed=sum(shape))
    for batch_axes in (("x",), ()):
        args = _place(mesh, e, w, y, batch_axes)

        def sharded(e_, w_, y_=args[2]):
            return partial_fc_loss(
                e_, w_, y_, jax.random.key(1), mesh=mesh, sample_ratio=1.0, sampling=sampling, kind=kind,
                batch_axes=batch_axes,
            )

        v_s, g_s = jax.jit(jax.value_and_grad(sharded, argnums=(0, 1)))(args[0], args[1])
        v_d, g_d = jax.value_and_grad(lambda a, b: dense_loss(a, b, y, kind=kind), argnums=(0, 1))(e, w)
        np.testing.assert_allclose(float(v_s), float(v_d), rtol=1e-5)
        for gs, gd in zip(g_s, g_d):
            np.testing.assert_allclose(np.asarray(gs), np.asarray(gd), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("proto_axes", [("x",), ("y",), ()])
def test_prototypes_on_some_mesh_axes_equal_dense(proto_axes):
    """The ``proto`` rule may split the rows over a subset of the axes (replicas on the others, or no
    split at all) while the batch is split over all of them: same value, gradients and metrics."""
    mesh = make_mesh({"x": 4, "y": 2})
    e, w, y = _data(seed=5)
    batch = NamedSharding(mesh, P(("x", "y")))
    args = (jax.device_put(e, batch), jax.device_put(w, NamedSharding(mesh, P(proto_axes or None, None))),
            jax.device_put(y, batch))

    def sharded(e_, w_, y_):
        return partial_fc_loss(e_, w_, y_, jax.random.key(1), mesh=mesh, sample_ratio=1.0, batch_axes=("x", "y"),
                               proto_axes=proto_axes, return_metrics=True)

    (v_s, m_s), g_s = jax.jit(jax.value_and_grad(sharded, argnums=(0, 1), has_aux=True))(*args)
    (v_d, m_d), g_d = jax.value_and_grad(lambda a, b: dense_loss(a, b, y, return_metrics=True), argnums=(0, 1),
                                         has_aux=True)(e, w)
    np.testing.assert_allclose(float(v_s), float(v_d), rtol=1e-5)
    assert int(m_s["num_sampled"]) == K
    for gs, gd in zip(g_s, g_d):
        np.testing.assert_allclose(np.asarray(gs), np.asarray(gd), rtol=1e-5, atol=1e-6)


def test_sharded_metrics_match_dense_at_ratio_one():
    mesh = make_mesh({"x": 4, "y": 2})
    e, w, y = _data(seed=3)
    _, m_s = jax.jit(
        lambda a, b, c: partial_fc_loss(
            a, b, c, jax.random.key(0), mesh=mesh, sample_ratio=1.0, return_metrics=True,
            histograms=True,
        )
    )(*_place(mesh, e, w, y, ("x",)))
    _, m_d = dense_loss(e, w, y, return_metrics=True, histograms=True)
    for name in m_d:
        np.testing.assert_allclose(np.asarray(m_s[name]), np.asarray(m_d[name]), rtol=1e-5, atol=1e-6)
    assert int(m_s["num_sampled"]) == K
    assert float(m_s["pos_cos_hist"].sum()) == sum(len({t for t in r if t >= 0}) for r in y)


def test_padded_prototypes_equal_dense_on_real_rows():
    mesh = make_mesh({"x": 8})
    e, w, y = _data(k=90)
    k_pad = pad_num_classes(90, 8)
    w_pad = np.concatenate([w, np.random.default_rng(9).normal(size=(k_pad - 90, D)).astype(np.float32)])
    for ratio in (1.0, 0.5):
        f = jax.jit(
            jax.value_and_grad(
                lambda a, b: partial_fc_loss(
                    a, b, y, jax.random.key(0), mesh=mesh, sample_ratio=ratio, num_classes=90
                )
            )
        )
        v, g = f(e, w_pad)
        assert np.all(np.asarray(g[90:]) == 0), "padding rows must never be used"
        if ratio == 1.0:
            np.testing.assert_allclose(float(v), float(dense_loss(e, w, y)), rtol=1e-5)


def _sampled_rows(mesh, e, w, y, key, ratio, kind="mlcd", sampling="paper"):
    """Rows that received gradient = rows that were sampled (or positives)."""
    g = jax.jit(
        jax.grad(
            lambda b, k_: partial_fc_loss(
                e, b, y, k_, mesh=mesh, sample_ratio=ratio, kind=kind, sampling=sampling
            )
        ),
    )(w, key)
    return np.flatnonzero(np.abs(np.asarray(g)).sum(axis=1) > 0)


def test_sampling_keeps_positives_and_counts_exactly():
    mesh = make_mesh({"x": 4, "y": 2})
    k, ratio = 8 * 40, 0.1
    e, w, y = _data(seed=5, k=k)
    rows = _sampled_rows(mesh, e, w, y, jax.random.key(3), ratio, sampling="partial_fc")
    positives = {int(t) for t in y.ravel() if t >= 0}
    assert positives <= set(rows.tolist())
    budget = sample_budget(k // 8, ratio)
    expected = sum(
        max(budget, len({p for p in positives if s * 40 <= p < (s + 1) * 40})) for s in range(8)
    )
    assert len(rows) == expected
    _, m = jax.jit(
        lambda: partial_fc_loss(
            e, w, y, jax.random.key(3), mesh=mesh, sample_ratio=ratio, sampling="partial_fc",
            return_metrics=True,
        )
    )()
    assert int(m["num_sampled"]) == expected


def test_positives_overflowing_the_budget_are_all_kept():
    mesh = make_mesh({"x": 8})
    k = 8 * 16
    e, w, _ = _data(seed=6, k=k)
    y = (2 * np.arange(B * L, dtype=np.int32)).reshape(B, L)  # 64 distinct positives, 8 per shard
    rows = _sampled_rows(mesh, e, w, y, jax.random.key(0), ratio=0.1, sampling="partial_fc")  # budget 2
    assert set(rows.tolist()) == set(np.unique(y).tolist())


@pytest.mark.parametrize("sampling", SAMPLING_MODES)
def test_sampled_rows_per_shard_follow_the_mode(sampling):
    """paper: positives + ceil(r · negatives) per shard; partial_fc: max(ceil(r · k/N), positives)."""
    mesh = make_mesh({"x": 4, "y": 2})
    rows_per_shard, ratio = 40, 0.1
    k = 8 * rows_per_shard
    e, w, _ = _data(seed=11, k=k)
    per_shard = [0, 1, 2, 4, 8, 12, 16, 21]  # distinct positives on shard s; B·l = 64 in all
    y = np.concatenate(
        [s * rows_per_shard + np.arange(n) * (rows_per_shard // max(n, 1)) for s, n in enumerate(per_shard)]
    ).astype(np.int32).reshape(B, L)
    if sampling == "paper":
        expected = [n + -(-(rows_per_shard - n) // 10) for n in per_shard]  # ceil(0.1 · negatives)
    else:
        expected = [max(4, n) for n in per_shard]  # budget ceil(0.1 · 40) = 4
    rows = _sampled_rows(mesh, e, w, y, jax.random.key(2), ratio, sampling=sampling)
    assert set(np.unique(y).tolist()) <= set(rows.tolist())
    counts = np.bincount(rows // rows_per_shard, minlength=8)
    assert counts.tolist() == expected
    _, m = jax.jit(
        lambda: partial_fc_loss(
            e, w, y, jax.random.key(2), mesh=mesh, sample_ratio=ratio, sampling=sampling,
            return_metrics=True,
        )
    )()
    assert int(m["num_sampled"]) == sum(expected)


def test_num_negatives_is_the_exact_ceiling():
    """``ceil(r · m)`` without float rounding (0.1 · 30 is 3.0000000000000004 in floats)."""
    m = np.arange(0, 200_001, 97, dtype=np.int32)
    for r in ("0.1", "0.05", "0.2", "0.3", "0.15", "0.5", "0.7", "1"):
        want = [math.ceil(Fraction(r) * int(x)) for x in m]
        assert [num_negatives(int(x), float(r)) for x in m[:50]] == want[:50]
        np.testing.assert_array_equal(np.asarray(jax.jit(num_negatives, static_argnums=1)(m, float(r))), want)


def test_unknown_sampling_and_the_partial_fc_warning(caplog):
    from mlcd_jax import train
    from mlcd_jax.config_lib import ConfigError, base_config

    e, w, y = _data()
    mesh = make_mesh({"x": 8})
    with pytest.raises(ValueError, match=r"unknown sampling 'uniform'; choose one of \('paper', 'partial_fc'\)"):
        partial_fc_loss(e, w, y, jax.random.key(0), mesh=mesh, sampling="uniform")
    c = base_config()  # B·l = 32768 · 8 >= r·k = 0.1 · 1M
    c.loss.sampling = "uniform"
    with pytest.raises(ConfigError, match="loss.sampling='uniform': choose one of paper, partial_fc"):
        train.validate(c, mesh)
    for sampling, warns in (("paper", False), ("partial_fc", True)):
        c.loss.sampling = sampling
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            train.validate(c, mesh)
        assert any("sample_ratio has little or no effect" in r.message for r in caplog.records) == warns


@pytest.mark.parametrize("sampling", SAMPLING_MODES)
def test_negatives_are_uniform_and_depend_on_rng(sampling):
    mesh = make_mesh({"x": 8})
    k, ratio, draws = 8 * 30, 0.2, 300
    e, w, y = _data(seed=7, k=k, b=4, l=2)
    positives = {int(t) for t in y.ravel() if t >= 0}
    grad = jax.jit(
        jax.grad(
            lambda b, k_: partial_fc_loss(
                e, b, y, k_, mesh=mesh, sample_ratio=ratio, sampling=sampling, batch_axes=()
            )
        ),
    )
    counts = np.zeros(k)
    previous = None
    for i in range(draws):
        rows = np.abs(np.asarray(grad(w, jax.random.key(i)))).sum(axis=1) > 0
        counts += rows
        if previous is not None:
            assert not np.array_equal(rows, previous), "different rng must give different negatives"
        previous = rows
    negatives = np.array([j for j in range(k) if j not in positives])
    for shard in range(8):
        mine = negatives[(negatives >= shard * 30) & (negatives < (shard + 1) * 30)]
        _, p = stats.chisquare(counts[mine])
        assert p > 1e-3, f"shard {shard}: negative counts not uniform (p={p:.2g})"
        if sampling == "paper":  # each negative is drawn with frequency ceil(r · m) / m ~ r
            np.testing.assert_allclose(
                counts[mine].mean() / draws, math.ceil(Fraction(str(ratio)) * len(mine)) / len(mine)
            )


def test_only_sampled_rows_get_gradient_and_value_is_consistent():
    mesh = make_mesh({"x": 2, "y": 4})
    e, w, y = _data(seed=8)
    rows = _sampled_rows(mesh, e, w, y, jax.random.key(0), ratio=0.25)
    assert len(rows) < K
    # the sharded loss at r < 1 equals the dense loss restricted to the sampled rows
    keep = np.zeros(K, bool)
    keep[rows] = True
    remap = -np.ones(K, np.int32)
    remap[rows] = np.arange(len(rows))
    y_sub = np.where(y >= 0, remap[np.maximum(y, 0)], -1)
    v = jax.jit(lambda: partial_fc_loss(e, w, y, jax.random.key(0), mesh=mesh, sample_ratio=0.25))()
    np.testing.assert_allclose(float(v), float(dense_loss(e, w[keep], y_sub)), rtol=1e-5)


def test_bf16_inputs():
    mesh = make_mesh({"x": 8})
    e, w, y = _data(seed=9)
    ref = dense_loss(e, w, y)
    for fn in (
        lambda a, b: dense_loss(a, b, y),
        jax.jit(lambda a, b: partial_fc_loss(a, b, y, jax.random.key(0), mesh=mesh, sample_ratio=1.0)),
    ):
        got = fn(jnp.asarray(e, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16))
        assert got.dtype == jnp.float32
        np.testing.assert_allclose(float(got), float(ref), rtol=3e-2)


@pytest.mark.parametrize("sampling", SAMPLING_MODES)
def test_no_batch_by_k_buffer_in_compiled_program(sampling):
    mesh = make_mesh({"x": 8})
    b, d, k, l = 512, 16, 8 * 16384, 2  # B x k/N (8.4M floats) dominates W's shard (0.26M)
    spec = lambda shape, dt, s: jax.ShapeDtypeStruct(shape, dt, sharding=NamedSharding(mesh, s))
    args = (
        spec((b, d), jnp.float32, P("x")),
        spec((k, d), jnp.float32, P(("x",), None)),
        spec((b, l), jnp.int32, P("x")),
    )

    def step(e, w, y):
        return jax.value_and_grad(
            lambda e_, w_: partial_fc_loss(
                e_, w_, y, jax.random.key(0), mesh=mesh, sample_ratio=0.1, sampling=sampling
            ),
            argnums=(0, 1),
        )(e, w)

    compiled = jax.jit(step).lower(*args).compile()
    per_device_bk = b * k // 8
    sizes = [
        int(np.prod([int(x) for x in dims.split(",") if x]))
        for dims in re.findall(r"\b(?:f32|bf16|f16|pred|s32)\[([\d,]*)\]", compiled.as_text())
    ]
    assert max(sizes) < per_device_bk / 4, f"largest buffer {max(sizes)} vs B*k/N {per_device_bk}"
    # The working set is a few [B, S] buffers, S = the sampled rows (paper: B·l + r of the rest).
    capacity = shard_capacity(k // 8, 0.1, b * l, sampling=sampling)
    assert capacity < k // 8 / 5
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp < 5 * b * capacity * 4, f"temp {temp} bytes is more than a few [B, S] float buffers"


def test_the_positive_budget_at_the_papers_batch():
    """L/14's head on v5p-64 (k = 1M rows over 32 chips, B = 32,768, l = 8): ~23 % of a shard's rows are
    a batch's positives, so with r = 0.1 of the rest a shard scores under 40 % of its rows, not all of
    them, and uniformly drawn batches stay inside the budget."""
    plan = plan_head(1_000_000, 32, 32_768 * 8, 0.1, "paper", "expected")
    assert plan.rows_per_shard == plan.exact_capacity == 31_250 and plan.budgeted
    assert plan.positive_budget < 0.25 * plan.rows_per_shard and plan.capacity < 0.4 * plan.rows_per_shard
    count = jax.jit(lambda y: most_positives(y, 31_250, 32, "mlcd"))
    rng = np.random.default_rng(0)
    for _ in range(3):
        assert int(count(rng.integers(0, 1_000_000, (32_768, 8), dtype=np.int32))) <= plan.positive_budget
    exact = plan_head(1_000_000, 32, 32_768 * 8, 0.1, "paper", "all")
    assert (exact.positive_budget, exact.capacity) == (None, 31_250)
    assert not plan_head(1024, 8, 256 * 8, 0.5, "paper", "expected").budgeted  # the demo: nothing to save
    with pytest.raises(ValueError, match="unknown positive budget 'some'"):
        plan_head(1024, 8, 256, 0.5, "paper", "some")


def test_most_positives_counts_distinct_rows_per_shard():
    y = np.array([[0, 1, 1, -1], [15, 16, 17, 0], [31, 30, 29, 28]], np.int32)  # 4 shards of 8 rows
    assert int(most_positives(jnp.asarray(y), 8, 4, "mlcd")) == 4  # shard 3: 28..31
    assert int(most_positives(jnp.asarray(y), 8, 4, "softmax")) == 1  # column 0 only: 0, 15, 31


@pytest.mark.parametrize("sampling", SAMPLING_MODES)
def test_a_batch_past_the_positive_budget_drops_positives_and_the_exact_head_keeps_them(sampling):
    """The budgeted head scores only ``positive_budget`` positives per shard and counts the rest as
    dropped; the same batch through the exact head (``positive_budget=None``) scores every positive:
    its value and gradients are dense_loss's over the rows it sampled."""
    mesh = make_mesh({"x": 8})
    b, l, rows = 64, 8, 512
    plan = plan_head(8 * rows, 8, b * l, 0.1, sampling, "expected")
    assert plan.budgeted and plan.positive_budget < rows
    e, w, _ = _data(seed=7, b=b, k=8 * rows)
    y = np.arange(b * l, dtype=np.int32).reshape(b, l) % rows  # 512 distinct positives, all on shard 0
    assert int(most_positives(jnp.asarray(y), rows, 8, "mlcd")) == rows > plan.positive_budget
    key = jax.random.key(4)

    def head(budget):
        return jax.jit(jax.value_and_grad(
            lambda e_, w_: partial_fc_loss(e_, w_, y, key, mesh=mesh, sample_ratio=0.1, sampling=sampling,
                                           positive_budget=budget, return_metrics=True),
            argnums=(0, 1), has_aux=True))(e, w)

    (_, dropped), (_, g_budget) = head(plan.positive_budget)
    assert int(dropped["positives_dropped"]) == rows - plan.positive_budget
    assert np.sum(np.abs(np.asarray(g_budget[:rows])).sum(axis=1) > 0) < rows  # some positives unscored
    (value, metrics), (g_e, g_w) = head(None)
    assert "positives_dropped" not in metrics
    used = np.flatnonzero(np.abs(np.asarray(g_w)).sum(axis=1) > 0)
    assert set(range(rows)) <= set(used.tolist())
    remap = np.full(8 * rows, -1, np.int32)
    remap[used] = np.arange(len(used))
    ref, (r_e, r_w) = jax.value_and_grad(lambda e_, w_: dense_loss(e_, w_, remap[y]), argnums=(0, 1))(e, w[used])
    np.testing.assert_allclose(float(value), float(ref), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(g_e), np.asarray(r_e), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(g_w)[used], np.asarray(r_w), rtol=1e-4, atol=1e-6)


def test_the_head_gemm_in_bf16_accumulates_in_fp32():
    """``compute_dtype=bfloat16``: the cosine GEMM reads bf16 prototypes and embeddings (a bf16 dot with
    an f32 result in the program), and the loss stays within bf16 rounding of the fp32 head."""
    mesh = make_mesh({"x": 8})
    e, w, y = _data(seed=9, k=8 * 16)

    def head(dtype):
        return jax.jit(lambda e_, w_: partial_fc_loss(e_, w_, y, jax.random.key(0), mesh=mesh, sample_ratio=0.5,
                                                      compute_dtype=dtype))

    def dots(dtype):  # operand and result types of the program's dot_generals, as lowered
        return set(re.findall(r"dot_general.*: \(tensor<[\dx]+x(\w+)>, tensor<[\dx]+x(\w+)>\) -> tensor<[\dx]+x(\w+)>",
                              head(dtype).lower(e, w).as_text()))

    assert dots(jnp.bfloat16) == {("bf16", "bf16", "f32")} and dots(None) == {("f32", "f32", "f32")}
    np.testing.assert_allclose(float(head(jnp.bfloat16)(e, w)), float(head(None)(e, w)), rtol=2e-2)
