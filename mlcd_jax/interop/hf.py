"""Hugging Face vision checkpoints (``config.json`` + safetensors) <-> :class:`VisionTransformer`.

Supported architectures: ``CLIPVisionModel``, ``CLIPVisionModelWithProjection``, ``MLCDVisionModel``
(2-D RoPE), and for loading also the vision tower (+ ``visual_projection``) of a full ``CLIPModel``.
Loading needs no torch: tensors are read with ``safetensors`` (its ``flax`` reader, on the CPU
device, because the ``numpy`` reader cannot read bf16).

Key names: checkpoints written by transformers 4.x (and the released DeepGlint ones) prefix the
tower with ``vision_model.``; transformers 5 writes ``CLIPVisionModel``/``MLCDVisionModel`` without
it and strips it on load. We read both and write the prefixed layout, which both major versions load.

Layout conversion (HF is torch, ``[out, in]`` linears, NCHW conv):
q/k/v_proj ``[W, W]`` -> fused ``qkv_kernel [W, 3, heads, head_dim]``; out_proj -> ``[heads, head_dim, W]``;
fc1/fc2/visual_projection transposed; patch conv ``[W, C, p, p]`` -> ``[p, p, C, W]``.

CLIP's text tower (:mod:`mlcd_jax.interop.hf_text`) reuses the per-layer conversion here; both read and
write the directory's files through :mod:`mlcd_jax.interop.files`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from mlcd_jax.interop.files import InteropError, read_config, read_safetensors, write_checkpoint
from mlcd_jax.models.presets import TextConfig, ViTConfig
from mlcd_jax.models.vit import VisionTransformer, resize_pos_embed

SUPPORTED = ("CLIPVisionModel", "CLIPVisionModelWithProjection", "MLCDVisionModel", "CLIPModel")
_MODEL_TYPES = {
    "clip_vision_model": "CLIPVisionModel",
    "mlcd_vision_model": "MLCDVisionModel",
    "clip": "CLIPModel",
}
_PREFIX = "vision_model."
_PROJ = "visual_projection.weight"
_IGNORED_SUFFIXES = ("position_ids",)  # non-persistent buffers some old checkpoints contain
_IGNORED_PREFIXES = ("text_model.", "text_projection.", "logit_scale")  # CLIPModel's text tower

Params = dict[str, Any]
_Module = TypeVar("_Module", bound=nnx.Module)


# ---------------------------------------------------------------------------------------- config


def _architecture(
    hf: Mapping[str, Any],
    supported: tuple[str, ...] = SUPPORTED,
    model_types: Mapping[str, str] = _MODEL_TYPES,
    kind: str = "vision model",
) -> str:
    """The config's architecture (its first ``architectures`` entry, else from ``model_type``), checked."""
    archs = hf.get("architectures") or []
    arch = archs[0] if archs else model_types.get(str(hf.get("model_type")))
    if arch not in supported:
        raise ValueError(
            f"unsupported architecture {arch or hf.get('model_type')!r} in config.json (not a CLIP/MLCD "
            f"{kind}); supported: {supported}"
        )
    return arch


def _square(value: int | list[int] | tuple[int, ...], name: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ValueError(f"config.json {name}={list(value)} is not square; only square sizes are supported")
        value = value[0]
    return int(value)


def config_from_hf(hf: Mapping[str, Any]) -> tuple[ViTConfig, str]:
    """Our :class:`ViTConfig` and the architecture name from a parsed HF ``config.json``."""
    arch = _architecture(hf)
    vision = (hf.get("vision_config") or {}) if arch == "CLIPModel" else hf
    required = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "patch_size", "image_size")
    absent = [k for k in required if k not in vision]
    if absent:
        raise ValueError(f"config.json ({arch}) lacks vision field(s) {absent}")
    act = vision.get("hidden_act", "gelu" if arch == "MLCDVisionModel" else "quick_gelu")
    if act not in ("gelu", "quick_gelu"):
        raise ValueError(f"hidden_act {act!r} is not supported; supported: 'gelu', 'quick_gelu'")
    if int(vision.get("num_key_value_groups", 1)) != 1:
        raise ValueError(f"num_key_value_groups={vision['num_key_value_groups']} is not supported (only 1)")
    rope = arch == "MLCDVisionModel"
    rope_params = vision.get("rope_parameters") or {}
    if rope and rope_params.get("rope_type", "axial") != "axial":
        raise ValueError(f"rope_type {rope_params['rope_type']!r} is not supported (only 'axial')")
    proj_dim = None
    if arch in ("CLIPVisionModelWithProjection", "CLIPModel"):
        proj_dim = int(hf.get("projection_dim") or vision.get("projection_dim"))
    cfg = ViTConfig(
        width=int(vision["hidden_size"]),
        depth=int(vision["num_hidden_layers"]),
        num_heads=int(vision["num_attention_heads"]),
        mlp_dim=int(vision["intermediate_size"]),
        patch_size=_square(vision["patch_size"], "patch_size"),
        image_size=_square(vision["image_size"], "image_size"),
        num_channels=int(vision.get("num_channels", 3)),
        act=act,
        rope=rope,
        proj_dim=proj_dim,
        layer_norm_eps=float(vision.get("layer_norm_eps", 1e-5)),
        rope_theta=float(rope_params.get("rope_theta", vision.get("rope_theta", 10000.0))),
    )
    return cfg, arch


