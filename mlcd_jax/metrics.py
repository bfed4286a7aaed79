"""Metric writers (metrics.jsonl + TensorBoard events), device peak FLOP/s for MFU."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from etils import epath

from mlcd_jax import fileio

# Dense bf16 peak FLOP/s per chip (vendor figures, no sparsity).
PEAK_FLOPS: dict[str, float] = {
    "a100": 312e12,
    "h100": 989e12,
    "h200": 989e12,
    "tpu v4": 275e12,
    "tpu v5 lite": 197e12,  # v5e reports its device_kind as "TPU v5 lite"
    "tpu v5e": 197e12,
    "tpu v5p": 459e12,
    "tpu v5": 459e12,
}


def device_peak_flops(device: jax.Device | None = None) -> float | None:
    """Peak bf16 FLOP/s of ``device`` from :data:`PEAK_FLOPS`, or None (CPU, unknown chips)."""
    kind = (device or jax.devices()[0]).device_kind.lower()
    for name in sorted(PEAK_FLOPS, key=len, reverse=True):
        if name in kind:
            return PEAK_FLOPS[name]
    return None


class MetricsWriter:
    """Writes each log step to ``metrics.jsonl`` (one JSON object per line) and TensorBoard events.

    Scalars go to both; arrays (the cosine histograms) go to the JSON line as lists and to TensorBoard
    as histograms. TensorBoard events use tensorboardX: clu's ``metric_writers`` package imports
    TensorFlow on import, which this project does not install (clu's ``metrics`` and
    ``parameter_overview`` are used where they fit).

    A local workdir gets its rows appended as they come and its events written in place. An object
    store (``gs://``) has no append: the rows are kept in memory and ``metrics.jsonl`` is uploaded whole
    at each :meth:`flush`; tensorboardX writes to a local staging folder whose grown event files are
    uploaded whole at each :meth:`flush`, through epath like every other output (tensorboardX's own
    gs:// writer goes through google-cloud-storage's client and uploads once more from ``__del__``
    after ``close``). The trainer flushes before every checkpoint, so a workdir holds the rows up to its
    newest checkpoint.
    """

    def __init__(self, workdir: str):
        from tensorboardX import SummaryWriter

        self._jsonl_path = epath.Path(workdir) / "metrics.jsonl"
        self._events_dir = epath.Path(workdir) / "tensorboard"
        self._remote = fileio.is_remote(workdir)
        if self._remote:
            path = self._jsonl_path
            self._text = [path.read_text(encoding="utf-8")] if path.exists() else []  # the file, in pieces
            self._text_dirty = False
            self._staging = tempfile.TemporaryDirectory(prefix="mlcd_tensorboard_")
            self._uploaded: dict[str, int] = {}  # staged event file -> bytes uploaded
            self._tb = SummaryWriter(self._staging.name)
        else:
            self._jsonl = self._jsonl_path.open("a", encoding="utf-8")
            self._tb = SummaryWriter(os.fspath(self._events_dir))

    def write_scalars(self, step: int, values: Mapping[str, Any]) -> None:
        row: dict[str, Any] = {"step": int(step)}
        for key, value in values.items():
            value = np.asarray(value)
            if value.ndim == 0:
                row[key] = value.item()
                self._tb.add_scalar(key, float(value), int(step))
            else:
                row[key] = value.tolist()
                self._tb.add_histogram(key, value, int(step))
        line = json.dumps(row) + "\n"
        if self._remote:
            self._text.append(line)
            self._text_dirty = True
        else:
            self._jsonl.write(line)

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        self._tb.add_text("config", "```\n" + json.dumps(dict(hparams), indent=1, default=str) + "\n```", 0)

    def flush(self) -> None:
        self._tb.flush()
        self._sync()

    def _sync(self) -> None:
        """Local: fsyncs the appended rows. Object store: uploads ``metrics.jsonl`` and the staged event
        files that grew since the last upload, each one whole."""
        if not self._remote:
            self._jsonl.flush()
            os.fsync(self._jsonl.fileno())
            return
        if self._text_dirty:
            fileio.write_atomic(self._jsonl_path, "".join(self._text))
            self._text_dirty = False
        for folder, _, names in os.walk(self._staging.name):
            for name in names:
                local = os.path.join(folder, name)
                relative, size = os.path.relpath(local, self._staging.name), os.path.getsize(local)
                if self._uploaded.get(relative) != size:
                    with open(local, "rb") as f:
                        fileio.write_atomic(self._events_dir / relative, f.read())
                    self._uploaded[relative] = size

    def close(self) -> None:
        self._tb.close()  # writes its last events
        self._sync()
        if self._remote:
            self._staging.cleanup()
        else:
            self._jsonl.close()


class NullWriter:
    """The writer of processes other than 0: they compute the same metrics and write nothing."""

    def write_scalars(self, step: int, values: Mapping[str, Any]) -> None:
        del step, values

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        del hparams

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def truncate_jsonl(path: fileio.PathLike, last_step: int) -> None:
    """Drops rows with ``step > last_step`` (written after the checkpoint a resumed run restarts from)."""
    path = epath.Path(path)
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= last_step:
                kept.append(line + "\n")
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a line cut short by a hard kill
    fileio.write_atomic(path, "".join(kept))


def create_writer(workdir: str, *, resume_step: int = 0) -> MetricsWriter | NullWriter:
    """Writer for process 0 (``workdir/metrics.jsonl`` + TensorBoard); other processes write nothing.

    On resume, ``metrics.jsonl`` is cut back to ``resume_step`` so the file reads as one run.
    """
    if jax.process_index() > 0:
        return NullWriter()
    truncate_jsonl(epath.Path(workdir) / "metrics.jsonl", resume_step)
    return MetricsWriter(workdir)
