"""The clustering job's embed and assign stages as Apache Beam pipelines (``--config.runner=beam``).

What runs where (``job.run`` calls ``run_stages`` in place of its local loop):

- launcher (this process): completes the config, claims ``output_dir``, fits the teacher when it needs
  fitting (so that workers only load it), then submits the **embed** pipeline and waits; runs the
  **k-means** stage itself (``Job.kmeans``: a sample, one machine, faiss); submits the **assign**
  pipeline and waits; ``job.run`` then writes the manifest (``Job.finalize``).
- workers: each pipeline is ``Create(chunk ids) | Reshuffle | ParDo``. A chunk is ``shard_size``
  consecutive source images and becomes shard ``chunk``, exactly as in the local job, by calling the
  same ``Job.embed_chunk`` / ``Job.assign_chunk``; each worker process opens the source and loads the
  teacher (embed) or the centroids' faiss index (assign) once, in ``DoFn.setup``, shared by its threads.

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
from mlcd_jax.cluster import job as job_lib
from mlcd_jax.cluster import teachers

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
    """What one worker process keeps between bundles: the job (source opened), decode threads, the model."""

    def __init__(self, config: dict[str, Any], stage: str) -> None:
        self.job = job_lib.Job(ml_collections.ConfigDict(config))
        self.pool = concurrent.futures.ThreadPoolExecutor(self.job.threads)
        c = self.job.cfg
        # Workers never fit the teacher (the launcher did): a missing teacher.npz is an error here.
        self.model = teachers.build_teacher(c.teacher, c, c.output_dir) if stage == "embed" else self.job.search_index()


class _ChunkDoFn(beam.DoFn):
    """Runs one stage on chunk ids; skips a chunk whose output already exists (a retried bundle, a re-run)."""

    stage = ""

    def __init__(self, config: dict[str, Any]) -> None:
        self._config = config
        self._shared = shared.Shared()
        self._chunks = Metrics.counter(NAMESPACE, f"{self.stage}_chunks")
        self._already = Metrics.counter(NAMESPACE, f"{self.stage}_chunks_already_done")

    def setup(self) -> None:
        tag = f"{self.stage}:{self._config['output_dir']}"
        self._worker = self._shared.acquire(lambda: _Worker(self._config, self.stage), tag=tag)

    def output(self, chunk: int) -> str:
        raise NotImplementedError

    def run_chunk(self, chunk: int) -> None:
        raise NotImplementedError

    def process(self, chunk: int) -> Iterator[int]:
        if fileio.exists(self.output(chunk)):
            self._already.inc()
            return
        self.run_chunk(chunk)
        self._chunks.inc()
        yield chunk


class EmbedChunks(_ChunkDoFn):
    """``Job.embed_chunk`` per chunk: ``embeddings/<chunk>.npz`` with the undecodable images' keys."""

    stage = "embed"

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        self._images = Metrics.counter(NAMESPACE, "images_embedded")
        self._undecodable = Metrics.counter(NAMESPACE, "images_undecodable")

    def output(self, chunk: int) -> str:
        return self._worker.job.layout.embeddings(chunk)

    def run_chunk(self, chunk: int) -> None:
        embedded, undecodable = self._worker.job.embed_chunk(chunk, self._worker.model, self._worker.pool)
        self._images.inc(embedded)
        self._undecodable.inc(undecodable)


class AssignChunks(_ChunkDoFn):
    """``Job.assign_chunk`` per chunk: shard ``chunk`` and ``assignments/<chunk>.npz``."""

    stage = "assign"

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        self._records = Metrics.counter(NAMESPACE, "records_written")

    def output(self, chunk: int) -> str:
        return self._worker.job.layout.assignment(chunk)

    def run_chunk(self, chunk: int) -> None:
        self._records.inc(self._worker.job.assign_chunk(chunk, self._worker.model, self._worker.pool))


def _run_pipeline(job: job_lib.Job, dofn: _ChunkDoFn, chunks: list[int]) -> None:
    """Runs ``dofn`` over ``chunks`` on the configured runner and waits; prints progress and the counters."""
    c = job.cfg
    runner = describe(c)["beam_runner"]
    if c.progress:
        print(f"beam {dofn.stage}: {len(chunks)} of {job.layout.num_chunks} chunks on {runner}", flush=True)
    t0 = time.perf_counter()
    pipeline = beam.Pipeline(options=pipeline_options(c))
    _ = (
        pipeline
        | "chunks" >> beam.Create(chunks)
        | "spread" >> beam.Reshuffle()  # else a runner may fuse Create with the ParDo onto one worker
        | dofn.stage >> beam.ParDo(dofn)
    )
    result = pipeline.run()
    state = result.wait_until_finish()
    if state != PipelineState.DONE:
        raise job_lib.ClusterError(f"the beam {dofn.stage} pipeline ended {state}: see the runner's logs, then re-run")
    if c.progress:
        counters = {r.key.metric.name: r.result for r in result.metrics().query()["counters"]
                    if r.key.metric.namespace == NAMESPACE}
        print(f"beam {dofn.stage}: done in {time.perf_counter() - t0:.1f}s {counters}", flush=True)


def run_stages(job: job_lib.Job, stages: tuple[str, ...]) -> None:
    """The embed, kmeans and assign stages of ``stages``: pipelines on the Beam runner, k-means here."""
    config = job.cfg.to_dict()
    if "embed" in stages:
        todo = job.embed_todo()
        if todo:
            with concurrent.futures.ThreadPoolExecutor(job.threads) as pool:
                job.teacher(pool)  # fits (and saves) it once, here, when it needs fitting
            _run_pipeline(job, EmbedChunks(config), todo)
    if "kmeans" in stages:
        job.kmeans()
    if "assign" in stages:
        todo = job.assign_todo()
        if todo:
            _run_pipeline(job, AssignChunks(config), todo)
