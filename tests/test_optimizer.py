"""The optimizer by parameter role: weight decay on matrix weights only (whatever the layer stacking), the
prototype head as its own group (lr multiplier, weight decay, no clipping), and the schedule under
gradient accumulation (counted in updates, logged as applied)."""

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlcd_jax import sharding, train
from mlcd_jax.config_lib import base_config

# Every matrix weight of the tiny ViT (block indices dropped), and nothing else.
MATRIX_WEIGHTS = {
    "patch_embed/kernel", "blocks/attn/qkv_kernel", "blocks/attn/out_kernel", "blocks/fc1/kernel",
    "blocks/fc2/kernel",
}


def _setup(num_steps: int = 10, **overrides: Any) -> train.TrainSetup:
    """A tiny-ViT setup on the 8 fake devices, no warm-up, with dotted-key ``overrides``."""
    c = base_config()
    c.model.name, c.model.dtype, c.data.image_size = "tiny", "float32", 16
    c.model.overrides = {"patch_size": 8}
    c.batch_size, c.loss.num_classes, c.loss.top_l, c.loss.sample_ratio = 16, 64, 2, 1.0
    c.warmup_steps = 0
    for key, value in overrides.items():
        *path, leaf = key.split(".")
        target = c
        for part in path:
            target = target[part]
        target[leaf] = value
    return train.TrainSetup.create(c, sharding.make_mesh(dict(c.mesh)), num_train_steps=num_steps)


def _filled(setup: train.TrainSetup, value: float) -> dict[str, Any]:
    """``{"params", "proto"}`` shaped like the setup's trainable state, every entry ``value``."""
    shapes = {"params": setup.abstract_state["params"], "proto": setup.abstract_state["proto"]}
    return jax.tree.map(lambda x: jnp.full(x.shape, value, x.dtype), shapes)


def _first_update(setup: train.TrainSetup, params: Any, grads: Any) -> Any:
    updates, _ = jax.jit(setup.tx.update)(grads, setup.tx.init(params), params)
    return updates


def _name(path: tuple[Any, ...]) -> str:
    return "/".join(str(k.key) for k in path if not isinstance(k.key, int))


@pytest.mark.parametrize("scan_layers", [False, True])
def test_weight_decay_applies_to_exactly_the_matrix_weights(scan_layers):
    """Zero gradient: Adam's step is 0, so what moves is decoupled decay -lr·wd·p, by parameter role."""
    setup = _setup(**{"model.scan_layers": scan_layers, "learning_rate": 1.0, "weight_decay": 0.1})
    params = _filled(setup, 1.0)
    updates = _first_update(setup, params, _filled(setup, 0.0))
    moved = {
        _name(path): np.unique(np.asarray(u))
        for path, u in jax.tree_util.tree_leaves_with_path(updates["params"])
        if np.any(np.asarray(u) != 0)
    }
    assert set(moved) == MATRIX_WEIGHTS  # not qkv_bias, other biases, norms, class/position embeddings
    for values in moved.values():
        np.testing.assert_allclose(values, [-0.1], rtol=1e-6)


def test_prototypes_have_their_own_learning_rate_and_weight_decay():
    eps = 1e-6
    for mult, proto_wd, want_lr, want_wd in [(3.0, 0.5, 0.3, 0.5), (1.0, None, 0.1, 0.2)]:  # set, default
        setup = _setup(**{"learning_rate": 0.1, "weight_decay": 0.2, "eps": eps, "loss.proto_lr_mult": mult,
                          "loss.proto_weight_decay": proto_wd})
        params = _filled(setup, 1.0)
        grads = {"params": _filled(setup, 0.0)["params"], "proto": params["proto"]}
        updates = _first_update(setup, params, grads)
        # AdamW: -lr · (g / (|g| + eps) + wd · p) with g = p = 1 on the head ...
        np.testing.assert_allclose(updates["proto"], -want_lr * (1 / (1 + eps) + want_wd), rtol=1e-6)
        # ... and the backbone at its own lr and decay (zero gradient: decay only)
        np.testing.assert_allclose(updates["params"]["patch_embed"]["kernel"], -0.1 * 0.2, rtol=1e-6)


