"""The trainer: sharded state, one jitted step, checkpoints, metrics. No model or loss details here.

State (a plain pytree, checkpointed whole): ``step``, ``rng`` (raw key data), ``params`` (the ViT's NNX
parameters as a pure dict), the entries of the run's objective (:mod:`mlcd_jax.objectives`, e.g. the
prototype matrix ``proto``) and ``opt_state``. The state is created directly sharded (``jax.jit(init,
out_shardings=...)`` on shardings derived from the abstract state), never as a full copy on one device.
The loop, state, optimizer and step know no objective by name: they call the objective's methods.

- :mod:`~mlcd_jax.train.optimizer`: AdamW in groups on a warm-up + cosine schedule.
- :mod:`~mlcd_jax.train.state`: :class:`TrainSetup`, the state's keys, shardings and initial values.
- :mod:`~mlcd_jax.train.step`: :func:`make_train_step`, the jitted step.
- :mod:`~mlcd_jax.train.validate`: :func:`validate` / :func:`checked_mesh`, config errors in one line.
- :mod:`~mlcd_jax.train.preemption`: SIGTERM / SIGINT, :class:`Preempted` and its exit code.
- :mod:`~mlcd_jax.train.loop`: :func:`train_and_evaluate`, the loop.

The names callers use are exported here.
"""

from mlcd_jax.train.loop import PeriodicEval, TrainingDiverged, train_and_evaluate
from mlcd_jax.train.preemption import PREEMPTED_EXIT_CODE, Preempted
from mlcd_jax.train.state import TrainSetup
from mlcd_jax.train.step import make_train_step
from mlcd_jax.train.validate import checked_mesh, validate

__all__ = [
    "PREEMPTED_EXIT_CODE", "PeriodicEval", "Preempted", "TrainSetup", "TrainingDiverged", "checked_mesh",
    "make_train_step", "train_and_evaluate", "validate",
]
