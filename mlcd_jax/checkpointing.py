"""Orbax checkpoints of the train state and the grain iterator, async, keep-N, restored with shardings.

Items: ``state`` (parameters, prototypes, optimizer state, step, RNG; restored straight into the
shardings of the abstract state) and ``iter`` (the grain iterator state of this process, so the data
order continues exactly).

Device-count independence: the prototype matrix and its optimizer moments (the leaves with one row per
prototype, under a ``proto`` key) are held with ``pad_num_classes(k, devices)`` rows, rows >= k being
masked padding, and saved as they are. They are not cut to k rows on save: JAX cannot shard k rows
unevenly over the devices, replicating them costs k x d per device (gigabytes at k = 1M), and no
canonical padding divides every device count. Instead they are read back non-strictly into the
current run's padded shape: tensorstore reads each device's rows, rows < k exactly, padding rows cut or
zero-filled. So a run saved on 8 devices resumes on 4 (or 5), and :func:`restore_params` reads only the
backbone for evaluation on any device count.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from mlcd_jax.config_lib import ResumeMismatch


def create_manager(workdir: str, *, keep: int, async_save: bool = True) -> ocp.CheckpointManager:
    """A CheckpointManager under ``workdir/checkpoints`` (local paths or ``gs://``) keeping ``keep``."""
    directory = epath.Path(workdir) / "checkpoints"
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=async_save
    )
    handlers = {"state": ocp.PyTreeCheckpointHandler(), "iter": grain.checkpoint.CheckpointHandler()}
    return ocp.CheckpointManager(directory, options=options, item_handlers=handlers)


def save(manager: ocp.CheckpointManager, step: int, state: Any, iterator: Any, *, force: bool = False) -> bool:
    """Starts an (async) save of ``state`` and the iterator at ``step``; errors of the previous save surface here."""
    items = {"state": ocp.args.PyTreeSave(state)}
    if iterator is not None:
        items["iter"] = grain.checkpoint.CheckpointSave(iterator)
    saved = manager.save(step, args=ocp.args.Composite(**items), force=force)
    if saved:
        logging.info("checkpoint of step %d started", step)
    return saved


def _restore_args(abstract: Any, resizable_rows: int | None = None) -> Any:
    """Per-leaf restore arguments into ``abstract``'s shardings; leaves under a ``proto`` key with
    ``resizable_rows`` rows (the prototypes and their moments) may differ from the stored rows."""

    def args(path: tuple[Any, ...], leaf: jax.ShapeDtypeStruct) -> ocp.ArrayRestoreArgs:
        resizable = (leaf.ndim == 2 and leaf.shape[0] == resizable_rows
                     and any(getattr(k, "key", None) == "proto" for k in path))
        return ocp.ArrayRestoreArgs(sharding=leaf.sharding, global_shape=leaf.shape, dtype=leaf.dtype,
                                    strict=not resizable)

    return jax.tree_util.tree_map_with_path(args, abstract)


class CheckpointMismatch(ValueError):
    """The checkpoint is not this run's (another k or objective); no older checkpoint is tried."""