def test_backbone_clipping_ignores_the_head_gradient():
    """eps = 1 makes Adam's first step g / (|g| + 1), so it shows the gradient's scale after clipping."""
    setup = _setup(**{"learning_rate": 1.0, "weight_decay": 0.0, "grad_clip": 1.0, "eps": 1.0,
                      "loss.proto_weight_decay": 0.0})
    params = _filled(setup, 0.0)
    backbone = _filled(setup, 0.01)["params"]
    norm = 0.01 * np.sqrt(sum(x.size for x in jax.tree.leaves(backbone)))
    assert norm > 1.0, "the backbone gradient alone must exceed the clip"
    g = 0.01 / norm  # clipped by the backbone's own global norm
    for head in (0.0, 1e4):
        updates = _first_update(setup, params, {"params": backbone, "proto": jnp.full_like(params["proto"], head)})
        for u in jax.tree.leaves(updates["params"]):
            np.testing.assert_allclose(u, -g / (g + 1), rtol=1e-5)
        np.testing.assert_allclose(updates["proto"], -head / (head + 1), rtol=1e-5)  # the head: not clipped


def test_accumulated_schedule_counts_updates_and_logs_the_applied_lr():
    steps, accum, peak, eps = 24, 2, 1e-3, 1e-6
    setup = _setup(steps, **{"learning_rate": peak, "warmup_steps": 4, "grad_accum_steps": accum,
                             "weight_decay": 0.0, "loss.proto_weight_decay": 0.0, "grad_clip": 0.0, "eps": eps})
    # The lr the train step logs.
    state, step = setup.init_state(0), train.make_train_step(setup)
    rng = np.random.default_rng(0)
    batch = sharding.host_to_global({"image": rng.normal(size=(16, 16, 16, 3)).astype(np.float32),
                                     "labels": rng.integers(0, 64, (16, 2)).astype(np.int32)}, setup.mesh)
    logged = []
    for _ in range(steps):
        state, metrics = step(state, batch)
        logged.append(float(metrics["lr"]))
    # The lr the optimizer applies: with a constant gradient of ones Adam's step is -lr / (1 + eps).
    params, ones = _filled(setup, 0.0), _filled(setup, 1.0)
    opt_state, update = setup.tx.init(params), jax.jit(setup.tx.update)
    applied = []
    for _ in range(steps):
        u, opt_state = update(ones, opt_state, params)
        lr_backbone = -float(u["params"]["patch_embed"]["kernel"].ravel()[0]) * (1 + eps)
        np.testing.assert_allclose(-float(u["proto"][0, 0]) * (1 + eps), lr_backbone, rtol=1e-6, atol=1e-12)
        applied.append(lr_backbone)
    applied = np.array(applied)
    assert np.all(applied[0::2] == 0), "no update inside an accumulation window"
    per_update = applied[1::2]
    # each micro-step logs the lr of the update its gradient goes into
    np.testing.assert_allclose(logged[0::2], per_update, rtol=1e-5, atol=1e-12)
    np.testing.assert_allclose(logged[1::2], per_update, rtol=1e-5, atol=1e-12)
    # warm-up of 4 train steps = 2 updates, then the peak; the cosine ends near 0 at the last update
    np.testing.assert_allclose(per_update[:3], [0.0, peak / 2, peak], rtol=1e-5)
    assert per_update[-1] < 0.03 * peak


