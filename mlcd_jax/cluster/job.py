"""The offline clustering job: embed -> spherical k-means -> top-l assignment -> ArrayRecord shards.

``run(config)`` drives one worker (or, with ``runner=beam``, the Beam launcher) through the stages of
``config.stages`` (``all`` or a comma list of embed, kmeans, assign, finalize). What it writes under
``output_dir``:

- ``job.json``: the output settings and the source's identity (a re-run with other settings, or against
  a source that gained, lost or renamed images, is refused);
- ``teacher.npz`` (a fitted teacher, its fit time in ``timings/``) and ``embeddings/<c>.npz`` per chunk:
  the embed stage;
- ``kmeans/`` (checkpoints, ``info.json``, the IVF index) and ``centroids.npy``: the kmeans stage;
- ``shards/shard-<c>-of-<n>.array_record`` and ``assignments/<c>.npz`` per chunk: the assign stage;
- ``manifest.json``: the finalize stage (``manifest``); with ``stages=all`` every worker returns it.

Which piece does what: ``context`` (one worker's view, its chunks), ``stages`` (embed, kmeans, assign),
``manifest`` (finalize), ``runners``: ``local`` (this process) or ``beam`` (the embed and assign stages
as Apache Beam pipelines over the same per-chunk code, the rest here).

Resume: each output is written to a temp file and renamed (on ``gs://`` uploaded whole, see
``storage``); a re-run skips what exists, so a killed job resumes and a finished job (manifest present,
same settings) returns at once without touching a file. With ``num_workers > 1`` and ``stages=all`` a
worker waits (polling, ``wait_timeout_s``) for outputs of other workers; a single worker that misses an
input raises instead.
"""

from __future__ import annotations

import os
from typing import Any

import ml_collections

from mlcd_jax import fileio
from mlcd_jax.cluster import manifest, runners, teachers
from mlcd_jax.cluster.config import ClusterError, default_config, parse_stages
from mlcd_jax.cluster.context import Context


def run(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Runs (or resumes) this worker's stages; returns the manifest (``stages`` with ``finalize``) or a status.

    A finished job with the same settings returns its manifest without recomputing or rewriting anything.
    """
    ctx = Context(config)
    c = ctx.cfg
    stages = parse_stages(c.stages)
    runner = runners.load(c.runner)
    if c.dry_run:
        plan = {"runner": c.runner, "source": c.source, "output_dir": c.output_dir, "num_images": ctx.num_images,
                "num_chunks": ctx.layout.num_chunks, "stages": list(stages),
                "chunk_range": [ctx.my_chunks.start, ctx.my_chunks.stop]}
        return {**plan, **runner.describe(c)}
    ctx.claim()  # raises if output_dir holds a job with other settings
    if fileio.exists(ctx.layout.manifest):
        return fileio.load_json(ctx.layout.manifest)
    runner.run_stages(ctx, stages)
    if "finalize" in stages:
        if c.worker_index == 0:
            return manifest.write(ctx)
        ctx.wait_for([ctx.layout.manifest], "manifest.json (written by worker 0)")
        return fileio.load_json(ctx.layout.manifest)
    return {"worker_index": c.worker_index, "stages": list(stages), "chunks": list(ctx.my_chunks)}


def load_teacher(output_dir: str) -> teachers.Teacher:
    """The teacher of a finished (or embedded) job, as it was fitted, for evaluation baselines."""
    job_path = os.path.join(output_dir, "job.json")
    if not fileio.exists(job_path):
        raise ClusterError(f"{output_dir} has no job.json: not a clustering job's output_dir")
    settings = fileio.load_json(job_path)
    config = default_config()
    config.update({k: v for k, v in settings.items() if k in config})
    return teachers.build_teacher(settings["teacher"], config, output_dir)