def _param_name(path: tuple[Any, ...]) -> str:
    """``blocks.0.attn.qkv_kernel``: the same for a stored tree (lists and named tuples saved as dicts)
    and a live one."""
    return ".".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def _leaf_names(tree: Any) -> set[str]:
    return {_param_name(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _check_optimizer(stored: Any, wanted: Any, where: str) -> None:
    """``CheckpointMismatch`` when the stored optimizer state has another layout than this run's (other
    optimizer groups, gradient accumulation, or an mlcd_jax version that built the optimizer otherwise),
    instead of orbax's dump of both tree structures."""
    have, want = _leaf_names(stored), _leaf_names(wanted)
    if have != want:
        first = min(have ^ want)
        raise CheckpointMismatch(
            f"{where} holds an optimizer state of another layout than this run's (opt_state.{first} is "
            f"{'only in the checkpoint' if first in have else 'not in it'}): it was written with another "
            "optimizer setup (grad_accum_steps, its config.json says) or by another mlcd_jax version; its "
            "weights still evaluate (python -m mlcd_jax.evaluate), training resumes only with that setup: "
            "use it or a new workdir")


def _check_shapes(stored: Any, wanted: Any, where: str) -> None:
    """``CheckpointMismatch`` naming the first backbone parameter whose stored shape is not this run's
    (another model size), instead of orbax's advice to restore non-strictly."""
    have = {_param_name(path): tuple(leaf.shape) for path, leaf in jax.tree_util.tree_flatten_with_path(stored)[0]}
    extra = sorted(have.keys() - _leaf_names(wanted))
    if extra:
        raise CheckpointMismatch(f"{where} has parameter {extra[0]} that this run's model lacks: it holds another "
                                 "model (its config.json says which); use that model or a new workdir")
    for path, leaf in jax.tree_util.tree_flatten_with_path(wanted)[0]:
        name = _param_name(path)
        if name not in have:
            raise CheckpointMismatch(f"{where} has no parameter {name}: it holds another model (its config.json "
                                     "says which); resume with that model or use a new workdir")
        if have[name] != tuple(leaf.shape):
            raise CheckpointMismatch(
                f"{where} has parameter {name} of shape {list(have[name])} but this run's model needs "
                f"{list(leaf.shape)}: resume with the model config the run was started with (its config.json) "
                "or use a new workdir")


def _newest_that_restores(manager: ocp.CheckpointManager, read: Callable[[int], Any], *, move_broken: bool) -> Any:
    """``read(step)`` of the newest checkpoint that restores, or None when there is none.

    A checkpoint that fails while an older one restores is broken (torn by a crash, a file lost): it is
    named in one warning line and, with ``move_broken``, moved to ``checkpoints_broken/`` beside the
    checkpoints, so the run can save that step again. When none restores the newest one's error is
    raised (a config that does not match the run fails on every checkpoint, and nothing is moved).
    """
    failed: list[tuple[int, Exception]] = []
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            result = read(step)
        except (CheckpointMismatch, ResumeMismatch):  # the run's, not the checkpoint's, fault
            raise
        except Exception as err:  # noqa: BLE001  (orbax, tensorstore and grain raise many types)
            failed.append((step, err))
            continue
        for bad, err in failed:
            where = _move_aside(manager, bad) if move_broken else None
            reason = (str(err).strip().splitlines() or [""])[0][:200]
            print(f"warning: checkpoint {bad} in {manager.directory} does not restore ({type(err).__name__}: "
                  f"{reason}); {f'moved to {where}, ' if where else ''}using checkpoint {step}",
                  file=sys.stderr, flush=True)
        if failed and move_broken:
            manager.reload()
        return result
    if failed:
        raise failed[0][1]
    return None


def _move_aside(manager: ocp.CheckpointManager, step: int) -> epath.Path:
    """Moves checkpoint ``step`` to ``<workdir>/checkpoints_broken/<step>[.n]`` (process 0; all wait)."""
    source = epath.Path(manager.directory) / str(step)
    target = epath.Path(manager.directory).parent / "checkpoints_broken" / str(step)
    n = 0
    while target.exists():
        n += 1
        target = target.with_name(f"{step}.{n}")
    if jax.process_index() == 0:
        target.parent.mkdir(parents=True, exist_ok=True)
        source.rename(target)
    multihost_utils.sync_global_devices(f"checkpoint {step} moved aside")
    return target


def restore(
    manager: ocp.CheckpointManager, abstract_state: Any, iterator: Any = None, step: int | None = None, *,
    num_classes: int,
) -> tuple[Any, int] | None:
    """Restores checkpoint ``step`` (default: the newest that restores, see :func:`_newest_that_restores`)
    into ``abstract_state``'s shardings, and the iterator in place when one is given. The prototype rows
    are re-padded for the current device count.

    Returns ``(state, step)`` or None when the directory has no checkpoint. Raises
    :class:`CheckpointMismatch` when a checkpoint is not this run's: other state keys (objective), fewer
    than ``num_classes`` prototypes, other parameter names or shapes (model), another optimizer layout.
    """

    def read(step: int) -> tuple[Any, int]:
        metadata = manager.item_metadata(step)["state"]
        where = f"checkpoint {step} in {manager.directory}"
        if set(metadata) != set(abstract_state):
            raise CheckpointMismatch(f"{where} holds {', '.join(sorted(metadata))}, this run trains "
                                     f"{', '.join(sorted(abstract_state))}: it was trained with another loss.kind; "
                                     "use that run's config or a new workdir")
        stored = metadata["proto"].shape[0] if "proto" in abstract_state else num_classes
        if stored < num_classes:
            raise CheckpointMismatch(
                f"{where} holds {stored} prototypes but loss.num_classes="
                f"{num_classes}: use the run's num_classes or a new workdir"
            )
        for key in ("params", "text"):
            if key in abstract_state:
                _check_shapes(metadata[key], abstract_state[key], where)
        if "opt_state" in abstract_state:
            _check_optimizer(metadata["opt_state"], abstract_state["opt_state"], where)
        rows = abstract_state["proto"].shape[0] if "proto" in abstract_state else None
        items = {"state": ocp.args.PyTreeRestore(abstract_state, _restore_args(abstract_state, rows))}
        if iterator is not None:
            items["iter"] = grain.checkpoint.CheckpointRestore(iterator)
        restored = manager.restore(step, args=ocp.args.Composite(**items))
        logging.info("restored checkpoint of step %d (process %d)", step, jax.process_index())
        return restored["state"], step

    if step is not None:
        return read(step)
    return _newest_that_restores(manager, read, move_broken=True)


def restore_params(
    manager: ocp.CheckpointManager, abstract_params: Any, step: int | None = None, key: str = "params"
) -> tuple[Any, int] | None:
    """Only one model's parameters (``state[key]``: the image tower ``params``, or ``text``) of checkpoint
    ``step`` (default: the newest), into ``abstract_params``' shardings: prototypes and optimizer state
    are neither read nor allocated. Strict: every parameter must be stored with its shape and nothing
    else may be (a shallower model would read part of the network), else :class:`CheckpointMismatch`.

    Returns ``(params, step)`` or None when the directory has no checkpoint.
    """
    item = {key: abstract_params}

    def read(step: int) -> tuple[Any, int]:
        metadata = manager.item_metadata(step)["state"]
        where = f"checkpoint {step} in {manager.directory}"
        if key not in metadata:
            raise CheckpointMismatch(f"{where} holds no {key} (it holds {', '.join(sorted(metadata))})")
        _check_shapes(metadata[key], abstract_params, where)
        args = ocp.args.PyTreeRestore(item, _restore_args(item), partial_restore=True)
        restored = manager.restore(step, args=ocp.args.Composite(state=args))
        return restored["state"][key], step

    if step is not None:
        return read(step)
    return _newest_that_restores(manager, read, move_broken=False)
