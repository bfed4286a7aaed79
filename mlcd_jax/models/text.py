"""CLIP's text transformer in Flax NNX (same maths as ``transformers``' ``CLIPTextModel[WithProjection]``).

Token embedding + learned position table -> N pre-LN blocks with a causal mask (the ViT's
:class:`~mlcd_jax.models.vit.Block`) -> final LayerNorm -> the hidden state at the first
``eos_token_id`` (CLIP's EOT, 49407: the largest id of the vocabulary, so this is also OpenAI's
``argmax(ids)``) -> optional bias-free projection. Because the mask is causal, the pooled state never
sees the padding after EOT, so no padding mask is needed and any pad id gives the same embedding.

Parameters and activations carry the ViT's logical axis names (the token table is
``("vocab", "embed")``); compute runs in ``dtype`` with ``param_dtype`` parameters, LayerNorm statistics
in fp32. Initialisation follows ``transformers``' CLIP ``_init_weights`` (``initializer_factor`` 1).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from mlcd_jax.models.presets import TextConfig
from mlcd_jax.models.vit import REMAT_POLICIES, TOKENS, Block, _layer_norm, _normal, check_options
from mlcd_jax.sharding import constrain, logical


class TextTransformer(nnx.Module):
    """CLIP text tower: ``model(ids [B, T])`` is the (un-normalised) text embedding ``[B, embed_dim]``.

    ``ids`` are int token ids as :func:`mlcd_jax.data.tokenizer.tokenize` returns them, ``T`` at most
    ``config.context_length``; each row must contain ``config.eos_token_id`` (a row without it pools
    position 0, as transformers does). :meth:`encode` gives the pre-projection pooled output and the
    last hidden states. Options: ``attention_impl`` as the ViT's; ``remat`` one of :data:`REMAT_POLICIES`.
    """

    def __init__(
        self,
        config: TextConfig,
        *,
        rngs: nnx.Rngs,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        attention_impl: str | None = None,
        remat: str | None = None,
    ) -> None:
        check_options(attention_impl, remat, dtype)
        self.config = config
        self.dtype = dtype
        self.remat = remat or "none"
        w = config.width
        self.token_embed = nnx.Embed(
            config.vocab_size, w, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
            embedding_init=logical(_normal(0.02), "vocab", "embed"),
        )
        self.pos_embed = nnx.Param(
            logical(_normal(0.02), "seq", "embed")(rngs.params(), (config.context_length, w), param_dtype)
        )
        make = functools.partial(
            Block, config, dtype=dtype, param_dtype=param_dtype, impl=attention_impl, causal=True
        )
        self.blocks = nnx.List([make(rngs=rngs) for _ in range(config.depth)])
        self.final_ln = _layer_norm(config, rngs, dtype, param_dtype)
        if config.proj_dim:
            self.proj = nnx.Linear(
                w, config.proj_dim, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                kernel_init=logical(_normal(w**-0.5), "embed", None),
            )

    def encode(self, ids: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(pooled [B, width], hidden [B, T, width])``: HF's ``pooler_output`` and ``last_hidden_state``."""
        cfg = self.config
        if ids.ndim != 2 or not jnp.issubdtype(ids.dtype, jnp.integer):
            raise ValueError(f"ids must be integer [batch, tokens], got {ids.dtype} {tuple(ids.shape)}")
        if ids.shape[1] > cfg.context_length:
            raise ValueError(f"{ids.shape[1]} tokens exceed the context length {cfg.context_length}")
        ids = constrain(ids, "activation_batch", "activation_length")
        x = self.token_embed(ids) + self.pos_embed[: ids.shape[1]].astype(self.dtype)
        x = constrain(x, *TOKENS)

        def apply(block: Block, x: jax.Array) -> jax.Array:
            return block(x, None, 0.0, None)

        if self.remat != "none":
            apply = nnx.remat(apply, policy=REMAT_POLICIES[self.remat])
        for block in self.blocks:
            x = apply(block, x)
        x = constrain(self.final_ln(x), *TOKENS)
        eot = jnp.argmax(ids == cfg.eos_token_id, axis=-1)  # the first EOT (0 when a row has none)
        pooled = jnp.take_along_axis(x, eot[:, None, None], axis=1)[:, 0]
        return constrain(pooled, "activation_batch", "activation_embed"), x

    def __call__(self, ids: jax.Array) -> jax.Array:
        pooled, _ = self.encode(ids)
        if self.config.proj_dim:
            pooled = constrain(self.proj(pooled), "activation_batch", "activation_embed")
        return pooled
