"""The training loop: data, checkpoints and resume, the objective's step hook, metrics, periodic evaluation."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from clu import parameter_overview
from flax import nnx

from mlcd_jax import checkpointing, fileio, identity, metrics as metrics_lib, periodic, sharding
from mlcd_jax.config_lib import ConfigError, ResumeMismatch, train_augment
from mlcd_jax.models import VisionTransformer
from mlcd_jax.objectives import get as objective_class
from mlcd_jax.train.preemption import Preempted, Preemption
from mlcd_jax.train.state import TrainSetup
from mlcd_jax.train.step import GuardedStep
from mlcd_jax.train.validate import check_patch_drop_phase, checked_mesh


class TrainingDiverged(RuntimeError):
    """The loss became NaN/Inf; the last good checkpoint is kept."""


def _dataset_info(config: ml_collections.ConfigDict) -> tuple[list[str], dict[str, Any]]:
    """Shard paths and the clustering manifest for ``config.data.shards`` (a job's output dir or a glob)."""
    from mlcd_jax.data.pipeline import resolve_shards

    try:
        return resolve_shards(config.data.shards)
    except FileNotFoundError as err:
        raise ConfigError(f"data.shards: {err}") from None


def num_train_steps(config: ml_collections.ConfigDict, num_examples: int) -> int:
    """``num_train_steps`` if positive, else ``num_epochs`` over the dataset (rounded up)."""
    if config.num_train_steps > 0:
        return int(config.num_train_steps)
    return int(math.ceil(config.num_epochs * num_examples / config.batch_size))


def _log_step(
    config: ml_collections.ConfigDict, setup: TrainSetup, writer: Any, step: int, total_steps: int,
    metrics: dict[str, Any], timing: dict[str, float], peak: float | None,
) -> dict[str, Any]:
    """Writes one step's metrics (and throughput of the window) and prints its line; returns the scalars."""
    step_time = timing["step_time_s"]
    scalars = {k: v for k, v in metrics.items() if np.ndim(v) == 0}
    scalars.update(timing, images_per_s=config.batch_size / step_time,
                   flops_per_s=setup.flops_per_step / step_time)
    if peak:
        scalars["mfu"] = setup.flops_per_step / step_time / (peak * jax.device_count())
    writer.write_scalars(step, {**scalars, **{k: v for k, v in metrics.items() if np.ndim(v)}})
    terms = setup.objective.log_terms(scalars)
    print(
        f"step {step}/{total_steps} loss {scalars['loss']:.4f} ({terms}) cos+ {scalars['mean_pos_cos']:.3f} cos- "
        f"{scalars['mean_neg_cos']:.3f} lr {scalars['lr']:.2e} | "
        f"{scalars['images_per_s']:.1f} img/s, data wait {100 * scalars['data_wait_frac']:.0f}%"
        + (f", MFU {100 * scalars['mfu']:.1f}%" if peak else f", {scalars['flops_per_s'] / 1e9:.1f} GFLOP/s"),
        flush=True,
    )
    return scalars


# (every, fn(image tower, text tower or None) -> scalars)
PeriodicEval = tuple[int, Callable[[VisionTransformer, nnx.Module | None], dict[str, float]]]


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    evals: Sequence[PeriodicEval] = (),
) -> dict[str, Any]:
    """Trains (resuming from ``workdir`` when it holds a checkpoint) and returns the last logged metrics.

    ``evals``: ``(every, fn)`` pairs; ``fn(image_model, text_model) -> scalars`` runs every ``every`` steps and its results
    are logged with the training metrics (the caller builds them from ``config.evals``).
    """
    from mlcd_jax.data.pipeline import make_train_loader

    fileio.makedirs(workdir)
    mesh = checked_mesh(config)
    identity.check_rerun(config, workdir)  # a resume: config.json is the run's identity
    shards, manifest = _dataset_info(config)
    objective_class(config.loss.kind).check_shards(config, manifest)
    total_steps = num_train_steps(config, int(manifest.get("num_images", 0)) if manifest else 0)
    if total_steps <= 0:
        raise ConfigError("set num_train_steps > 0, or num_epochs with shards that have a manifest")
    check_patch_drop_phase(config, total_steps)  # num_epochs: the last step is known only now
    setup = TrainSetup.create(config, mesh, total_steps)
    goal = setup.objective
    if jax.process_index() == 0:
        print(f"training {config.model.name} with {config.loss.kind} on mesh {dict(mesh.shape)} "
              f"({jax.process_count()} process(es), {jax.device_count()} {jax.devices()[0].platform} devices): "
              f"{total_steps} steps of {config.batch_size}, {goal.describe()}",
              flush=True)
    try:
        loader = make_train_loader(
            shards, global_batch_size=config.batch_size, image_size=config.data.image_size,
            top_l=config.loss.top_l, seed=config.seed, augment=train_augment(config),
            num_workers=config.data.num_workers, crop_scale=tuple(config.data.crop_scale),
            **goal.loader_options(config),
            # corrupt records: shard, position and reason per line (a gs:// workdir keeps them in a temp dir)
            skip_log_dir=None if fileio.is_remote(workdir) else os.path.join(workdir, "skipped_records"),
        )
    except ValueError as err:  # shards that cannot feed this objective (no captions)
        raise ConfigError(f"data.shards: {err}") from None
    iterator = iter(loader)
    manager = checkpointing.create_manager(workdir, keep=config.keep_checkpoints)
    try:
        restored = checkpointing.restore(manager, setup.abstract_state, iterator, num_classes=setup.num_classes)
    except (checkpointing.CheckpointMismatch, ResumeMismatch) as err:
        raise ConfigError(str(err)) from None
    state, start = (restored if restored else (setup.init_state(config.seed), 0))
    writer = metrics_lib.create_writer(workdir, resume_step=start)
    if jax.process_index() == 0:
        identity.record(workdir, config, start)  # with the step of the changes this launch was allowed
    if start == 0 and jax.process_index() == 0:
        writer.write_hparams(config.to_dict())
        parameter_overview.log_parameter_overview(state["params"], msg="backbone parameters")
    step_fn = GuardedStep(setup, loader.augment)  # crops, flips, normalisation inside the step
    hook = goal.step_hook(state, loader, setup.state_shardings)  # state the objective rebuilds between steps
    peak = metrics_lib.device_peak_flops()
    preemption = Preemption(manager)
    stop_after = min(config.get("stop_after_steps", 0) or total_steps, total_steps)
    timer = periodic.StepTimer()
    profiler = periodic.Profiler(workdir, int(config.get("profile_steps", 0)), first=start + 5)
    last: dict[str, Any] = {}
    if start >= stop_after:
        print(f"{workdir} already holds step {start} (>= {stop_after}): nothing to train", flush=True)
    try:
        for step in range(start + 1, stop_after + 1):  # empty when the workdir is already there
            if hook is not None:
                state = hook(step, state)
            with timer.data_wait():
                local = next(iterator)
            profiler.before(step)
            state, metrics = step_fn(state, sharding.host_to_global(local, mesh, setup.rules), step)
            profiler.after(step, metrics)
            preempted = preemption.requested(step)
            is_last = step >= stop_after
            evals_now = [fn for every, fn in evals if periodic.due(step, every)]
            log_now = periodic.due(step, config.log_every_steps, last=is_last) or bool(evals_now)
            ckpt_now = periodic.due(step, config.checkpoint_every_steps, last=is_last or preempted)
            if log_now or ckpt_now:
                metrics = jax.device_get(metrics)
                for name in ("loss", "grad_norm"):
                    if not np.isfinite(metrics[name]):
                        kept = manager.latest_step()
                        raise TrainingDiverged(
                            f"{name} is {metrics[name]} at step {step}; stopped, " +
                            (f"the last good checkpoint (step {kept}) is kept" if kept is not None else
                             "before its first checkpoint (nothing saved; lower learning_rate and re-run)"))
            if log_now:
                timing = timer.report()
                results: dict[str, float] = {}
                if evals_now:
                    writer.flush()  # evaluators may read metrics.jsonl (the training curves)
                for fn in evals_now:
                    results.update(fn(setup.merge(state["params"]), goal.text_model(state)))
                if results:
                    print(f"step {step} eval: " + ", ".join(f"{k} {v:.4f}" for k, v in results.items()),
                          flush=True)
                extra = {**results, "skipped_records": loader.skipped_records}  # corrupt records, this process
                if step_fn.checked:
                    extra["exact_steps"] = step_fn.exact_steps  # batches that needed the exact step, this launch
                last = _log_step(config, setup, writer, step, total_steps, {**metrics, **extra}, timing, peak)
                timer.reset()  # the next window starts after logging and evaluation
            if ckpt_now:
                writer.flush()  # every row up to a checkpoint is on disk before the checkpoint exists
                checkpointing.save(manager, step, state, iterator, force=preempted or is_last)
            if preempted:
                raise Preempted(step, preemption.signal_name or "SIGTERM")
            if is_last:
                break
    finally:
        profiler.close()
        manager.wait_until_finished()
        manager.close()
        writer.flush()
        writer.close()
        preemption.restore()
    return last
