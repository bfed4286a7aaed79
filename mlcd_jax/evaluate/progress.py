"""Progress bars of the evaluation's long steps (feature extraction per split, the probe's C search),
shown by process 0 only, so a multi-process run prints one bar."""

from __future__ import annotations

import jax
from tqdm import tqdm


def progress(total: int, desc: str, unit: str) -> tqdm:
    """A tqdm bar on process 0 (disabled elsewhere), at most one refresh every 2 s (readable in logs)."""
    return tqdm(total=total, desc=desc, unit=unit, mininterval=2.0, disable=jax.process_index() != 0)