def test_bf16_first_moments_halve_their_memory_and_follow_the_same_update():
    """``mu_dtype=bfloat16``: AdamW's first moments are stored in bf16 (second moments and parameters
    stay fp32), and the first update is the fp32 one to bf16 precision."""
    f32, bf16 = _setup(), _setup(mu_dtype="bfloat16")
    params = _filled(f32, 0.5)
    grads = jax.tree.map(lambda x: jnp.full(x.shape, 0.01, x.dtype), params)
    moments = [x for x in jax.tree.leaves(bf16.tx.init(params)) if hasattr(x, "dtype") and x.ndim]
    assert {x.dtype for x in moments} == {jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)}
    assert sum(x.dtype == jnp.bfloat16 for x in moments) == sum(x.dtype == jnp.float32 for x in moments)
    for a, b in zip(jax.tree.leaves(_first_update(f32, params, grads)), jax.tree.leaves(_first_update(bf16, params, grads))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-2)


def _proto_leaves(setup: train.TrainSetup, state: dict[str, Any]) -> dict[str, np.ndarray]:
    """The prototype matrix and its AdamW moments (``mu``, ``nu``) in ``state``, on the host."""
    shape = setup.abstract_state["proto"].shape
    found = {"proto": np.asarray(state["proto"])}
    for path, leaf in jax.tree_util.tree_flatten_with_path(state["opt_state"])[0]:
        if getattr(leaf, "shape", None) == shape:
            found[next(str(k.name) for k in reversed(path) if hasattr(k, "name"))] = np.asarray(leaf)
    assert set(found) == {"proto", "mu", "nu"}
    return found


_LAZY = {"loss.num_classes": 512, "loss.sample_ratio": 0.25, "weight_decay": 0.1, "learning_rate": 0.01}
# Where the prototype rows live: over all 8 devices (the default), over fsdp = 4 of a data = 2 mesh
# (the batch is split over an axis the rows are not), on every device whole (replicated).
LAYOUTS = {"all devices": {}, "fsdp only": {"mesh.data": 2, "mesh.fsdp": 4, "mesh_rules": "proto=fsdp"},
           "replicated": {"mesh_rules": "proto="}}


def _lazy_pair(**layout: Any) -> tuple[train.TrainSetup, train.TrainSetup, Any]:
    """Dense and lazy setups (k = 512 on the 8 fake devices, r = 0.25) and a batch maker."""
    dense, lazy = _setup(**_LAZY, **layout), _setup(**_LAZY, **layout, **{"loss.proto_update": "lazy"})
    rng = np.random.default_rng(0)

    def batch() -> dict[str, jax.Array]:
        return sharding.host_to_global({"image": rng.normal(size=(16, 16, 16, 3)).astype(np.float32),
                                        "labels": rng.integers(0, 512, (16, 2)).astype(np.int32)}, dense.mesh)

    return dense, lazy, batch


def _touched(selection: Any) -> np.ndarray:
    """Which of the 512 rows a selection updates (global row ids from each shard's local ones)."""
    shards, size = selection.overflow.shape[0], selection.rows_per_shard
    rows = np.asarray(selection.rows).reshape(shards, -1) + size * np.arange(shards)[:, None]
    touched = np.zeros(512, bool)
    touched[rows[np.asarray(selection.valid).reshape(shards, -1)]] = True
    assert 0 < touched.sum() < 512 / 2
    return touched


