"""Runs and their models: the ViT a config describes, a run's saved config, and its trained backbone.

What the trainer, the clustering job's ``checkpoint:`` teacher, evaluation and notebooks share, so none
of them reaches into the training loop for it. A trained backbone is read without the prototypes or
the optimizer state, on whatever devices this process has.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.sharding import Mesh

from mlcd_jax import checkpointing, identity, sharding
from mlcd_jax.config_lib import ConfigError
from mlcd_jax.models import TextConfig, TextTransformer, VisionTransformer, ViTConfig, get_preset, get_text_preset

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def check_dtype(key: str, value: str, optional: bool = True) -> None:
    """One-line :class:`ConfigError` unless ``value`` names one of :data:`DTYPES` (or, ``optional``, is
    empty: float32)."""
    if (value or not optional) and value not in DTYPES:
        raise ConfigError(f"{key}={value!r}: choose one of {', '.join(DTYPES)}" + (" (or '' for float32)" if optional else ""))


def vit_config(config: ml_collections.ConfigDict) -> ViTConfig:
    """The ViT preset named by ``config.model.name`` with ``config.model.overrides`` and the data's image size."""
    overrides = dict(config.model.get("overrides", {}) or {})
    overrides.setdefault("image_size", config.data.image_size)
    return get_preset(config.model.name, **overrides)


def attention_impl(config: ml_collections.ConfigDict) -> str | None:
    """``model.attention``, or where unset cuDNN's fused attention on a GPU with bf16/fp16 compute (the
    fast path there) and JAX's default elsewhere."""
    if config.model.get("attention"):
        return config.model.attention
    gpu = jax.default_backend() == "gpu"
    return "cudnn" if gpu and config.model.dtype in ("bfloat16", "float16") else None


def build_model(config: ml_collections.ConfigDict, seed: int | jax.Array) -> VisionTransformer:
    """The ViT with the run's compute dtype, attention, remat, scan and drop-path options."""
    m = config.model
    return VisionTransformer(
        vit_config(config),
        rngs=nnx.Rngs(seed),
        dtype=DTYPES[m.dtype],
        attention_impl=attention_impl(config),
        remat=m.get("remat") or None,
        scan_layers=bool(m.get("scan_layers", False)),
        drop_path_rate=float(m.get("drop_path", 0.0)),
    )


def text_config(config: ml_collections.ConfigDict) -> TextConfig:
    """The text-tower preset ``config.text.name`` with ``config.text.overrides``; its context length is
    ``config.text.context_length`` and its projection width the image tower's embedding width unless
    overridden."""
    overrides = dict(config.text.get("overrides", {}) or {})
    overrides.setdefault("context_length", config.text.context_length)
    overrides.setdefault("proj_dim", vit_config(config).embed_dim)
    return get_text_preset(config.text.name, **overrides)


def build_text_model(config: ml_collections.ConfigDict, seed: int | jax.Array) -> TextTransformer:
    """The text tower with the run's compute dtype and attention options."""
    m = config.model
    return TextTransformer(
        text_config(config), rngs=nnx.Rngs(seed), dtype=DTYPES[m.dtype], attention_impl=attention_impl(config),
    )


# loss.image_tower / loss.text_tower: where a tower's starting weights come from ("" = random init).
TOWER_PREFIXES = ("workdir:", "hf:", "hf-hub:")


def check_tower_spec(spec: str, key: str) -> None:
    """One ConfigError line for a ``loss.<key>`` spec that names no known source of weights."""
    if not spec.startswith(TOWER_PREFIXES):
        raise ConfigError(f"loss.{key}={spec!r}: use workdir:DIR, hf:DIR, hf-hub:ORG/NAME, or '' (random init)")