def config_to_hf(cfg: ViTConfig, arch: str) -> dict[str, Any]:
    """A ``config.json`` dict that ``transformers`` builds ``arch`` from."""
    out: dict[str, Any] = {
        "architectures": [arch],
        "model_type": "mlcd_vision_model" if cfg.rope else "clip_vision_model",
        "hidden_size": cfg.width,
        "intermediate_size": cfg.mlp_dim,
        "num_hidden_layers": cfg.depth,
        "num_attention_heads": cfg.num_heads,
        "num_channels": cfg.num_channels,
        "image_size": cfg.image_size,
        "patch_size": cfg.patch_size,
        "hidden_act": cfg.act,
        "layer_norm_eps": cfg.layer_norm_eps,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "initializer_factor": 1.0,
    }
    if cfg.rope:
        out["num_key_value_groups"] = 1
        out["rope_parameters"] = {"rope_theta": cfg.rope_theta, "rope_type": "axial"}
    else:
        out["projection_dim"] = cfg.proj_dim or cfg.width
    return out


# --------------------------------------------------------------------------------------- tensors


def _strip(
    tensors: Mapping[str, np.ndarray], prefix: str = _PREFIX, ignored: tuple[str, ...] = _IGNORED_PREFIXES
) -> dict[str, np.ndarray]:
    """Tower tensors without ``prefix``; drops buffers and keys starting with ``ignored`` (the other tower)."""
    out: dict[str, np.ndarray] = {}
    for key, value in tensors.items():
        if key.endswith(_IGNORED_SUFFIXES) or key.startswith(ignored):
            continue
        out[key[len(prefix):] if key.startswith(prefix) else key] = value
    return out


def _collect(tensors: Mapping[str, np.ndarray], build: Callable[[Callable[[str], np.ndarray]], Params]) -> Params:
    """``build(get)``, where ``get(key)`` reads a tensor; every tensor must be read exactly as asked.

    Raises ``KeyError`` naming every missing tensor and ``ValueError`` naming every unused one.
    """
    missing: list[str] = []
    used: set[str] = set()

    def get(key: str) -> np.ndarray:
        if key not in tensors:
            missing.append(key)
            return np.zeros(())
        used.add(key)
        return np.asarray(tensors[key])

    params = build(get)
    if missing:
        raise KeyError(f"checkpoint is missing {len(missing)} tensor(s): {missing}")
    unused = sorted(set(tensors) - used)
    if unused:
        raise ValueError(f"checkpoint has {len(unused)} tensor(s) this config does not use: {unused}")
    return params


def _layer_from_hf(get: Callable[[str], np.ndarray], i: int, cfg: ViTConfig | TextConfig) -> Params:
    """Block ``i`` (``encoder.layers.{i}.``, the same keys in CLIP's vision and text towers) as our params."""
    h, d, w = cfg.num_heads, cfg.head_dim, cfg.width
    p = f"encoder.layers.{i}."
    qkv = [get(f"{p}self_attn.{n}_proj.weight").T.reshape(w, h, d) for n in "qkv"]
    return {
        "ln1": {"scale": get(p + "layer_norm1.weight"), "bias": get(p + "layer_norm1.bias")},
        "ln2": {"scale": get(p + "layer_norm2.weight"), "bias": get(p + "layer_norm2.bias")},
        "attn": {
            "qkv_kernel": np.stack(qkv, axis=1),
            "qkv_bias": np.stack([get(f"{p}self_attn.{n}_proj.bias").reshape(h, d) for n in "qkv"]),
            "out_kernel": get(p + "self_attn.out_proj.weight").T.reshape(h, d, w),
            "out_bias": get(p + "self_attn.out_proj.bias"),
        },
        "fc1": {"kernel": get(p + "mlp.fc1.weight").T, "bias": get(p + "mlp.fc1.bias")},
        "fc2": {"kernel": get(p + "mlp.fc2.weight").T, "bias": get(p + "mlp.fc2.bias")},
    }


