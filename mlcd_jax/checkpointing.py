"""Orbax checkpoints of the train state and the grain iterator, async, keep-N, restored with shardings.

Items: ``state`` (parameters, prototypes, optimizer state, step, RNG; restored straight into the
shardings of the abstract state, so a run may resume on another device count) and ``iter`` (the grain
iterator state of this process, so the data order continues exactly).
"""

from __future__ import annotations

import logging
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath


def create_manager(workdir: str, *, keep: int, async_save: bool = True) -> ocp.CheckpointManager:
    """A CheckpointManager under ``workdir/checkpoints`` (local paths or ``gs://``) keeping ``keep``."""
    directory = epath.Path(workdir) / "checkpoints"
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=async_save
    )
    return ocp.CheckpointManager(directory, options=options, item_names=("state", "iter"))


def save(manager: ocp.CheckpointManager, step: int, state: Any, iterator: Any, *, force: bool = False) -> bool:
    """Starts an (async) save of ``state`` and the iterator at ``step``; errors of the previous save surface here."""
    items = {"state": ocp.args.StandardSave(state)}
    if iterator is not None:
        items["iter"] = grain.checkpoint.CheckpointSave(iterator)
    saved = manager.save(step, args=ocp.args.Composite(**items), force=force)
    if saved:
        logging.info("checkpoint of step %d started", step)
    return saved


def restore(
    manager: ocp.CheckpointManager, abstract_state: Any, iterator: Any = None, step: int | None = None
) -> tuple[Any, int] | None:
    """Restores checkpoint ``step`` (default: the newest) into ``abstract_state``'s shardings, and the
    iterator in place when one is given.

    Returns ``(state, step)`` or None when the directory has no checkpoint.
    """
    step = manager.latest_step() if step is None else step
    if step is None:
        return None
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if iterator is not None:
        items["iter"] = grain.checkpoint.CheckpointRestore(iterator)
    restored = manager.restore(step, args=ocp.args.Composite(**items))
    logging.info("restored checkpoint of step %d (process %d)", step, jax.process_index())
    return restored["state"], step
