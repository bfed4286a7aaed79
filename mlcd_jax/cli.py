"""What the entry points (``python -m mlcd_jax.main``, ``mlcd_jax.evaluate``, ``mlcd_jax.study``) share:
the ``--config`` / ``--workdir`` / multi-process flags, the process setup before JAX starts, the run of
:func:`main`, and the exit codes of :func:`run_or_exit`. A library module, so an entry point imports it
instead of another entry point.

:func:`main` initialises multi-process JAX first (explicit flags, the ``JAX_COORDINATOR_ADDRESS`` /
``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` environment, or discovered on TPU pods and SLURM), then runs the
experiment of ``config.mode`` (``train``: cluster if needed, train, evaluate; ``eval``: evaluate a
trained workdir, from its own config.json when no ``--config`` is given) while holding the workdir's lock
(:mod:`mlcd_jax.workdir_lock`). Configuration errors (and a full disk) are printed as one line and exit
with status 2; ``--config`` itself is read by :mod:`mlcd_jax.cli_config`.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import sys
from collections.abc import Callable
from typing import Any

import ml_collections
from absl import flags, logging
from ml_collections import config_flags

from mlcd_jax import fileio, identity
from mlcd_jax.cli_config import config_error, loaded_config, parse_flags  # noqa: F401  (the entry points' parser)

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training config file (get_config()).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory (or gs:// path) for checkpoints, metrics and results.")
flags.DEFINE_string("coordinator_address", None,
                    "host:port of process 0 for multi-process runs (default: $JAX_COORDINATOR_ADDRESS).")
flags.DEFINE_integer("num_processes", None,
                     "Number of processes in a multi-process run (default: $JAX_NUM_PROCESSES).")
flags.DEFINE_integer("process_id", None, "Index of this process in a multi-process run (default: $JAX_PROCESS_ID).")
flags.mark_flags_as_required(["workdir"])  # --config: required by main and study, optional for evaluate


def _cluster_environment() -> bool:
    """True on a multi-host TPU slice or a multi-task SLURM job, where jax discovers its peers."""
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return "," in hosts or int(os.environ.get("SLURM_NTASKS", "1")) > 1


def distributed_settings() -> dict[str, Any]:
    """``jax.distributed.initialize``'s arguments from the flags, else from ``JAX_COORDINATOR_ADDRESS``,
    ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` (what GKE JobSets, Ray or ssh scripts set); empty when
    neither names a coordinator or a process count."""
    env = os.environ
    settings = {
        "coordinator_address": FLAGS.coordinator_address or env.get("JAX_COORDINATOR_ADDRESS") or None,
        "num_processes": FLAGS.num_processes if FLAGS.num_processes is not None else _env_int("JAX_NUM_PROCESSES"),
        "process_id": FLAGS.process_id if FLAGS.process_id is not None else _env_int("JAX_PROCESS_ID"),
    }
    return settings if settings["coordinator_address"] or settings["num_processes"] else {}


def _env_int(name: str) -> int | None:
    value = os.environ.get(name, "")
    return int(value) if value else None


def prepare_process(config: ml_collections.ConfigDict) -> None:
    """Quiets INFO logging (unless --verbosity is given) and gives a CPU-only machine
    ``config.cpu_devices`` fake devices, so the sharded code paths run as on a pod, with enough threads
    for their collectives (``PJRT_NPROC``).

    Call before JAX initialises its backends; an explicit XLA_FLAGS device count wins.
    """
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax and grain log every save at INFO
    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        count = config.get("cpu_devices", 8)
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={count}"
        ).strip()
    size_cpu_thread_pool()


def size_cpu_thread_pool() -> None:
    """Sets ``PJRT_NPROC`` (XLA:CPU's pool size; an explicit one wins) to max(cores, 2 x the fake devices
    of XLA_FLAGS), before JAX starts.

    XLA:CPU runs each device's part of a program on a pool of max(cores, devices) threads, and a part
    with a collective holds its thread until every device has arrived. With exactly one thread per fake
    device, one more queued launch took the last thread and deadlocked training on a 2-core box (LiT on
    emoji; docs/results.md, "The image–text demo"). Twice the devices leaves room.
    """
    devices = re.search(r"xla_force_host_platform_device_count=(\d+)", os.environ.get("XLA_FLAGS", ""))
    if devices and int(devices.group(1)) > 1:
        os.environ.setdefault("PJRT_NPROC", str(max(os.cpu_count() or 1, 2 * int(devices.group(1)))))


def main(argv: list[str], mode: str | None = None, model: str | None = None) -> None:
    """The run of ``--config`` (with ``mode``, when given, in place of the config's ``mode``); without
    ``--config`` (evaluation), the run's own config.json. ``model`` (evaluation of a released checkpoint,
    ``hf:DIR`` / ``hf-hub:ORG/NAME``): that model evaluated by ``--config`` (default
    ``configs/released.py``), results into ``--workdir``. The workdir is locked for the run."""
    del argv
    config = loaded_config()
    if config is None and model:
        from mlcd_jax.configs import released

        config = released.get_config()
    if config is None:
        try:
            config = identity.run_config(FLAGS.workdir)
        except FileNotFoundError as err:
            config_error(err)
    if mode is not None:
        config.mode = mode
    prepare_process(config)
    import jax

    settings = distributed_settings()
    if settings:
        # CPU devices need a cross-process collectives backend (GPUs/TPUs bring their own; harmless there).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(**settings)
    elif _cluster_environment():
        jax.distributed.initialize()
    logging.info(
        "process %d of %d; %d local / %d global devices (%s)",
        jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count(),
        jax.devices()[0].device_kind,
    )
    from mlcd_jax import experiment

    command = "train" if config.mode == "train" else "evaluate"
    job = ((lambda: experiment.evaluate_model(config, model, FLAGS.workdir)) if model else
           (lambda: experiment.run(config, FLAGS.workdir)))
    run_or_exit(lambda: locked(FLAGS.workdir, command, job, create=config.mode == "train" or bool(model)))


def locked(workdir: str, command: str, fn: Callable[[], Any], create: bool = True) -> Any:
    """``fn()`` while this process holds ``workdir``'s lock (:mod:`mlcd_jax.workdir_lock`)."""
    from mlcd_jax import workdir_lock

    with workdir_lock.hold(workdir, command, create=create):
        return fn()


def _interrupt(signum: int, frame: Any) -> None:
    del frame
    raise KeyboardInterrupt(signal.Signals(signum).name)


def run_or_exit(fn: Callable[[], Any]) -> Any:
    """Runs ``fn`` (a run or a study); a user-facing stop becomes one stderr line and an exit status:
    config error 2, diverged 3, SIGTERM / SIGINT 75 (EX_TEMPFAIL: finished work is kept and the same
    command resumes, so schedulers may requeue). During training the trainer checkpoints first; at any
    other stage (clustering, evaluation) SIGTERM stops like Ctrl-C. Multi-process runs leave SIGTERM to
    JAX's preemption notice."""
    import jax

    from mlcd_jax.config_lib import ConfigError
    from mlcd_jax.train import PREEMPTED_EXIT_CODE, Preempted, TrainingDiverged

    if jax.process_count() == 1:
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        return fn()
    except ConfigError as err:
        config_error(err)
    except TrainingDiverged as err:
        print(f"training diverged: {err}", file=sys.stderr)
        sys.exit(3)
    except Preempted as err:
        print(f"stopped by {err}", file=sys.stderr)
        sys.exit(PREEMPTED_EXIT_CODE)
    except Exception as err:  # noqa: BLE001  (a full disk surfaces through orbax, tensorstore, grain, asyncio)
        full = _disk_full(err)
        if full is None:
            raise
        print(f"no space left on device: {_space_report(full.filename or FLAGS.workdir)}; stopped, finished "
              "stages and the last good checkpoint are kept: free space and re-run the same command to resume",
              file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as err:
        print(f"stopped by {err.args[0] if err.args else 'SIGINT'} outside training: finished stages and "
              f"checkpoints are kept; re-run the same command to resume", file=sys.stderr)
        sys.exit(PREEMPTED_EXIT_CODE)


def _disk_full(err: BaseException) -> OSError | None:
    """The ``ENOSPC`` error behind ``err`` (itself, a cause or a context), None when the disk was not full."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            return err
        if "No space left on device" in str(err):
            return OSError(errno.ENOSPC, "No space left on device")
        err = err.__cause__ or err.__context__
    return None


def _space_report(path: str) -> str:
    """``PATH (N MiB free of M GiB)``: the path that did not fit and its disk's room (local paths)."""
    path = os.fspath(path)
    probe = path
    while probe and not os.path.exists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    if fileio.is_remote(path) or not os.path.exists(probe):
        return path
    usage = shutil.disk_usage(probe)
    return f"{path} ({usage.free / 2**20:.0f} MiB free of {usage.total / 2**30:.1f} GiB)"
