"""CLIP-layout Vision Transformer in Flax NNX, optionally with MLCD's 2-D rotary position embedding.

Layout (same maths as ``transformers``' ``CLIPVisionModel`` / ``MLCDVisionModel``, so checkpoints move
both ways through :mod:`mlcd_jax.interop.hf`): patch conv (no bias) -> class token -> learned absolute
position table (bicubic-resampled when the input grid differs, as HF's ``interpolate_pos_encoding``) or,
with ``config.rope``, 2-D RoPE on q/k -> pre-LayerNorm -> N pre-LN blocks (MHA + MLP) -> post-LayerNorm
on the class token -> optional bias-free projection.

Every parameter carries logical axis names (:func:`mlcd_jax.sharding.logical`) and every activation
is pinned by logical names (:func:`mlcd_jax.sharding.constrain`: batch over all batch mesh axes, MLP
hidden and heads over ``model``), so under FSDP each device computes only its share of the batch and
XLA gathers weights per layer instead of activations. Compute runs in
``dtype`` (e.g. bf16) with ``param_dtype`` parameters, LayerNorm statistics and RoPE in fp32.
Initialisation follows ``transformers``' CLIP ``_init_weights`` (``initializer_factor`` 1).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mlcd_jax.models.presets import TextConfig, ViTConfig
from mlcd_jax.sharding import constrain, logical

ATTENTION_IMPLS: tuple[str | None, ...] = (None, "xla", "cudnn")

# Remat policy names -> jax.checkpoint policies (None: no rematerialisation).
REMAT_POLICIES: dict[str, Callable[..., bool] | None] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "dots_all": jax.checkpoint_policies.dots_saveable,
}


# Logical axes of the [B, T, width] residual stream.
TOKENS: tuple[str, ...] = ("activation_batch", "activation_length", "activation_embed")


def _normal(std: float) -> nnx.Initializer:
    return nnx.initializers.normal(stddev=std)


def quick_gelu(x: jax.Array) -> jax.Array:
    """OpenAI CLIP's ``x * sigmoid(1.702 x)``."""
    return x * jax.nn.sigmoid(1.702 * x)


_ACT: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),  # HF "gelu" is the exact erf form
    "quick_gelu": quick_gelu,
}