def load_tower(spec: str, config: ml_collections.ConfigDict, text: bool = False) -> nnx.Module:
    """The image tower (LiT's locked one) or, with ``text``, the text tower that ``spec`` names:
    ``workdir:DIR`` (a trained run's), ``hf:DIR`` (an HF CLIP / MLCD checkpoint) or ``hf-hub:ORG/NAME[@REV]``
    (one on the hub, through its cache: :mod:`mlcd_jax.interop.hub`). Its shape must be the
    one ``config.model`` (``config.text``) describes; ``{seed}`` in ``DIR`` becomes ``config.seed``."""
    key = "text_tower" if text else "image_tower"
    check_tower_spec(spec, key)
    kind, _, path = spec.partition(":")
    path = path.replace("{seed}", str(config.seed))  # one tower per seed, e.g. workdir:STUDY/runs/mlcd/seed{seed}
    from mlcd_jax import interop
    from mlcd_jax.interop import hub

    try:
        if kind == "workdir":
            model = load_model(path, text=text)  # with the run's own config; its shape is compared below
        else:
            path = hub.snapshot_dir(f"{kind}:{path}")
            model = (interop.load_text(path)[0] if text else
                     interop.load_vision(path, image_size=config.data.image_size,
                                         scan_layers=bool(config.model.get("scan_layers", False)))[0])
    except (OSError, ValueError, KeyError, AttributeError) as err:  # missing run, not a checkpoint, no such tower
        raise ConfigError(f"loss.{key}={spec}: cannot load it ({type(err).__name__}: {str(err)[:300]})") from None
    want = text_config(config) if text else vit_config(config)
    if model.config != want:
        raise ConfigError(f"loss.{key}={spec}: the tower is {model.config}, but config.{'text' if text else 'model'} "
                          f"describes {want}; set its name / overrides to match")
    return model


def sharding_rules(config: ml_collections.ConfigDict) -> sharding.Rules:
    """The run's logical-axis rules: the one table with ``config.mesh_rules``' overrides applied."""
    return sharding.parse_rules(config.get("mesh_rules", "") or "")


@dataclasses.dataclass(frozen=True)
class AbstractModel:
    """The model's structure without arrays: its graph, abstract parameters and their shardings."""

    graphdef: Any
    params: Any  # nnx.State of abstract Variables (carries the logical annotations)
    shardings: dict[str, Any]  # pure dict of NamedSharding, from the one rules table

    @classmethod
    def create(cls, config: ml_collections.ConfigDict, mesh: Mesh, text: bool = False) -> "AbstractModel":
        """The image tower of ``config`` (or, with ``text``, its text tower) on ``mesh``."""
        build = build_text_model if text else build_model
        return cls.of(lambda: build(config, 0), mesh, sharding_rules(config))

    @classmethod
    def of(cls, build: Callable[[], nnx.Module], mesh: Mesh, rules: sharding.Rules) -> "AbstractModel":
        """The module ``build()`` makes, abstractly, with its parameters' shardings on ``mesh``."""
        graphdef, params = nnx.split(nnx.eval_shape(build))
        shardings = sharding.state_shardings(params, mesh, rules)
        return cls(graphdef, params, shardings.to_pure_dict())

    def abstract_arrays(self) -> dict[str, Any]:
        """Pure dict of ShapeDtypeStruct in their shardings (what a restore reads into)."""
        return jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s),
                            self.params.to_pure_dict(), self.shardings)

    def merge(self, params: Any) -> nnx.Module:
        """A model object from pure-dict parameters (inside or outside jit)."""
        return nnx.merge(self.graphdef, filled(self.params, params))


def filled(abstract: nnx.State, pure: Any) -> nnx.State:
    """A copy of the abstract state ``abstract`` holding the pure dict ``pure``'s arrays (for ``nnx.merge``)."""
    state = jax.tree.map(lambda x: x, abstract)
    state.replace_by_pure_dict(pure)
    return state


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a run in ``workdir`` trains with (``workdir/config.json``, without its history of changes)."""
    return identity.run_config(workdir)


def load_model(
    workdir: str, config: ml_collections.ConfigDict | None = None, step: int | None = None, text: bool = False,
    devices: list[jax.Device] | None = None,
) -> nnx.Module:
    """The image tower of a trained run (or, with ``text``, its text tower), from the newest checkpoint
    that restores or ``step``, sharded as ``config.mesh`` says over ``devices`` (default: all of the run's,
    every process calling).

    ``config`` defaults to the one saved in ``workdir``. Only that tower's parameters are read (not the
    prototypes or the optimizer state), on whatever device count the run has.
    """
    config = load_run_config(workdir) if config is None else config
    model = AbstractModel.create(config, sharding.make_mesh(dict(config.mesh), devices), text=text)
    manager = checkpointing.create_manager(workdir, keep=1, async_save=False)
    try:
        restored = checkpointing.restore_params(manager, model.abstract_arrays(), step=step,
                                                key="text" if text else "params")
    except checkpointing.CheckpointMismatch as err:  # the config's model is not the run's: nothing is read
        raise ConfigError(str(err)) from None
    finally:
        manager.close()
    if restored is None:
        raise FileNotFoundError(f"no checkpoint under {workdir}/checkpoints")
    return model.merge(restored[0])