def test_lazy_adamw_gives_the_sampled_rows_exactly_dense_adamws_update_and_leaves_the_rest():
    """``loss.proto_update=lazy``: for one gradient (zero outside the sampled rows), from the same
    moments, the sampled rows get bit for bit dense AdamW's parameters and moments; every other row
    keeps its value and both moments, which dense AdamW decays (and weight decay moves every row)."""
    from mlcd_jax.train.step import apply_gradients

    dense, lazy, batch = _lazy_pair()
    goal = lazy.objective
    chosen = goal.select(batch(), jax.random.key(1))
    touched = _touched(chosen)
    params = jax.device_get({k: dense.init_state(0)[k] for k in ("params", "proto")})
    noise = np.random.default_rng(1)
    grads = jax.tree.map(lambda x: noise.normal(size=x.shape).astype(np.float32), params)
    grads["proto"][~touched] = 0.0  # what a sampled step's gradient is
    # Moments that are not zero anywhere: one dense update from a gradient everywhere.
    moments = jax.jit(dense.tx.update)(jax.tree.map(lambda g: g + 1.0, grads), dense.tx.init(params), params)[1]

    @jax.jit
    def lazy_update(grads, opt_state, params, chosen):  # as the train step: the rows, then back
        rows = {**params, "proto": goal.take(params["proto"], chosen)}
        grads = {**grads, "proto": goal.take(grads["proto"], chosen)}
        return apply_gradients(lazy, grads, opt_state, rows, (params["proto"], chosen))

    want = jax.jit(functools.partial(apply_gradients, dense))(grads, moments, params)
    got = lazy_update(grads, moments, params, chosen)
    start, after, dense_after = (_proto_leaves(dense, {"proto": p["proto"], "opt_state": s})
                                 for p, s in ((params, moments), got, want))
    for name in ("proto", "mu", "nu"):
        np.testing.assert_array_equal(after[name][touched], dense_after[name][touched], err_msg=name)
        np.testing.assert_array_equal(after[name][~touched], start[name][~touched], err_msg=name)
        assert not np.any(dense_after[name][~touched] == start[name][~touched]), name  # dense moved them
    for a, b in zip(jax.tree.leaves(got[0]["params"]), jax.tree.leaves(want[0]["params"])):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_lazy_train_step_is_the_dense_step_on_the_sampled_rows(layout):
    """The lazy train step scores the rows the dense one does (same loss, same backbone update), moves
    the sampled rows as dense does (to float32 rounding: the two programs order the rows' gradient
    arithmetic differently) and no other row or moment; wherever the rows live."""
    dense, lazy, batch = _lazy_pair(**LAYOUTS[layout])
    dense_step, lazy_step = train.make_train_step(dense), train.make_train_step(lazy)
    copy = lambda state: jax.tree.map(jnp.copy, state)  # noqa: E731  (the steps donate their input)
    start, _ = dense_step(dense.init_state(0), batch())  # moments that are not all zero
    second = batch()
    want, want_metrics = dense_step(copy(start), second)
    got, got_metrics = lazy_step(copy(start), second)
    # The rows the step sampled, from its sampling key as make_train_step derives it.
    key = jax.random.split(jax.random.fold_in(jax.random.wrap_key_data(start["rng"]), start["step"]), 3)[0]
    touched = _touched(lazy.objective.select(second, key))
    assert int(got_metrics["num_sampled"]) == touched.sum()
    assert float(got_metrics["loss"]) == float(want_metrics["loss"])
    for a, b in zip(jax.tree.leaves(jax.device_get(got["params"])), jax.tree.leaves(jax.device_get(want["params"]))):
        np.testing.assert_array_equal(a, b)
    before, after, dense_after = (_proto_leaves(dense, s) for s in (start, got, want))
    for name in ("proto", "mu", "nu"):
        np.testing.assert_allclose(after[name][touched], dense_after[name][touched], rtol=1e-5, atol=1e-8,
                                   err_msg=name)
        np.testing.assert_array_equal(after[name][~touched], before[name][~touched], err_msg=name)
    assert int(got["step"]) == 2


@pytest.mark.parametrize("overrides, message", [
    ({"loss.proto_update": "sparse"}, "loss.proto_update='sparse': choose one of dense, lazy"),
    ({"loss.proto_update": "lazy", "loss.kind": "clip"}, "samples none"),
    ({"loss.proto_update": "lazy", "grad_accum_steps": 2}, "cannot accumulate"),
])
def test_lazy_update_settings_it_cannot_run_are_one_line_errors(overrides, message):
    from mlcd_jax.config_lib import ConfigError
    from mlcd_jax.train.validate import validate

    c = base_config()
    for key, value in overrides.items():
        *path, leaf = key.split(".")
        (c[path[0]] if path else c)[leaf] = value
    with pytest.raises(ConfigError, match=message):
        validate(c, sharding.make_mesh(dict(c.mesh)))
