"""Image–text objectives with CLIP's symmetric InfoNCE over the global batch (``loss.kind`` = ``clip`` /
``lit``), and :class:`ImageText`, what every image–text objective shares: the text tower (``text``),
a learnable temperature (``logit_scale``), tokenised captions in the batches, towers read from
``loss.image_tower`` / ``loss.text_tower``.

- ``clip``: CLIP from scratch, both towers and the temperature; FLIP is ``clip`` with ``data.patch_drop``.
- ``lit``: LiT, the text tower and temperature trained against a locked image tower (``params``, loaded
  from ``loss.image_tower``: a workdir, an HF checkpoint, or random init).
"""

from __future__ import annotations

from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.sharding import Mesh

from mlcd_jax import sharding
from mlcd_jax.config_lib import ConfigError
from mlcd_jax.losses.contrastive import INIT_LOG_SCALE, LOG_SCALE_RANGE, contrastive_loss
from mlcd_jax.objectives.base import Objective, register
from mlcd_jax.runs import AbstractModel, build_text_model, check_tower_spec, load_tower, text_config, vit_config


class ImageText(Objective):
    """The image–text objectives' shared parts; a subclass names its kinds, keys and :meth:`loss`."""

    text = True
    bounds = {"logit_scale": LOG_SCALE_RANGE}  # clipped after each update, as CLIP's
    init_log_scale: ClassVar[float] = INIT_LOG_SCALE  # the temperature's start when loss.init_logit_scale is None

    def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh, rules: sharding.Rules,
                 image: AbstractModel) -> None:
        super().__init__(config, mesh, rules, image)
        self.models["text"] = AbstractModel.create(config, mesh, text=True)

    @classmethod
    def validate(cls, config: ml_collections.ConfigDict) -> None:
        """The text tower's preset and its embedding width (it must equal the image tower's), the towers' specs."""
        try:
            text_cfg = text_config(config)
        except (KeyError, TypeError, ValueError) as err:
            raise ConfigError(f"text {config.text.name!r}: {err}") from None
        image_dim = vit_config(config).embed_dim
        if text_cfg.embed_dim != image_dim:
            raise ConfigError(
                f"text.overrides.proj_dim={text_cfg.proj_dim} but the image tower embeds into {image_dim}: "
                "the contrastive loss compares them, make them equal"
            )
        for key in ("image_tower", "text_tower"):
            spec = config.loss.get(key, "")
            if spec:
                check_tower_spec(spec, key)
        init, (low, high) = config.loss.get("init_logit_scale"), LOG_SCALE_RANGE
        if init is not None and not low <= init <= high:
            raise ConfigError(f"loss.init_logit_scale={init} is outside [{low}, ln 100 = {high:.4f}], "
                              "where training keeps the log temperature")

    @classmethod
    def loader_options(cls, config: ml_collections.ConfigDict) -> dict[str, Any]:
        return {"context_length": config.text.context_length}

    @classmethod
    def input_specs(cls, config: ml_collections.ConfigDict) -> dict[str, tuple[tuple[int, ...], Any]]:
        return {"tokens": ((config.text.context_length,), jnp.int32)}

    def init(self, keys: tuple[jax.Array, jax.Array]) -> dict[str, Any]:
        """A random text tower and the log temperature at ``loss.init_logit_scale`` (None: the objective's
        :attr:`init_log_scale`, CLIP's ln(1/0.07))."""
        init = self.config.loss.get("init_logit_scale")
        return {"text": nnx.state(build_text_model(self.config, keys[1])).to_pure_dict(),
                "logit_scale": jnp.asarray(self.init_log_scale if init is None else init, jnp.float32)}

    def load_weights(self, state: dict[str, Any], shardings: dict[str, Any]) -> dict[str, Any]:
        """A locked image tower from ``loss.image_tower``, a text tower to start from from ``loss.text_tower``."""
        loss = self.config.loss
        towers = [("params", "image_tower", False)] if "params" in self.frozen else []
        towers += [("text", "text_tower", True)]  # e.g. ProtoCLIP's final LiT phase
        for key, option, text in towers:
            if loss.get(option):
                params = nnx.state(load_tower(loss[option], self.config, text=text)).to_pure_dict()
                if jax.tree.structure(params) != jax.tree.structure(shardings[key]):
                    raise ConfigError(f"loss.{option}={loss[option]}: its layers are stored otherwise than this run's "
                                      "(model.scan_layers differs); set model.scan_layers to the tower's")
                state[key] = jax.device_put(params, shardings[key])
        return state

    def encode_text(self, tensors: dict[str, Any], batch: dict[str, jax.Array]) -> jax.Array:
        """The text tower's embeddings [B, d] of the batch's tokens."""
        with self.on_mesh():
            return self.models["text"].merge(tensors["text"])(batch["tokens"])

    def log_terms(self, scalars: dict[str, Any]) -> str:
        return f"i2t {scalars['loss_i2t']:.3f} t2i {scalars['loss_t2i']:.3f}, scale {scalars['logit_scale']:.1f}"

    def describe(self) -> str:
        return f"text tower {self.config.text.name}, context {self.config.text.context_length}"


class InfoNCE(ImageText):
    """CLIP's symmetric InfoNCE of the batch's image and text embeddings."""

    def loss(self, tensors: dict[str, Any], image: jax.Array, batch: dict[str, jax.Array],
             key: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        return contrastive_loss(image, self.encode_text(tensors, batch), tensors["logit_scale"])


@register
class CLIP(InfoNCE):
    """Both towers and the temperature from scratch (FLIP with ``data.patch_drop`` > 0)."""

    kinds = ("clip",)
    trainable = ("params", "text", "logit_scale")
    groups = {"params": "backbone", "text": "backbone", "logit_scale": "scale"}

    @classmethod
    def row_name(cls, config: ml_collections.ConfigDict) -> str:
        return "FLIP ViT" if config.data.get("patch_drop", 0.0) > 0 else "CLIP ViT"


@register
class LiT(InfoNCE):
    """The text tower and the temperature against the locked image tower of ``loss.image_tower``."""

    kinds = ("lit",)
    trainable = ("text", "logit_scale")
    frozen = ("params",)
    groups = {"text": "backbone", "logit_scale": "scale"}

    @classmethod
    def row_name(cls, config: ml_collections.ConfigDict) -> str:
        return "LiT ViT"
