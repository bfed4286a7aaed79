"""The clustering job's embed and assign stages as Apache Beam pipelines (``--config.runner=beam``).

What runs where (the driver, ``mlcd_jax.cluster.job.run``, calls ``run_stages``):

- launcher (this process): completes the config, claims ``output_dir``, fits the teacher when it needs
  fitting (so that workers only load it), then submits the **embed** pipeline and waits; runs the
  **k-means** stage itself (``stages.KMeans``: a sample, one machine, faiss); submits the **assign**
  pipeline and waits; the driver then writes the manifest.
- workers: each pipeline is ``Create(chunk ids) | Reshuffle | ParDo(ChunkDoFn)``. A chunk is
  ``shard_size`` consecutive source images and becomes shard ``chunk``, exactly as in the local job, by
  calling the same ``ChunkStage.run_chunk``; each worker process opens the source and loads the teacher
  (embed) or the centroids' faiss index (assign) once, in ``DoFn.setup``, shared by its threads.

Retries: every output is keyed by its chunk and written atomically (``mlcd_jax.cluster.storage``), a
chunk whose output exists is skipped, and a re-done chunk writes the same bytes; so a bundle that the
runner retries after a worker died, or a re-run of the whole command, neither loses nor duplicates a
record. Images travel inside workers (random access to the source), never through a Beam shuffle.
"""

from __future__ import annotations

import concurrent.futures
import shlex
import time
from collections.abc import Iterator
from typing import Any

import apache_beam as beam
import ml_collections
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.runners.runner import PipelineState
from apache_beam.utils import shared

from mlcd_jax import fileio
from mlcd_jax.cluster import stages as stages_lib
from mlcd_jax.cluster.config import ClusterError
from mlcd_jax.cluster.context import Context

NAMESPACE = "mlcd_jax.cluster"


def pipeline_options(config: ml_collections.ConfigDict) -> PipelineOptions:
    """The Beam options of ``config.beam_options`` (a shell-quoted string of ``--flag=value`` words)."""
    return PipelineOptions(shlex.split(config.beam_options))


def describe(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The runner and the pipeline options the job would submit with; ``unknown_options``: those Beam ignores."""
    options = pipeline_options(config)
    given = options.get_all_options(drop_default=True, retain_unknown_options=True)
    known = options.get_all_options(drop_default=True)
    return {
        "beam_runner": options.view_as(StandardOptions).runner or "DirectRunner",
        "pipeline_options": given,
        "unknown_options": sorted(set(given) - set(known)),
    }


class _Worker:
    """What one worker process keeps between bundles: the stage (source opened, model loaded), decode threads."""

    def __init__(self, config: dict[str, Any], stage: str) -> None:
        ctx = Context(ml_collections.ConfigDict(config))
        self.pool = concurrent.futures.ThreadPoolExecutor(ctx.threads)
        # Workers never fit the teacher (the launcher did): a missing teacher.npz is an error here.
        self.stage = stages_lib.chunk_stage(stage, ctx, fit_teacher=False)
        self.stage.setup(self.pool)


class ChunkDoFn(beam.DoFn):
    """Runs one chunked stage on chunk ids; skips a chunk whose output already exists (a retried bundle, a
    re-run). Counts ``<stage>_chunks``, ``<stage>_chunks_already_done`` and the stage's own counters."""

    def __init__(self, config: dict[str, Any], stage: str) -> None:
        self._config, self._stage = config, stage
        self._shared = shared.Shared()
        self._chunks = Metrics.counter(NAMESPACE, f"{stage}_chunks")
        self._already = Metrics.counter(NAMESPACE, f"{stage}_chunks_already_done")

    def setup(self) -> None:
        tag = f"{self._stage}:{self._config['output_dir']}"
        self._worker = self._shared.acquire(lambda: _Worker(self._config, self._stage), tag=tag)

    def process(self, chunk: int) -> Iterator[int]:
        stage = self._worker.stage
        if fileio.exists(stage.output(chunk)):
            self._already.inc()
            return
        for name, value in stage.run_chunk(chunk, self._worker.pool).items():
            Metrics.counter(NAMESPACE, name).inc(value)
        self._chunks.inc()
        yield chunk


def _run_pipeline(ctx: Context, stage: str, chunks: list[int]) -> None:
    """Runs ``stage`` over ``chunks`` on the configured runner and waits; prints progress and the counters."""
    c = ctx.cfg
    runner = describe(c)["beam_runner"]
    if c.progress:
        print(f"beam {stage}: {len(chunks)} of {ctx.layout.num_chunks} chunks on {runner}", flush=True)
    t0 = time.perf_counter()
    pipeline = beam.Pipeline(options=pipeline_options(c))
    _ = (
        pipeline
        | "chunks" >> beam.Create(chunks)
        | "spread" >> beam.Reshuffle()  # else a runner may fuse Create with the ParDo onto one worker
        | stage >> beam.ParDo(ChunkDoFn(c.to_dict(), stage))
    )
    result = pipeline.run()
    state = result.wait_until_finish()
    if state != PipelineState.DONE:
        raise ClusterError(f"the beam {stage} pipeline ended {state}: see the runner's logs, then re-run")
    if c.progress:
        counters = {r.key.metric.name: r.result for r in result.metrics().query()["counters"]
                    if r.key.metric.namespace == NAMESPACE}
        print(f"beam {stage}: done in {time.perf_counter() - t0:.1f}s {counters}", flush=True)


def run_stages(ctx: Context, stages: tuple[str, ...]) -> None:
    """The embed, kmeans and assign stages of ``stages``: pipelines on the Beam runner, k-means here."""
    if "embed" in stages:
        embed = stages_lib.Embed(ctx)
        todo = embed.todo()
        if todo:
            with concurrent.futures.ThreadPoolExecutor(ctx.threads) as pool:
                embed.setup(pool)  # fits (and saves) the teacher once, here, when it needs fitting
            _run_pipeline(ctx, embed.name, todo)
    if "kmeans" in stages:
        stages_lib.KMeans(ctx).run()
    if "assign" in stages:
        assign = stages_lib.Assign(ctx)
        todo = assign.todo()
        if todo:
            _run_pipeline(ctx, assign.name, todo)
