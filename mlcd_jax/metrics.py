"""Metric writers (metrics.jsonl + TensorBoard events), device peak FLOP/s for MFU."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

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
    """

    def __init__(self, workdir: str):
        from tensorboardX import SummaryWriter

        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

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
        self._jsonl.write(json.dumps(row) + "\n")

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        self._tb.add_text("config", "```\n" + json.dumps(dict(hparams), indent=1, default=str) + "\n```", 0)

    def flush(self) -> None:
        self._jsonl.flush()
        os.fsync(self._jsonl.fileno())
        self._tb.flush()

    def close(self) -> None:
        self.flush()
        self._jsonl.close()
        self._tb.close()


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


def truncate_jsonl(path: str, last_step: int) -> None:
    """Drops rows with ``step > last_step`` (written after the checkpoint a resumed run restarts from)."""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        rows = [line for line in f if line.strip()]
    kept = []
    for line in rows:
        try:
            if json.loads(line)["step"] <= last_step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError):
            continue  # a line cut short by a hard kill
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(kept)
    os.replace(tmp, path)


def create_writer(workdir: str, *, resume_step: int = 0) -> MetricsWriter | NullWriter:
    """Writer for process 0 (``workdir/metrics.jsonl`` + TensorBoard); other processes write nothing.

    On resume, ``metrics.jsonl`` is cut back to ``resume_step`` so the file reads as one run.
    """
    if jax.process_index() > 0:
        return NullWriter()
    truncate_jsonl(os.path.join(workdir, "metrics.jsonl"), resume_step)
    return MetricsWriter(workdir)
