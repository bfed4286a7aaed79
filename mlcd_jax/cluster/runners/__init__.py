"""Where the clustering job's stages run: ``local`` (this process, one of ``num_workers``) or ``beam``
(Apache Beam pipelines). A runner module has ``describe(config)`` (what a dry run adds to the plan) and
``run_stages(ctx, stages)`` (the embed, kmeans and assign stages of ``stages``; finalize is the driver's).
"""

from __future__ import annotations

import importlib
from typing import Any, Protocol, cast

import ml_collections

from mlcd_jax.cluster.config import ClusterError
from mlcd_jax.cluster.context import Context


class Runner(Protocol):
    def describe(self, config: ml_collections.ConfigDict) -> dict[str, Any]: ...

    def run_stages(self, ctx: Context, stages: tuple[str, ...]) -> None: ...


def load(name: str) -> Runner:
    """The runner module ``name`` (one of ``config.RUNNERS``); ``ClusterError`` naming the extra it needs."""
    try:
        module = importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] != "apache_beam":
            raise
        raise ClusterError(f"runner={name} needs Apache Beam: pip install 'mlcd_jax[beam]'") from None
    return cast(Runner, module)
