"""Runs and their models: the ViT a config describes, a run's saved config, and its trained backbone.

What the trainer, the clustering job's ``checkpoint:`` teacher, evaluation and notebooks share, so none
of them reaches into the training loop for it. A trained backbone is read without the prototypes or
the optimizer state, on whatever devices this process has.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from etils import epath
from flax import nnx
from jax.sharding import Mesh

from mlcd_jax import checkpointing, sharding
from mlcd_jax.models import VisionTransformer, ViTConfig, get_preset

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def vit_config(config: ml_collections.ConfigDict) -> ViTConfig:
    """The ViT preset named by ``config.model.name`` with ``config.model.overrides`` and the data's image size."""
    overrides = dict(config.model.get("overrides", {}) or {})
    overrides.setdefault("image_size", config.data.image_size)
    return get_preset(config.model.name, **overrides)


def build_model(config: ml_collections.ConfigDict, seed: int | jax.Array) -> VisionTransformer:
    """The ViT with the run's compute dtype, attention, remat, scan and drop-path options."""
    m = config.model
    return VisionTransformer(
        vit_config(config),
        rngs=nnx.Rngs(seed),
        dtype=DTYPES[m.dtype],
        attention_impl=m.get("attention") or None,
        remat=m.get("remat") or None,
        scan_layers=bool(m.get("scan_layers", False)),
        drop_path_rate=float(m.get("drop_path", 0.0)),
    )


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
    def create(cls, config: ml_collections.ConfigDict, mesh: Mesh) -> "AbstractModel":
        graphdef, params = nnx.split(nnx.eval_shape(lambda: build_model(config, 0)))
        shardings = sharding.state_shardings(params, mesh, sharding_rules(config))
        return cls(graphdef, params, shardings.to_pure_dict())

    def abstract_arrays(self) -> dict[str, Any]:
        """Pure dict of ShapeDtypeStruct in their shardings (what a restore reads into)."""
        return jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s),
                            self.params.to_pure_dict(), self.shardings)

    def merge(self, params: Any) -> VisionTransformer:
        """A model object from pure-dict parameters (inside or outside jit)."""
        state = jax.tree.map(lambda x: x, self.params)
        state.replace_by_pure_dict(params)
        return nnx.merge(self.graphdef, state)


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a run in ``workdir`` was trained with (``workdir/config.json``, written at its start)."""
    path = epath.Path(workdir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: {workdir} is not a mlcd_jax training workdir")
    return ml_collections.ConfigDict(json.loads(path.read_text(encoding="utf-8")))


def load_model(
    workdir: str, config: ml_collections.ConfigDict | None = None, step: int | None = None
) -> VisionTransformer:
    """The backbone of a trained run (newest checkpoint that restores, or ``step``) on the local devices.

    ``config`` defaults to the one saved in ``workdir``. Only the backbone parameters are read (not the
    prototypes or the optimizer state), on whatever device count this process has.
    """
    config = load_run_config(workdir) if config is None else config
    model = AbstractModel.create(config, sharding.make_mesh(dict(config.mesh)))
    manager = checkpointing.create_manager(workdir, keep=1, async_save=False)
    try:
        restored = checkpointing.restore_params(manager, model.abstract_arrays(), step=step)
    finally:
        manager.close()
    if restored is None:
        raise FileNotFoundError(f"no checkpoint under {workdir}/checkpoints")
    return model.merge(restored[0])