def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] weights of 1-D bicubic resampling exactly as ``torch.nn.functional.interpolate``.

    Mode ``bicubic``, ``align_corners=False``, cubic coefficient a = -0.75, border-clamped taps, no
    antialiasing. ``jax.image.resize`` uses a = -0.5 (Keys), so it would not reproduce HF's features.
    """
    a = -0.75

    def near(x: np.ndarray) -> np.ndarray:  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x: np.ndarray) -> np.ndarray:  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    src = (np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5
    base = np.floor(src)
    t = src - base
    weights = np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=1)
    taps = np.clip(base[:, None].astype(np.int64) + np.arange(-1, 3)[None, :], 0, in_size - 1)
    out = np.zeros((out_size, in_size), np.float64)
    np.add.at(out, (np.repeat(np.arange(out_size), 4), taps.ravel()), weights.ravel())
    return out


def resize_pos_embed(table: jax.Array, grid: tuple[int, int]) -> jax.Array:
    """Resamples a ``[1 + g*g, D]`` position table (class row first) to a ``grid = (rows, cols)`` grid."""
    n = table.shape[0] - 1
    g = math.isqrt(n)
    if g * g != n:
        raise ValueError(f"position table has {n} patch rows, not a square grid; cannot resample")
    if (g, g) == tuple(grid):
        return table
    wh = jnp.asarray(bicubic_matrix(g, grid[0]), jnp.float32)
    ww = jnp.asarray(bicubic_matrix(g, grid[1]), jnp.float32)
    patch = table[1:].astype(jnp.float32).reshape(g, g, -1)
    patch = jnp.einsum("hi,wj,ijd->hwd", wh, ww, patch, precision=jax.lax.Precision.HIGHEST)
    return jnp.concatenate([table[:1].astype(jnp.float32), patch.reshape(grid[0] * grid[1], -1)], 0)


def rope_angles(class_pos_emb: jax.Array, grid: tuple[int, int], theta: float) -> jax.Array:
    """``[1 + rows*cols, head_dim]`` RoPE angles as ``MLCDVisionModel``: class row learned, patches 2-D.

    inv_freq = theta^(-2j / (head_dim/2)) for j < head_dim/4; a patch at (row, col) gets
    ``[row * inv_freq, col * inv_freq]``; the result is duplicated to the full head dim. Row-major
    patch order with rows = height, as transformers (the original unicom code swaps h/w when h != w).
    """
    spatial = class_pos_emb.shape[-1]  # head_dim // 2
    inv_freq = 1.0 / (theta ** (np.arange(0, spatial, 2, dtype=np.float32) / spatial))
    rows, cols = np.meshgrid(np.arange(grid[0]), np.arange(grid[1]), indexing="ij")
    patch = np.concatenate(
        [rows.reshape(-1, 1) * inv_freq[None], cols.reshape(-1, 1) * inv_freq[None]], axis=-1
    ).astype(np.float32)
    half = jnp.concatenate([class_pos_emb.astype(jnp.float32), jnp.asarray(patch)], axis=0)
    return jnp.concatenate([half, half], axis=-1)


def apply_rope(x: jax.Array, angles: jax.Array) -> jax.Array:
    """``x * cos + rotate_half(x) * sin`` in fp32 on ``x`` of shape [B, T, H, D], cast back to x's dtype.

    ``angles`` is [T, D], or [B, T, D] when each example keeps other tokens (FLIP's patch drop)."""
    if angles.ndim == 2:
        angles = angles[None]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    xf = x.astype(jnp.float32)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (xf * cos + rotated * sin).astype(x.dtype)


def drop_path(x: jax.Array, rate: jax.Array | float, key: jax.Array | None) -> jax.Array:
    """Stochastic depth: zeroes whole samples of a residual branch with prob ``rate``, rescales the rest."""
    if key is None:
        return x
    keep = 1.0 - rate
    mask = jax.random.bernoulli(key, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / keep, 0).astype(x.dtype)


class Attention(nnx.Module):
    """Multi-head self-attention with a fused q/k/v kernel, through ``jax.nn.dot_product_attention``.

    ``causal`` masks each query to the keys at or before it (CLIP's text tower); the ViT attends to all.
    """

    def __init__(
        self,
        config: ViTConfig | TextConfig,
        *,
        rngs: nnx.Rngs,
        dtype: Any,
        param_dtype: Any,
        impl: str | None,
        causal: bool = False,
    ) -> None:
        w, h, d = config.width, config.num_heads, config.head_dim
        in_std = w**-0.5 * (2 * config.depth) ** -0.5
        self.qkv_kernel = nnx.Param(
            logical(_normal(in_std), "embed", None, "heads", "kv")(rngs.params(), (w, 3, h, d), param_dtype)
        )
        self.qkv_bias = nnx.Param(
            logical(nnx.initializers.zeros_init(), None, "heads", "kv")(rngs.params(), (3, h, d), param_dtype)
        )
        self.out_kernel = nnx.Param(
            logical(_normal(w**-0.5), "heads", "kv", "embed")(rngs.params(), (h, d, w), param_dtype)
        )
        self.out_bias = nnx.Param(
            logical(nnx.initializers.zeros_init(), "embed")(rngs.params(), (w,), param_dtype)
        )
        self.dtype = dtype
        self.impl = impl
        self.causal = causal

    def __call__(self, x: jax.Array, rope: jax.Array | None) -> jax.Array:
        heads = ("activation_batch", "activation_length", "activation_heads", "activation_kv")
        qkv = jnp.einsum("bte,eshd->sbthd", x, self.qkv_kernel[...].astype(self.dtype))
        qkv = constrain(qkv + self.qkv_bias[...].astype(self.dtype)[:, None, None], None, *heads)
        q, k, v = qkv[0], qkv[1], qkv[2]
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        out = constrain(_attention(q, k, v, self.impl, self.causal), *heads)
        out = jnp.einsum("bthd,hde->bte", out, self.out_kernel[...].astype(self.dtype))
        return constrain(out + self.out_bias[...].astype(self.dtype), *TOKENS)


def _attention(q: jax.Array, k: jax.Array, v: jax.Array, impl: str | None, causal: bool) -> jax.Array:
    """``jax.nn.dot_product_attention``; for cuDNN the tokens are padded to a multiple of 64 (its fused
    kernels refuse odd lengths such as 1 + 16 x 16 = 257) and the padding is masked out by length
    (trailing padding keeps a causal mask exact)."""
    if impl != "cudnn" or q.shape[1] % 64 == 0:
        return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation=impl)
    t = q.shape[1]
    pad = [(0, 0), (0, -t % 64), (0, 0), (0, 0)]
    q, k, v = (jnp.pad(a, pad) for a in (q, k, v))
    lengths = jnp.full((q.shape[0],), t, jnp.int32)
    out = jax.nn.dot_product_attention(
        q, k, v, query_seq_lengths=lengths, key_value_seq_lengths=lengths, is_causal=causal,
        implementation=impl,
    )
    return out[:, :t]