def _layer_to_hf(layer: Params, i: int, cfg: ViTConfig | TextConfig) -> dict[str, np.ndarray]:
    """Our block params as HF's ``encoder.layers.{i}.`` tensors."""
    w = cfg.width
    p = f"encoder.layers.{i}."
    attn = layer["attn"]
    out = {
        p + "layer_norm1.weight": layer["ln1"]["scale"], p + "layer_norm1.bias": layer["ln1"]["bias"],
        p + "layer_norm2.weight": layer["ln2"]["scale"], p + "layer_norm2.bias": layer["ln2"]["bias"],
        p + "self_attn.out_proj.weight": attn["out_kernel"].reshape(w, w).T,
        p + "self_attn.out_proj.bias": attn["out_bias"],
        p + "mlp.fc1.weight": layer["fc1"]["kernel"].T, p + "mlp.fc1.bias": layer["fc1"]["bias"],
        p + "mlp.fc2.weight": layer["fc2"]["kernel"].T, p + "mlp.fc2.bias": layer["fc2"]["bias"],
    }
    for j, n in enumerate("qkv"):
        out[f"{p}self_attn.{n}_proj.weight"] = attn["qkv_kernel"][:, j].reshape(w, w).T
        out[f"{p}self_attn.{n}_proj.bias"] = attn["qkv_bias"][j].reshape(w)
    return out


def params_from_hf(tensors: Mapping[str, np.ndarray], cfg: ViTConfig, scan_layers: bool = False) -> Params:
    """Our pure-dict parameters from HF tower tensors (prefix already stripped).

    Raises ``KeyError`` naming every missing tensor and ``ValueError`` naming every unused one.
    """

    def build(get: Callable[[str], np.ndarray]) -> Params:
        params: Params = {
            "blocks": [_layer_from_hf(get, i, cfg) for i in range(cfg.depth)],
            "patch_embed": {"kernel": get("embeddings.patch_embedding.weight").transpose(2, 3, 1, 0)},
            "class_embedding": get("embeddings.class_embedding"),
            "pre_ln": {"scale": get("pre_layrnorm.weight"), "bias": get("pre_layrnorm.bias")},
            "post_ln": {"scale": get("post_layernorm.weight"), "bias": get("post_layernorm.bias")},
        }
        if cfg.rope:
            params["class_pos_emb"] = get("class_pos_emb")
        else:
            params["pos_embed"] = get("embeddings.position_embedding.weight")
        if cfg.proj_dim:
            params["proj"] = {"kernel": get(_PROJ).T}
        return params

    params = _collect(tensors, build)
    layers = params.pop("blocks")
    if scan_layers:
        params["blocks"] = jax.tree.map(lambda *xs: np.stack(xs), *layers)
    else:
        params["blocks"] = dict(enumerate(layers))
    return params


def params_to_hf(params: Params, cfg: ViTConfig, scan_layers: bool) -> dict[str, np.ndarray]:
    """HF tower tensors (without prefix; the projection under ``visual_projection.weight``)."""
    blocks = params["blocks"]
    if scan_layers:
        layers = [jax.tree.map(lambda x, i=i: x[i], blocks) for i in range(cfg.depth)]
    else:
        layers = [blocks[i] for i in range(cfg.depth)]
    out: dict[str, np.ndarray] = {
        "embeddings.patch_embedding.weight": params["patch_embed"]["kernel"].transpose(3, 2, 0, 1),
        "embeddings.class_embedding": params["class_embedding"],
        "pre_layrnorm.weight": params["pre_ln"]["scale"], "pre_layrnorm.bias": params["pre_ln"]["bias"],
        "post_layernorm.weight": params["post_ln"]["scale"], "post_layernorm.bias": params["post_ln"]["bias"],
    }
    if cfg.rope:
        out["class_pos_emb"] = params["class_pos_emb"]
    else:
        out["embeddings.position_embedding.weight"] = params["pos_embed"]
    for i, layer in enumerate(layers):
        out.update(_layer_to_hf(layer, i, cfg))
    if cfg.proj_dim:
        out[_PROJ] = params["proj"]["kernel"].T
    return out


# ------------------------------------------------------------------------------------------- API


