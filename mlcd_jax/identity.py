"""``config.json`` as a run's identity: what a re-run or an evaluation may change, and the history of changes.

A re-run of a workdir that holds checkpoints resumes what ``config.json`` records; a setting that
changes what is trained (model, loss, data, schedule, steps, towers) must be named in
``--config.allow_changes=KEY[,KEY...]`` (a key or a prefix such as ``model``) or the run is refused in one
line that lists the differing keys. An allowed change is appended to ``config.json``'s ``history`` with
the step it took effect at. The keys of :data:`FREE_KEYS` (evaluation, logging and checkpoint cadence,
devices) may change freely. Evaluation reads the run's config and takes only :data:`FREE_KEYS` from a
given ``--config``.
"""

from __future__ import annotations

import json
from typing import Any

import ml_collections
from etils import epath

from mlcd_jax import fileio
from mlcd_jax.config_lib import ConfigError

# Dotted keys (or prefixes ending in ".") that do not change what is trained.
# Where the shards are (data.shards, data.cache_dir) is free too: moved shards resume, and shards of other
# content are the data loader's ResumeMismatch; the clustering settings that make them are not free.
FREE_KEYS = ("mode", "cpu_devices", "allow_changes", "log_every_steps", "checkpoint_every_steps", "keep_checkpoints",
             "profile_steps", "stop_after_steps", "eval.", "evals.", "mesh.", "mesh_rules", "data.num_workers",
             "data.shards", "data.cache_dir", "loss.histograms")
# What made the training images: evaluation keeps the run's own and ignores a --config's (a config file
# given without the launch's --config.data.shards override still evaluates the run).
TRAINING_DATA = ("data.cluster.",)
HISTORY = "history"  # config.json's list of {"step", "changes": {key: [old, new]}}


def flat(record: Any, prefix: str = "") -> dict[str, Any]:
    """A config (ConfigDict or its JSON dict) as ``{dotted key: JSON value}``."""
    if isinstance(record, ml_collections.ConfigDict):
        record = json.loads(record.to_json_best_effort())
    out: dict[str, Any] = {}
    for key, value in record.items():
        if isinstance(value, dict):  # an empty one (no overrides) is no key, as a missing one
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _matches(key: str, names: tuple[str, ...]) -> bool:
    return any(key == n.rstrip(".") or key.startswith(n if n.endswith(".") else n + ".") for n in names)


def changes(recorded: dict[str, Any], config: ml_collections.ConfigDict) -> dict[str, list[Any]]:
    """``{key: [recorded, new]}`` for every key outside :data:`FREE_KEYS` that differs."""
    old, new = flat({k: v for k, v in recorded.items() if k != HISTORY}), flat(config)
    return {k: [old.get(k), new.get(k)] for k in sorted(old.keys() | new.keys())
            if old.get(k) != new.get(k) and not _matches(k, FREE_KEYS)}


def _listed(diff: dict[str, list[Any]], limit: int = 6) -> str:
    shown = [f"{k} ({json.dumps(a)} -> {json.dumps(b)})" for k, (a, b) in list(diff.items())[:limit]]
    return ", ".join(shown) + (f" and {len(diff) - limit} more" if len(diff) > limit else "")


def read(workdir: str) -> dict[str, Any] | None:
    """``workdir/config.json`` as recorded (with its history), None when there is none."""
    path = epath.Path(workdir) / "config.json"
    return fileio.load_json(path) if path.exists() else None


def has_checkpoints(workdir: str) -> bool:
    """Whether ``workdir/checkpoints`` holds a finished checkpoint (a step folder; not orbax's temporary ones)."""
    directory = epath.Path(workdir) / "checkpoints"
    return directory.exists() and any(p.name.isdigit() for p in directory.iterdir())


def check_resume(recorded: dict[str, Any], config: ml_collections.ConfigDict, workdir: str) -> None:
    """The training changes of ``config`` against the run in ``workdir``; a ConfigError unless every one
    is named in ``config.allow_changes``."""
    diff = changes(recorded, config)
    allowed = tuple(k.strip() for k in str(config.get("allow_changes", "") or "").split(",") if k.strip())
    refused = {k: v for k, v in diff.items() if not _matches(k, allowed)}
    if refused:
        raise ConfigError(f"{workdir} holds a run trained with other settings: {_listed(refused)}; resume with its "
                          f"config.json, or name them in --config.allow_changes={','.join(refused)}, or use a new "
                          "workdir")


def check_rerun(config: ml_collections.ConfigDict, workdir: str) -> None:
    """:func:`check_resume` when ``workdir`` holds a run to resume (a config.json and a checkpoint)."""
    recorded = read(workdir)
    if recorded is not None and has_checkpoints(workdir):
        check_resume(recorded, config, workdir)


def record(workdir: str, config: ml_collections.ConfigDict, step: int) -> None:
    """Writes ``config`` as ``workdir/config.json``; when resuming at ``step`` > 0, the recorded history is
    kept and this launch's training changes (already allowed, :func:`check_resume`) appended."""
    recorded = read(workdir) if step > 0 else None
    history = list(recorded.get(HISTORY, [])) if recorded else []
    diff = changes(recorded, config) if recorded else {}
    if diff:
        history.append({"step": step, "changes": diff})
    out = json.loads(config.to_json_best_effort())
    if history:
        out[HISTORY] = history
    if out != recorded:
        fileio.write_atomic(epath.Path(workdir) / "config.json", json.dumps(out, indent=1) + "\n")


def run_config(workdir: str) -> ml_collections.ConfigDict:
    """The config the run in ``workdir`` trains with (its config.json without the history); a workdir
    without one is a FileNotFoundError."""
    recorded = read(workdir)
    if recorded is None:
        raise FileNotFoundError(f"{epath.Path(workdir) / 'config.json'} is missing: {workdir} is not a mlcd_jax "
                                "training workdir")
    return ml_collections.ConfigDict({k: v for k, v in recorded.items() if k != HISTORY})


def eval_config(workdir: str, given: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The run's own config with only the :data:`FREE_KEYS` of ``given`` (a ``--config``) applied; a
    ``given`` that changes anything else but :data:`TRAINING_DATA` is a ConfigError listing the keys."""
    config = run_config(workdir)
    diff = {k: v for k, v in changes(config.to_dict(), given).items() if not _matches(k, TRAINING_DATA)}
    if diff:
        raise ConfigError(f"--config differs from the run in {workdir} in {_listed(diff)}: evaluation uses the "
                          "run's own config.json and takes only evaluation keys (eval.*, evals.*, devices) from "
                          "--config; drop --config or those overrides")
    new = flat(given)
    with config.unlocked():
        for key, value in new.items():
            if _matches(key, FREE_KEYS) and not key.startswith("data."):  # the run's shards stay
                _set(config, key, value)
    return config


def _set(config: ml_collections.ConfigDict, key: str, value: Any) -> None:
    *path, leaf = key.split(".")
    for part in path:
        if part not in config:
            config[part] = ml_collections.ConfigDict()
        config = config[part]
    config[leaf] = value