class Block(nnx.Module):
    """Pre-LN transformer block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``, each with drop-path."""

    def __init__(
        self,
        config: ViTConfig | TextConfig,
        *,
        rngs: nnx.Rngs,
        dtype: Any,
        param_dtype: Any,
        impl: str | None,
        causal: bool = False,
    ) -> None:
        w, m = config.width, config.mlp_dim
        layer_std = w**-0.5 * (2 * config.depth) ** -0.5
        self.ln1 = _layer_norm(config, rngs, dtype, param_dtype)
        self.attn = Attention(
            config, rngs=rngs, dtype=dtype, param_dtype=param_dtype, impl=impl, causal=causal
        )
        self.ln2 = _layer_norm(config, rngs, dtype, param_dtype)
        self.fc1 = nnx.Linear(
            w, m, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
            kernel_init=logical(_normal((2 * w) ** -0.5), "embed", "mlp"),
            bias_init=logical(nnx.initializers.zeros_init(), "mlp"),
        )
        self.fc2 = nnx.Linear(
            m, w, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
            kernel_init=logical(_normal(layer_std), "mlp", "embed"),
            bias_init=logical(nnx.initializers.zeros_init(), "embed"),
        )
        self.act = config.act

    def __call__(
        self, x: jax.Array, rope: jax.Array | None, rate: jax.Array | float, key: jax.Array | None
    ) -> jax.Array:
        keys = (None, None) if key is None else tuple(jax.random.split(key))
        x = constrain(x + drop_path(self.attn(self.ln1(x), rope), rate, keys[0]), *TOKENS)
        hidden = constrain(
            _ACT[self.act](self.fc1(self.ln2(x))), "activation_batch", "activation_length", "activation_mlp"
        )
        y = constrain(self.fc2(hidden), *TOKENS)
        return constrain(x + drop_path(y, rate, keys[1]), *TOKENS)


def _layer_norm(config: ViTConfig | TextConfig, rngs: nnx.Rngs, dtype: Any, param_dtype: Any) -> nnx.LayerNorm:
    """LayerNorm with fp32 statistics (Flax's default) and ``dtype`` output."""
    return nnx.LayerNorm(
        config.width, epsilon=config.layer_norm_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
        scale_init=logical(nnx.initializers.ones_init(), "norm"),
        bias_init=logical(nnx.initializers.zeros_init(), "norm"),
    )


def _drop_patches(
    x: jax.Array, rope: jax.Array | None, rate: float, key: jax.Array
) -> tuple[jax.Array, jax.Array | None]:
    """Keeps the class token and a uniformly random ``round((1 - rate) · N)`` (at least 1) of each example's
    N patch tokens, in their original order; RoPE angles follow their tokens ([B, 1 + K, D])."""
    b, t, _ = x.shape
    n = t - 1
    keep = max(1, round((1.0 - rate) * n))
    order = jnp.argsort(jax.random.uniform(key, (b, n)), axis=1)
    kept = jnp.sort(order[:, :keep], axis=1) + 1  # token positions, after the class token
    index = jnp.concatenate([jnp.zeros((b, 1), kept.dtype), kept], axis=1)
    x = constrain(jnp.take_along_axis(x, index[:, :, None], axis=1), *TOKENS)
    if rope is not None:
        rope = rope[index]
    return x, rope


