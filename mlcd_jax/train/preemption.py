"""Stopping on SIGTERM / SIGINT (or agreed preemption) with a checkpoint, and the exit code that says so."""

from __future__ import annotations

import signal
import sys
from typing import Any

import jax


class Preemption:
    """Whether to checkpoint and stop now: SIGTERM or SIGINT on one process, or agreed preemption on many.

    With several processes, every process must stop at the same step, so the decision comes from
    JAX's preemption sync point (through orbax), which the coordination service sets on SIGTERM; there
    SIGINT keeps Python's default (KeyboardInterrupt, no checkpoint). On one process a second Ctrl-C
    aborts at once, without the checkpoint.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, manager: Any) -> None:
        self._manager = manager
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}
        if jax.process_count() == 1:
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def _handle(self, signum, frame) -> None:
        del frame
        if self.signal_name == "SIGINT" and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name
        hint = " (Ctrl-C again aborts without one)" if signum == signal.SIGINT else ""
        print(f"{self.signal_name}: checkpointing and stopping after this step{hint}", file=sys.stderr, flush=True)

    def requested(self, step: int) -> bool:
        if jax.process_count() == 1:
            return self.signal_name is not None
        if self._manager.reached_preemption(step):
            self.signal_name = "SIGTERM"
            return True
        return False

    def restore(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)


class Preempted(RuntimeError):
    """Training stopped on SIGTERM / SIGINT with a checkpoint of ``step``; the run's evaluation and
    baselines are skipped. Entry points exit with :data:`PREEMPTED_EXIT_CODE`; re-running resumes."""

    def __init__(self, step: int, signal_name: str) -> None:
        super().__init__(f"{signal_name}: checkpoint of step {step} written; evaluation skipped; "
                         f"re-run the same command to resume")
        self.step, self.signal_name = step, signal_name


PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: schedulers (SLURM --requeue, Kubernetes, systemd) retry
