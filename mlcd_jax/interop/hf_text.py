"""Hugging Face CLIP text checkpoints (``config.json`` + safetensors) <-> :class:`TextTransformer`.

Supported architectures: ``CLIPTextModel``, ``CLIPTextModelWithProjection``, and for loading also the
text tower (+ ``text_projection``, ``projection_dim``) of a full ``CLIPModel``. Reading and sharded
writing are :mod:`mlcd_jax.interop.files`', the per-block layout conversion :mod:`mlcd_jax.interop.hf`'s
(CLIP's text and vision encoder layers share their key names); this module adds the text embeddings,
the final LayerNorm and the config.

Key names: ``CLIPTextModelWithProjection`` and ``CLIPModel`` prefix the tower with ``text_model.``;
transformers 5 writes ``CLIPTextModel`` without it. We read both and write the prefixed layout.

EOT pooling: configs written before transformers PR #24773 say ``eos_token_id: 2`` (e.g. OpenAI's
released ones), for which transformers pools at ``argmax(ids)``. With CLIP's vocabulary the EOT is the
largest id, so we read such a config as ``eos_token_id = vocab_size - 1`` (the first EOT; the same
position whenever the row contains an EOT, which tokenized text always does).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from flax import nnx

from mlcd_jax.interop.files import InteropError, read_config, read_safetensors, write_checkpoint
from mlcd_jax.interop.hf import (
    Params,
    _architecture,
    _collect,
    _layer_from_hf,
    _layer_to_hf,
    _module_from_params,
    _numpy_params,
    _strip,
)
from mlcd_jax.models.presets import TextConfig
from mlcd_jax.models.text import TextTransformer

SUPPORTED_TEXT = ("CLIPTextModel", "CLIPTextModelWithProjection", "CLIPModel")
_TEXT_MODEL_TYPES = {"clip_text_model": "CLIPTextModel", "clip": "CLIPModel"}
_TEXT_PREFIX = "text_model."
_TEXT_PROJ = "text_projection.weight"
_VISION_PREFIXES = ("vision_model.", "visual_projection.", "logit_scale")  # CLIPModel's vision tower
_LEGACY_EOS = 2  # transformers' pre-#24773 default: pool at argmax(ids)
_BOS, _PAD = 49406, 1  # written to config.json for transformers; the forward pass does not use them


def text_config_from_hf(hf: Mapping[str, Any]) -> tuple[TextConfig, str]:
    """Our :class:`TextConfig` and the architecture name from a parsed HF ``config.json``."""
    arch = _architecture(hf, SUPPORTED_TEXT, _TEXT_MODEL_TYPES, kind="text model")
    text = (hf.get("text_config") or {}) if arch == "CLIPModel" else hf
    required = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    absent = [k for k in required if k not in text]
    if absent:
        raise ValueError(f"config.json ({arch}) lacks text field(s) {absent}")
    act = text.get("hidden_act", "quick_gelu")
    if act not in ("gelu", "quick_gelu"):
        raise ValueError(f"hidden_act {act!r} is not supported; supported: 'gelu', 'quick_gelu'")
    proj_dim = None
    if arch == "CLIPModel":
        proj_dim = int(hf.get("projection_dim", 512))
    elif arch == "CLIPTextModelWithProjection":
        proj_dim = int(text.get("projection_dim", 512))
    vocab = int(text.get("vocab_size", 49408))
    eos = int(text.get("eos_token_id", 49407))
    cfg = TextConfig(
        width=int(text["hidden_size"]),
        depth=int(text["num_hidden_layers"]),
        num_heads=int(text["num_attention_heads"]),
        mlp_dim=int(text["intermediate_size"]),
        proj_dim=proj_dim,
        vocab_size=vocab,
        context_length=int(text.get("max_position_embeddings", 77)),
        act=act,
        layer_norm_eps=float(text.get("layer_norm_eps", 1e-5)),
        eos_token_id=vocab - 1 if eos == _LEGACY_EOS else eos,
    )
    return cfg, arch


def text_config_to_hf(cfg: TextConfig) -> dict[str, Any]:
    """A ``config.json`` dict for ``CLIPTextModelWithProjection`` (``CLIPTextModel`` without a projection)."""
    out: dict[str, Any] = {
        "architectures": ["CLIPTextModelWithProjection" if cfg.proj_dim else "CLIPTextModel"],
        "model_type": "clip_text_model",
        "hidden_size": cfg.width,
        "intermediate_size": cfg.mlp_dim,
        "num_hidden_layers": cfg.depth,
        "num_attention_heads": cfg.num_heads,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.context_length,
        "hidden_act": cfg.act,
        "layer_norm_eps": cfg.layer_norm_eps,
        "bos_token_id": _BOS,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": _PAD,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "initializer_factor": 1.0,
    }
    if cfg.proj_dim:
        out["projection_dim"] = cfg.proj_dim
    return out


def text_params_from_hf(tensors: Mapping[str, np.ndarray], cfg: TextConfig) -> Params:
    """Our pure-dict parameters from HF text-tower tensors (``text_model.`` prefix already stripped).

    Raises ``KeyError`` naming every missing tensor and ``ValueError`` naming every unused one.
    """

    def build(get: Callable[[str], np.ndarray]) -> Params:
        params: Params = {
            "token_embed": {"embedding": get("embeddings.token_embedding.weight")},
            "pos_embed": get("embeddings.position_embedding.weight"),
            "blocks": {i: _layer_from_hf(get, i, cfg) for i in range(cfg.depth)},
            "final_ln": {"scale": get("final_layer_norm.weight"), "bias": get("final_layer_norm.bias")},
        }
        if cfg.proj_dim:
            params["proj"] = {"kernel": get(_TEXT_PROJ).T}
        return params

    return _collect(tensors, build)


def text_params_to_hf(params: Params, cfg: TextConfig) -> dict[str, np.ndarray]:
    """HF text-tower tensors (without prefix; the projection under ``text_projection.weight``)."""
    out: dict[str, np.ndarray] = {
        "embeddings.token_embedding.weight": params["token_embed"]["embedding"],
        "embeddings.position_embedding.weight": params["pos_embed"],
        "final_layer_norm.weight": params["final_ln"]["scale"],
        "final_layer_norm.bias": params["final_ln"]["bias"],
    }
    for i in range(cfg.depth):
        out.update(_layer_to_hf(params["blocks"][i], i, cfg))
    if cfg.proj_dim:
        out[_TEXT_PROJ] = params["proj"]["kernel"].T
    return out


def text_from_params(cfg: TextConfig, params: Params, **model_kwargs: Any) -> TextTransformer:
    """A :class:`TextTransformer` holding ``params`` (a pure dict of arrays), shapes checked."""
    return _module_from_params(lambda: TextTransformer(cfg, rngs=nnx.Rngs(0), **model_kwargs), params)


def load_text(path: str, **model_kwargs: Any) -> tuple[TextTransformer, TextConfig]:
    """Loads an HF CLIP text checkpoint directory (or a ``CLIPModel``'s text half) into a :class:`TextTransformer`.

    ``model(ids)`` then returns HF's ``text_embeds`` (``pooler_output`` for a ``CLIPTextModel``) and
    ``model.encode(ids)`` its ``(pooler_output, last_hidden_state)``. ``model_kwargs`` go to
    :class:`TextTransformer` (``dtype``, ``param_dtype``, ``attention_impl``, ``remat``).
    """
    cfg, arch = read_config(path, text_config_from_hf)
    tensors = _strip(read_safetensors(path), _TEXT_PREFIX, _VISION_PREFIXES)
    try:
        params = text_params_from_hf(tensors, cfg)
        model = text_from_params(cfg, params, **model_kwargs)
    except (KeyError, ValueError) as err:  # missing / unused tensors, or shapes config.json does not fit
        raise InteropError(f"the weights in {path} do not fit its config.json ({arch}, width {cfg.width}, "
                           f"depth {cfg.depth}, vocab {cfg.vocab_size}): {str(err)[:300]}") from None
    logging.info("loaded the text tower of %s from %s: %s", arch, path, cfg)
    return model, cfg


def save_text(model: TextTransformer, path: str, *, max_shard_bytes: int = 5 * 2**30) -> None:
    """Writes ``model`` as a transformers ``CLIPTextModelWithProjection`` directory (``CLIPTextModel``
    when the config has no projection); tensors keep the parameter dtype, sharded past
    ``max_shard_bytes``. In a multi-host job every process must call this; process 0 writes."""
    cfg = model.config
    tower = text_params_to_hf(_numpy_params(model), cfg)
    tensors = {(k if k == _TEXT_PROJ else _TEXT_PREFIX + k): np.ascontiguousarray(v) for k, v in tower.items()}
    write_checkpoint(tensors, text_config_to_hf(cfg), path, max_shard_bytes)
