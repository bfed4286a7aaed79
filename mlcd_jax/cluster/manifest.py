"""The finalize stage (worker 0): every chunk's outputs aggregated into ``manifest.json``.

The manifest lists the shards (with their record counts) and the undecodable images, describes the
clustering (teacher, k, l, index, k-means info, cluster sizes, mean cosines) and the time each stage
took; its presence marks the whole job done.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import Any

import numpy as np

from mlcd_jax import fileio
from mlcd_jax.cluster import storage
from mlcd_jax.cluster.context import Context
from mlcd_jax.data import records

MANIFEST_VERSION = 1


@dataclasses.dataclass
class _Totals:
    """Sums over all chunks (in chunk order, so the floats are reproducible)."""

    sizes: np.ndarray  # images per cluster, by top-1 label
    seconds: dict[str, float]  # per stage
    top1: float = 0.0  # sum of top-1 cosines
    topl: float = 0.0  # sum of the cosines of all positives
    positives: float = 0.0
    shards: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    skipped: list[dict[str, str]] = dataclasses.field(default_factory=list)


def _chunk_totals(ctx: Context) -> _Totals:
    layout = ctx.layout
    t = _Totals(sizes=np.zeros(ctx.cfg.num_clusters, np.int64), seconds={"embed": 0.0, "assign": 0.0, "write": 0.0})
    for ch in range(layout.num_chunks):
        with storage.load_npz(layout.embeddings(ch)) as z:
            t.seconds["embed"] += float(z["seconds"])
            t.skipped += [{"key": key, "error": err}
                          for key, err in zip(z["skipped_keys"].tolist(), z["skipped_errors"].tolist())]
        with storage.load_npz(layout.assignment(ch)) as z:
            labels, scores = z["labels"], z["scores"]
            t.seconds["assign"] += float(z["assign_seconds"])
            t.seconds["write"] += float(z["write_seconds"])
        valid = labels >= 0
        t.sizes += np.bincount(labels[:, 0], minlength=len(t.sizes))
        t.top1 += float(scores[:, 0].sum())
        t.topl += float(scores[valid].sum())
        t.positives += float(valid.sum())
        t.shards.append({"path": layout.shard_name(ch), "num_records": len(labels)})
    return t


def write(ctx: Context) -> dict[str, Any]:
    """Aggregates every chunk into ``manifest.json`` (and returns it), once all workers' shards exist."""
    layout, c = ctx.layout, ctx.cfg
    chunks = range(layout.num_chunks)
    ctx.wait_for([layout.shard(ch) for ch in chunks] + [layout.assignment(ch) for ch in chunks],
                 "the shards of all workers")
    t0 = time.perf_counter()
    dim = storage.npy_shape(layout.centroids)[1]
    t = _chunk_totals(ctx)
    sizes, seconds = t.sizes, t.seconds
    num_images = sum(s["num_records"] for s in t.shards)
    fit = layout.path("timings", "teacher_fit.json")
    if fileio.exists(fit):
        seconds["teacher_fit"] = fileio.load_json(fit)["seconds"]
    kmeans_info = fileio.load_json(layout.kmeans_info)
    seconds["kmeans"] = kmeans_info.pop("seconds")
    nonempty = sizes[sizes > 0]
    if len(sizes) - len(nonempty) > len(sizes) / 2:  # near-identical images, or a teacher that maps them alike
        print(f"warning: {len(sizes) - len(nonempty)} of {len(sizes)} clusters are empty (top-1 of {num_images} "
              "images): the images are near-identical or the teacher embeds them alike; use fewer num_clusters "
              "or another teacher", file=sys.stderr, flush=True)
    manifest = {
        "schema_version": MANIFEST_VERSION,
        "record_version": records.VERSION,
        "source": c.source,
        "teacher": c.teacher,
        "embedding_dim": int(dim),
        "num_clusters": c.num_clusters,
        "top_l": c.top_l,
        "assign": c.assign,
        "threshold": c.threshold if c.assign == "threshold" else None,
        "label_padding": "label -1, score -inf" if c.assign == "threshold" else None,
        "index": ctx.index_kind,
        # a wds: source's count is what was read (the unread rest of a broken tar counts as one skipped entry)
        "num_source_images": ctx.num_images if ctx.num_images is not None else num_images + len(t.skipped),
        "num_images": num_images,
        "num_skipped": len(t.skipped),
        "skipped": t.skipped,
        "shards": t.shards,
        "centroids": "centroids.npy",
        "kmeans": kmeans_info,
        "cluster_sizes_top1": {
            "empty": int((sizes == 0).sum()),
            "largest": int(sizes.max()),
            "smallest_nonempty": int(nonempty.min()) if len(nonempty) else 0,
            "mean": float(sizes.mean()),
        },
        "mean_top1_cosine": t.top1 / max(num_images, 1),
        "mean_topl_cosine": t.topl / max(t.positives, 1.0),
        "mean_positives": t.positives / max(num_images, 1),
        "seconds": {**seconds, "finalize": time.perf_counter() - t0},
        "settings": ctx.settings,
    }
    storage.save_json(layout.manifest, manifest)
    return manifest