def check_options(attention_impl: str | None, remat: str | None, dtype: Any) -> None:
    """A tower's attention implementation, remat policy and compute dtype, checked together (one-line errors)."""
    if attention_impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl {attention_impl!r} is not one of {ATTENTION_IMPLS}")
    if attention_impl == "cudnn" and jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
        raise ValueError(
            f"attention_impl='cudnn' needs bf16/fp16 compute, got dtype={jnp.dtype(dtype).name}; "
            "pass dtype=jnp.bfloat16 or use attention_impl='xla'"
        )
    if (remat or "none") not in REMAT_POLICIES:
        raise ValueError(f"remat {remat!r} is not one of {sorted(REMAT_POLICIES)}")


class VisionTransformer(nnx.Module):
    """CLIP-layout ViT returning ``(pooled [B, embed_dim], tokens [B, 1 + N, width])``.

    ``pooled`` is the post-LayerNorm class token (projected when ``config.proj_dim``); ``tokens`` are
    the last hidden states before the post-LN (HF's ``last_hidden_state``; the patch tokens feed the
    PCA pictures). Inputs are NHWC, already CLIP-normalised; any size that is a multiple of the patch.

    Options: ``attention_impl`` None (JAX picks) / ``"xla"`` / ``"cudnn"`` (GPU flash attention,
    bf16/fp16 only); ``remat`` one of :data:`REMAT_POLICIES`; ``scan_layers`` stacks the blocks'
    parameters on a leading ``layers`` axis and runs them with ``jax.lax.scan`` (one compiled block);
    ``drop_path_rate`` is the last block's stochastic-depth rate (linear from 0 over the depth). Drop
    path draws from ``rngs.dropout()`` passed at call time, so the model holds no RNG state.
    """

    def __init__(
        self,
        config: ViTConfig,
        *,
        rngs: nnx.Rngs,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        attention_impl: str | None = None,
        remat: str | None = None,
        scan_layers: bool = False,
        drop_path_rate: float = 0.0,
    ) -> None:
        check_options(attention_impl, remat, dtype)
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
        self.config = config
        self.dtype = dtype
        self.remat = remat or "none"
        self.scan_layers = scan_layers
        self.drop_path_rate = float(drop_path_rate)
        w, p = config.width, config.patch_size

        self.patch_embed = nnx.Conv(
            config.num_channels, w, kernel_size=(p, p), strides=(p, p), padding="VALID", use_bias=False,
            dtype=dtype, param_dtype=param_dtype, rngs=rngs,
            kernel_init=logical(_normal(0.02), "patch", "patch", "channels", "embed"),
        )
        self.class_embedding = nnx.Param(
            logical(_normal(w**-0.5), "embed")(rngs.params(), (w,), param_dtype)
        )
        if config.rope:
            self.class_pos_emb = nnx.Param(
                logical(_normal((config.head_dim // 2) ** -0.5), None, "kv")(
                    rngs.params(), (1, config.head_dim // 2), param_dtype
                )
            )
        else:
            self.pos_embed = nnx.Param(
                logical(_normal(0.02), "seq", "embed")(rngs.params(), (config.num_patches + 1, w), param_dtype)
            )
        self.pre_ln = _layer_norm(config, rngs, dtype, param_dtype)

        make = functools.partial(
            Block, config, dtype=dtype, param_dtype=param_dtype, impl=attention_impl
        )
        if scan_layers:
            @nnx.split_rngs(splits=config.depth)
            @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
            def stacked(r: nnx.Rngs) -> Block:
                return make(rngs=r)

            self.blocks = stacked(rngs)
        else:
            self.blocks = nnx.List([make(rngs=rngs) for _ in range(config.depth)])

        self.post_ln = _layer_norm(config, rngs, dtype, param_dtype)
        if config.proj_dim:
            self.proj = nnx.Linear(
                w, config.proj_dim, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                kernel_init=logical(_normal(w**-0.5), "embed", None),
            )

    def position_table(self, grid: tuple[int, int]) -> jax.Array:
        """The absolute position table for a ``grid`` of patches (resampled bicubically if needed)."""
        return resize_pos_embed(self.pos_embed[...], grid)

    def __call__(
        self, pixels: jax.Array, *, deterministic: bool = True, rngs: nnx.Rngs | None = None,
        patch_drop: float = 0.0,
    ) -> tuple[jax.Array, jax.Array]:
        """``patch_drop`` (FLIP): in training (``deterministic=False``) each image keeps a random
        ``round((1 - patch_drop) · N)`` of its N patch tokens (drawn from ``rngs.patch_drop()``), after
        their positions are added, so the encoder runs on fewer tokens."""
        cfg = self.config
        if pixels.ndim != 4 or pixels.shape[-1] != cfg.num_channels:
            raise ValueError(
                f"pixels must be NHWC with {cfg.num_channels} channels, got shape {tuple(pixels.shape)}"
            )
        if pixels.shape[1] % cfg.patch_size or pixels.shape[2] % cfg.patch_size:
            raise ValueError(
                f"image size {pixels.shape[1]}x{pixels.shape[2]} is not a multiple of patch {cfg.patch_size}"
            )
        pixels = constrain(pixels.astype(self.dtype), "activation_batch", None, None, None)
        x = self.patch_embed(pixels)
        b, gh, gw, w = x.shape
        x = constrain(x.reshape(b, gh * gw, w), *TOKENS)
        cls = jnp.broadcast_to(self.class_embedding[...].astype(self.dtype), (b, 1, w))
        x = jnp.concatenate([cls, x], axis=1)
        rope = None
        if cfg.rope:
            rope = rope_angles(self.class_pos_emb[...], (gh, gw), cfg.rope_theta)
        else:
            x = x + self.position_table((gh, gw)).astype(self.dtype)
        if patch_drop > 0 and not deterministic:
            if rngs is None:
                raise ValueError("patch_drop > 0 with deterministic=False needs rngs=nnx.Rngs(patch_drop=key)")
            x, rope = _drop_patches(x, rope, patch_drop, rngs.patch_drop())
        x = constrain(self.pre_ln(x), *TOKENS)
        x = self._blocks(x, rope, deterministic, rngs)
        pooled = constrain(self.post_ln(x[:, 0]), "activation_batch", "activation_embed")
        if cfg.proj_dim:
            pooled = constrain(self.proj(pooled), "activation_batch", "activation_embed")
        return pooled, x

    def _blocks(
        self, x: jax.Array, rope: jax.Array | None, deterministic: bool, rngs: nnx.Rngs | None
    ) -> jax.Array:
        depth = self.config.depth
        rates = jnp.linspace(0.0, self.drop_path_rate, depth)  # per-block rate, 0 for the first
        keys: jax.Array | None = None
        if not deterministic and self.drop_path_rate > 0:
            if rngs is None:
                raise ValueError("drop_path_rate > 0 with deterministic=False needs rngs=nnx.Rngs(dropout=key)")
            keys = jax.random.split(rngs.dropout(), depth)
        policy = REMAT_POLICIES[self.remat]

        if not self.scan_layers:
            def apply(block: Block, x: jax.Array, rate: jax.Array, key: jax.Array | None) -> jax.Array:
                return block(x, rope, rate, key)

            if self.remat != "none":
                apply = nnx.remat(apply, policy=policy)
            for i, block in enumerate(self.blocks):
                x = apply(block, x, rates[i], None if keys is None else keys[i])
            return x

        graphdef, state = nnx.split(self.blocks)

        def body(carry: jax.Array, xs: tuple[Any, jax.Array, jax.Array | None]) -> tuple[jax.Array, None]:
            layer_state, rate, key = xs
            return nnx.merge(graphdef, layer_state)(carry, rope, rate, key), None

        if self.remat != "none":
            body = jax.checkpoint(body, policy=policy, prevent_cse=False)
        x, _ = jax.lax.scan(body, x, (state, rates, keys))
        return x
