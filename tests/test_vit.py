"""ViT presets, FLOPs, forward options (scan, remat, drop-path, dtypes) and sharded construction."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from mlcd_jax import sharding
from mlcd_jax.interop.hf import from_params
from mlcd_jax.models import PRESETS, VisionTransformer, ViTConfig, flops_per_image, get_preset, macs_per_image
from mlcd_jax.models.presets import num_params

# OpenCLIP docs/model_profile.csv, image_gflops (torch flop counter: 2 FLOPs per multiply-add).
# Its ViT-bigG-14 has a 1280-d projection and a position table; ours is the MLCD RoPE layout (-0.004 %).
PUBLISHED_GFLOPS = {
    "B/32": 8.82, "B/16": 35.13, "L/14": 162.03, "L/14-336": 381.92, "H/14": 334.59, "g/14": 534.06,
    "bigG/14": 967.5,
}


@nnx.jit(static_argnames=("deterministic",))
def run(model, x, deterministic=True, rngs=None):
    """The forward pass, compiled once (eager NNX dispatches op by op, which is slow on CPU)."""
    return model(x, deterministic=deterministic, rngs=rngs)


def _pixels(n: int = 2, h: int = 32, w: int = 32, seed: int = 0) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), (n, h, w, 3), jnp.float32)


@pytest.mark.parametrize("name", sorted(PUBLISHED_GFLOPS))
def test_flops_match_published(name):
    cfg = get_preset(name)
    assert flops_per_image(cfg) / 1e9 == pytest.approx(PUBLISHED_GFLOPS[name], rel=1e-3)  # brief: 3 %
    assert macs_per_image(cfg) * 2 == flops_per_image(cfg)


def test_flops_scale_with_resolution():
    assert flops_per_image(PRESETS["L/14-336"]) == flops_per_image(PRESETS["L/14"], image_size=336)
    assert flops_per_image(PRESETS["L/14-336"]) > 2.3 * flops_per_image(PRESETS["L/14"])


def test_presets_table():
    assert set(PRESETS) >= {"B/32", "B/16", "L/14", "L/14-336", "H/14", "g/14", "bigG/14", "tiny"}
    big_g = PRESETS["bigG/14"]
    assert (big_g.width, big_g.depth, big_g.num_heads, big_g.mlp_dim, big_g.head_dim) == (1664, 48, 16, 8192, 104)
    assert big_g.rope and big_g.act == "gelu" and big_g.embed_dim == 1664
    large = PRESETS["L/14-336"]
    assert (large.width, large.depth, large.num_heads, large.image_size, large.act) == (1024, 24, 16, 336, "quick_gelu")
    assert PRESETS["B/16"].embed_dim == 512
    assert get_preset("L/14", image_size=336) == large


def test_preset_errors():
    with pytest.raises(KeyError, match="unknown ViT preset 'X/9'.*B/32"):
        get_preset("X/9")
    with pytest.raises(TypeError, match="unknown ViTConfig field.*'heads'"):
        get_preset("tiny", heads=3)
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        get_preset("tiny", num_heads=3)
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        get_preset("tiny", image_size=30)
    with pytest.raises(ValueError, match="act 'relu'"):
        get_preset("tiny", act="relu")
    with pytest.raises(ValueError, match="head dim divisible by 4"):
        ViTConfig(width=24, depth=1, num_heads=4, mlp_dim=8, patch_size=4, image_size=8, rope=True)


@pytest.mark.parametrize("name", ["tiny", "tiny-rope", "B/16", "bigG/14"])
def test_num_params_matches_model(name):
    model = nnx.eval_shape(lambda: VisionTransformer(get_preset(name), rngs=nnx.Rngs(0)))
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert count == num_params(get_preset(name))


@pytest.mark.parametrize("name,proj", [("tiny", None), ("tiny", 24), ("tiny-rope", None)])
def test_forward_shapes_and_any_grid(name, proj):
    cfg = get_preset(name, proj_dim=proj)
    model = VisionTransformer(cfg, rngs=nnx.Rngs(0))
    pooled, tokens = run(model, _pixels())
    assert pooled.shape == (2, cfg.embed_dim) and tokens.shape == (2, 1 + 16, 64)
    _, tokens = run(model, _pixels(1, 48, 40))  # 6 x 5 grid: interpolated table / RoPE on the new grid
    assert tokens.shape == (1, 31, 64) and bool(jnp.isfinite(tokens).all())
    with pytest.raises(ValueError, match="not a multiple of patch 8"):
        model(_pixels(1, 36, 32))
    with pytest.raises(ValueError, match="NHWC with 3 channels"):
        model(jnp.zeros((1, 3, 32, 32)))


def _stacked(params):
    out = dict(params)
    out["blocks"] = jax.tree.map(lambda *xs: jnp.stack(xs), *[params["blocks"][i] for i in sorted(params["blocks"])])
    return out


@pytest.mark.parametrize("name", ["tiny", "tiny-rope"])
def test_scan_and_remat_match_loop(name):
    cfg = get_preset(name)
    loop = VisionTransformer(cfg, rngs=nnx.Rngs(3))
    params = nnx.state(loop, nnx.Param).to_pure_dict()
    x = _pixels()

    def loss_and_grad(model):
        def loss(m):
            pooled, tokens = m(x)
            return jnp.sum(pooled**2) + jnp.mean(tokens**2)
        value, grads = nnx.jit(nnx.value_and_grad(loss))(model)
        return value, grads["patch_embed"]["kernel"][...]  # depends on every block

    ref_value, ref_grad = loss_and_grad(loop)
    for scan, remat in [(True, "full"), (False, "dots")]:
        p = _stacked(params) if scan else params
        model = from_params(cfg, p, scan_layers=scan, remat=remat)
        value, grad = loss_and_grad(model)
        np.testing.assert_allclose(value, ref_value, rtol=1e-5)
        np.testing.assert_allclose(grad, ref_grad, rtol=1e-4, atol=1e-6)


def test_scan_params_carry_layers_axis():
    model = nnx.eval_shape(lambda: VisionTransformer(get_preset("tiny"), rngs=nnx.Rngs(0), scan_layers=True))
    kernel = model.blocks.fc1.kernel
    assert kernel.shape == (2, 64, 256)
    assert kernel.get_metadata()["out_sharding"] == ("layers", "embed", "mlp")
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "model": 2})
    specs = sharding.state_shardings(nnx.state(model), mesh)
    assert specs["blocks"]["fc1"]["kernel"].spec == P(None, "fsdp", "model")
    assert specs["blocks"]["attn"]["out_kernel"].spec == P(None, "model", None, "fsdp")


def test_drop_path():
    cfg = get_preset("tiny")
    model = VisionTransformer(cfg, rngs=nnx.Rngs(0), drop_path_rate=0.5, scan_layers=True)
    x = _pixels(8)
    eval_out, _ = run(model, x)
    train_a, _ = run(model, x, False, nnx.Rngs(dropout=1))
    train_b, _ = run(model, x, False, nnx.Rngs(dropout=2))
    again_a, _ = run(model, x, False, nnx.Rngs(dropout=1))
    assert not np.allclose(train_a, eval_out) and not np.allclose(train_a, train_b)
    np.testing.assert_array_equal(train_a, again_a)
    np.testing.assert_array_equal(run(model, x, True, nnx.Rngs(dropout=1))[0], eval_out)
    with pytest.raises(ValueError, match="needs rngs"):
        run(model, x, False)
    no_drop = VisionTransformer(cfg, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(run(no_drop, x, False)[0], run(no_drop, x)[0])


def test_bf16_compute_fp32_params():
    cfg = get_preset("tiny-rope")
    ref = VisionTransformer(cfg, rngs=nnx.Rngs(0))
    bf16 = from_params(cfg, nnx.state(ref, nnx.Param).to_pure_dict(), dtype=jnp.bfloat16)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(bf16, nnx.Param)))
    pooled, tokens = run(bf16, _pixels())
    assert pooled.dtype == jnp.bfloat16 and tokens.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.float32(pooled), run(ref, _pixels())[0], atol=0.1)


def test_option_errors():
    cfg = get_preset("tiny")
    with pytest.raises(ValueError, match="needs bf16/fp16 compute"):
        VisionTransformer(cfg, rngs=nnx.Rngs(0), attention_impl="cudnn")
    with pytest.raises(ValueError, match="attention_impl 'flash'"):
        VisionTransformer(cfg, rngs=nnx.Rngs(0), attention_impl="flash")
    with pytest.raises(ValueError, match="remat 'some'"):
        VisionTransformer(cfg, rngs=nnx.Rngs(0), remat="some")
    xla = VisionTransformer(cfg, rngs=nnx.Rngs(0), attention_impl="xla")
    default = VisionTransformer(cfg, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(run(xla, _pixels())[0], run(default, _pixels())[0], atol=1e-6)


def test_sharded_construction_matches_unsharded():
    cfg = get_preset("tiny", num_heads=2, proj_dim=32)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "model": 2})

    def create():
        return VisionTransformer(cfg, rngs=nnx.Rngs(0))

    abstract = nnx.eval_shape(create)
    shardings = sharding.state_shardings(nnx.state(abstract), mesh)

    @jax.jit
    def init():
        return nnx.state(create())

    state = jax.jit(init, out_shardings=shardings)()
    assert state["blocks"][0]["fc1"]["kernel"].sharding.spec == P("fsdp", "model")
    assert state["blocks"][0]["attn"]["qkv_kernel"].sharding.spec == P("fsdp", None, "model", None)
    assert state["pos_embed"].sharding.spec == P(None, "fsdp")

    graphdef = nnx.graphdef(abstract)
    x = jax.device_put(_pixels(4), sharding.batch_sharding(mesh))

    @jax.jit
    def forward(state, x):
        return nnx.merge(graphdef, state)(x)

    pooled, tokens = forward(state, x)
    ref_pooled, ref_tokens = run(create(), _pixels(4))
    np.testing.assert_allclose(pooled, ref_pooled, atol=1e-5)
    np.testing.assert_allclose(tokens, ref_tokens, atol=1e-5)


def test_attention_defaults_to_cudnn_on_gpu_with_half_precision(monkeypatch):
    """``model.attention = ""`` picks cuDNN's fused attention on a GPU with bf16/fp16 compute and JAX's
    default elsewhere; a set value always wins."""
    from mlcd_jax.config_lib import base_config
    from mlcd_jax.runs import attention_impl

    c = base_config()
    assert attention_impl(c) is None  # this CPU
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert attention_impl(c) == "cudnn"
    c.model.dtype = "float32"
    assert attention_impl(c) is None  # cuDNN's fused attention needs bf16 / fp16
    c.model.attention = "xla"
    assert attention_impl(c) == "xla"
