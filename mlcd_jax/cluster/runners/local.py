"""The local runner: this process does its worker's share (``num_workers`` / ``worker_index``) of each
stage, chunk after chunk, decoding on a thread pool (or ``decode_processes``); k-means: worker 0, or with
``kmeans_method=hierarchical`` every worker its parts and worker 0 the merge."""

from __future__ import annotations

import concurrent.futures
from typing import Any

import ml_collections

from mlcd_jax.cluster import stages as stages_lib
from mlcd_jax.cluster.context import Context


def describe(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Nothing to add to the dry run's plan."""
    return {}


def _run(stage: stages_lib.ChunkStage, pool: concurrent.futures.Executor) -> None:
    """``stage`` on this worker's chunks that are not done, with a progress bar over their images."""
    todo = stage.todo()
    if not todo:
        return
    stage.setup(pool)
    ctx = stage.ctx
    sizes = [ctx.chunk_size(ch) for ch in todo]
    bar = ctx.bar(None if None in sizes else sum(sizes), stage.description)  # tars: counted as read
    for chunk in todo:
        stage.run_chunk(chunk, pool, bar.update)
    bar.close()


def run_stages(ctx: Context, stages: tuple[str, ...]) -> None:
    """The embed, kmeans (worker 0; hierarchical parts: every worker) and assign stages of ``stages``, in order."""
    with concurrent.futures.ThreadPoolExecutor(ctx.threads) as pool:
        if "embed" in stages:
            _run(stages_lib.Embed(ctx), pool)
        if "kmeans" in stages:
            stages_lib.KMeans(ctx).run()  # returns at once on a worker with no share of it
        if "assign" in stages:
            _run(stages_lib.Assign(ctx), pool)
