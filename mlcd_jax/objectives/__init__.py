"""The objectives of the one trainer, by ``loss.kind``: :func:`get` names the class, :func:`create` binds
it to a run.

Each module of this package says what its objectives train, e.g. :mod:`~mlcd_jax.objectives.cluster`
(mlcd / mlc / softmax), :mod:`~mlcd_jax.objectives.contrastive` (clip / lit) and
:mod:`~mlcd_jax.objectives.protoclip`; :data:`REGISTRY` lists them all by kind.

Every module of this package is imported here (``pkgutil``) and registers its classes itself
(:func:`~mlcd_jax.objectives.base.register`), so a new objective is one new module.
"""

import importlib
import pkgutil

import ml_collections
from jax.sharding import Mesh

from mlcd_jax import sharding
from mlcd_jax.objectives.base import REGISTRY, Objective, get, register
from mlcd_jax.runs import AbstractModel

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")


def create(config: ml_collections.ConfigDict, mesh: Mesh, rules: sharding.Rules, image: AbstractModel) -> Objective:
    """The objective of ``config.loss.kind`` bound to the run (``image``: its image tower)."""
    return get(config.loss.kind)(config, mesh, rules, image)


__all__ = ["REGISTRY", "Objective", "create", "get", "register"]
