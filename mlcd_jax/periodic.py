"""When a training loop acts, and how long its steps take: big_vision's ``itstime`` and ``chrono`` in
small form (clu's ``periodic_actions`` needs TensorFlow), with a profiler hook.

- :func:`due`: is ``step`` one of every ``every`` steps (or the last one)?
- :class:`StepTimer`: step time and the fraction of it spent waiting for the input pipeline, per report
  window.
- :class:`Profiler`: a ``jax.profiler`` trace of a few steps after compilation, for TensorBoard.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import jax


def due(step: int, every: int, *, last: bool = False) -> bool:
    """True every ``every`` steps (``every > 0``) and on the ``last`` step."""
    return last or (every > 0 and step % every == 0)


class StepTimer:
    """Wall time of the steps since the last :meth:`report`, and how much of it went to data waits."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Starts a new window (after :meth:`report`, once work that is not step time is done)."""
        self._start, self._wait, self._steps = time.perf_counter(), 0.0, 0

    @contextlib.contextmanager
    def data_wait(self) -> Iterator[None]:
        """Times the block (fetching the next batch) as input-pipeline wait, and counts a step."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._wait += time.perf_counter() - t0
            self._steps += 1

    def report(self) -> dict[str, float]:
        """``step_time_s`` and ``data_wait_frac`` of the window so far."""
        elapsed = time.perf_counter() - self._start
        return {"step_time_s": elapsed / max(self._steps, 1), "data_wait_frac": self._wait / elapsed}


class Profiler:
    """Traces steps ``first .. first + num_steps - 1`` with ``jax.profiler`` into ``logdir`` (TensorBoard's
    ``plugins/profile``); ``num_steps = 0`` does nothing."""

    def __init__(self, logdir: str, num_steps: int, first: int) -> None:
        self._logdir, self._first, self._last = logdir, first, first + num_steps - 1
        self._on = False
        self.enabled = num_steps > 0

    def before(self, step: int) -> None:
        if self.enabled and step == self._first:
            jax.profiler.start_trace(self._logdir)
            self._on = True

    def after(self, step: int, result: Any) -> None:
        """Stops after the last traced step, once its device work (``result``) is done."""
        if self._on and step >= self._last:
            jax.block_until_ready(result)
            jax.profiler.stop_trace()
            self._on = False
            print(f"profile of steps {self._first}-{step}: {self._logdir}/plugins/profile", flush=True)

    def close(self) -> None:
        """Ends a trace cut short (the run stopped inside it)."""
        if self._on:
            jax.profiler.stop_trace()
            self._on = False