def load_vision(
    path: str, *, image_size: int | None = None, scan_layers: bool = False, **model_kwargs: Any
) -> tuple[VisionTransformer, ViTConfig]:
    """Loads an HF vision checkpoint directory into a :class:`VisionTransformer`.

    ``model(pixels_nhwc)`` then returns HF's ``(pooler_output | image_embeds, last_hidden_state)``.
    ``image_size`` re-targets the model (the position table is resampled once, bicubically, as HF's
    ``interpolate_pos_encoding`` does per call); other sizes also work per call without it.
    ``model_kwargs`` go to :class:`VisionTransformer` (``dtype``, ``attention_impl``, ``remat`` ...).
    """
    cfg, arch = read_config(path, config_from_hf)
    tensors = _strip(read_safetensors(path))
    try:
        params = params_from_hf(tensors, cfg, scan_layers=scan_layers)
    except (KeyError, ValueError) as err:  # missing / unused tensors, or shapes config.json does not fit
        raise InteropError(f"the weights in {path} do not fit its config.json ({arch}, width {cfg.width}, "
                           f"depth {cfg.depth}, patch {cfg.patch_size}): {str(err)[:300]}") from None
    if image_size is not None and image_size != cfg.image_size:
        cfg = dataclasses.replace(cfg, image_size=image_size)
        if not cfg.rope:
            table = jnp.asarray(params["pos_embed"], jnp.float32)  # fp32 also for bf16 checkpoints
            params["pos_embed"] = np.asarray(resize_pos_embed(table, (cfg.grid_size, cfg.grid_size)))
    model = from_params(cfg, params, scan_layers=scan_layers, **model_kwargs)
    logging.info("loaded %s from %s: %s", arch, path, cfg)
    return model, cfg


def from_params(cfg: ViTConfig, params: Params, **model_kwargs: Any) -> VisionTransformer:
    """A :class:`VisionTransformer` holding ``params`` (a pure dict of arrays), shapes checked."""
    return _module_from_params(lambda: VisionTransformer(cfg, rngs=nnx.Rngs(0), **model_kwargs), params)


def _module_from_params(create: Callable[[], _Module], params: Params) -> _Module:
    """The module ``create()`` builds, holding ``params`` (a pure dict) in its parameter dtypes, shapes checked."""
    abstract = nnx.eval_shape(create)
    graphdef, state = nnx.split(abstract)
    expected = state.to_pure_dict()
    want = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(expected)}
    got = {jax.tree_util.keystr(k): np.shape(v) for k, v in jax.tree_util.tree_leaves_with_path(params)}
    bad = {k: (got.get(k), want.get(k)) for k in set(want) | set(got) if got.get(k) != want.get(k)}
    if bad:
        raise ValueError(f"parameter shapes do not match the config (got, want): {dict(sorted(bad.items()))}")
    dtypes = jax.tree.map(lambda v: v.dtype, expected)
    state.replace_by_pure_dict(jax.tree.map(lambda v, dt: jnp.asarray(v, dt), params, dtypes))
    return nnx.merge(graphdef, state)


def _to_numpy(x: jax.Array) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        x = multihost_utils.process_allgather(x, tiled=True)
    return np.ascontiguousarray(np.asarray(x))


def _numpy_params(model: nnx.Module) -> Params:
    """The model's parameters as a pure dict of host numpy arrays (gathered across processes)."""
    return jax.tree.map(_to_numpy, nnx.state(model, nnx.Param).to_pure_dict())


def hf_tensors(
    model: VisionTransformer, *, drop_projection: bool = False
) -> tuple[dict[str, np.ndarray], ViTConfig, str]:
    """The model's tensors under HF key names (``vision_model.`` layout), the exported config, the architecture."""
    cfg = model.config
    if drop_projection and cfg.proj_dim:
        cfg = dataclasses.replace(cfg, proj_dim=None)
    if cfg.rope and cfg.proj_dim:
        raise ValueError(
            "MLCDVisionModel has no projection but this model has proj_dim="
            f"{cfg.proj_dim}; pass drop_projection=True to export the tower without it"
        )
    tower = params_to_hf(_numpy_params(model), cfg, model.scan_layers)
    tensors = {(k if k == _PROJ else _PREFIX + k): np.ascontiguousarray(v) for k, v in tower.items()}
    arch = "MLCDVisionModel" if cfg.rope else (
        "CLIPVisionModelWithProjection" if cfg.proj_dim else "CLIPVisionModel"
    )
    return tensors, cfg, arch


def save_vision(
    model: VisionTransformer, path: str, *, drop_projection: bool = False, max_shard_bytes: int = 5 * 2**30
) -> None:
    """Writes ``model`` as a transformers checkpoint directory (``config.json`` + safetensors).

    The architecture follows the config: ``MLCDVisionModel`` with RoPE, else
    ``CLIPVisionModelWithProjection`` with a projection (``drop_projection=True`` writes the plain
    ``CLIPVisionModel`` tower, e.g. for LLaVA), else ``CLIPVisionModel``. Tensors keep the parameter
    dtype; files over ``max_shard_bytes`` are split with a ``model.safetensors.index.json``. In a
    multi-host job every process must call this (arrays are gathered); process 0 writes.
    """
    tensors, cfg, arch = hf_tensors(model, drop_projection=drop_projection)
    write_checkpoint(tensors, config_to_hf(cfg, arch), path, max_shard_bytes)
