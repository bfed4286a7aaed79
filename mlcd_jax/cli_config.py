"""The ``--config`` flag as every entry point reads it (main, evaluate, study, cluster, aot): a config file
that does not load, an unknown ``--config.key`` or a bad value is one ``config error:`` line and exit
status 2, and ``--config.model.overrides.FIELD`` / ``--config.text.overrides.FIELD`` reach every field of
the towers' shapes (:class:`~mlcd_jax.models.presets.ViTConfig`, ``TextConfig``), not only those the
config file happens to set. Defines no flags, so any entry point imports it.
"""

from __future__ import annotations

import copy
import re
import sys
import types
import typing
from typing import Any, NoReturn

import ml_collections
from absl import app, flags

# How a value is read for each type of config value: as `--config.key=value` reads it.
PARSERS = {bool: flags.BooleanParser(), int: flags.IntegerParser(), float: flags.FloatParser(),
           str: flags.ArgumentParser()}
_TOWER_FLAG = re.compile(r"--config\.((?:model|text)\.overrides\.\w+)=(.*)", re.S)
_CONFIG_MISTAKES = (OSError, AttributeError, KeyError, TypeError, ValueError)
_tower_overrides: list[tuple[str, Any]] = []  # (dotted key, typed value) of this process's command line


def config_error(message: Any) -> NoReturn:
    """Prints ``config error: <message>`` as one stderr line and exits with status 2."""
    print(f"config error: {message}", file=sys.stderr)
    sys.exit(2)


def tower_field_type(key: str) -> tuple[type, bool] | None:
    """``(type, may be None)`` of ``model.overrides.FIELD`` / ``text.overrides.FIELD``; None for another key."""
    from mlcd_jax.models.presets import TextConfig, ViTConfig

    prefix, _, name = key.rpartition(".")
    tower = {"model.overrides": ViTConfig, "text.overrides": TextConfig}.get(prefix)
    hint = typing.get_type_hints(tower).get(name) if tower else None
    if hint is None:
        return None
    args = typing.get_args(hint)
    if typing.get_origin(hint) is typing.Literal:
        return str, False
    if isinstance(hint, types.UnionType):
        return next(a for a in args if a is not type(None)), type(None) in args
    return hint, False


def parse_value(key: str, text: str, kind: type, optional: bool = False) -> Any:
    """``text`` read as ``kind`` (``None``/``none`` as None when ``optional``); a ValueError names ``key``."""
    if optional and text.strip().lower() == "none":
        return None
    try:
        return PARSERS[kind].parse(text.strip())
    except (ValueError, KeyError):
        raise ValueError(f"{text!r} for {key} is not a valid {kind.__name__}") from None


def set_tower_override(config: ml_collections.ConfigDict, key: str, value: Any) -> None:
    """Sets ``model.overrides.FIELD`` (or ``text.``) in ``config``, even when the config file left it out."""
    section, _, name = key.rpartition(".")
    holder = config
    for part in section.split("."):
        holder = holder[part]
    with holder.unlocked():
        holder[name] = value


def _config_mistake(err: Exception) -> NoReturn:
    """Exits with status 2 and one line for a ``--config`` file that does not load or a wrong override."""
    text = str(err).replace("\\n", "\n")
    lines = [line.strip("'\"\\ ") for line in text.splitlines() if line.strip("'\"\\ ")]
    suggestion = re.search(r'Did you mean "([^"]+)" instead of "([^"]+)"', text)
    if isinstance(err, OSError):  # "Failed loading config file ... Attempted ... <path> <reason>"
        message = text.strip().splitlines()[-1].strip()
    elif suggestion:
        message = f"unknown key {suggestion.group(2)!r}; did you mean {suggestion.group(1)!r}?"
    elif isinstance(err, (AttributeError, KeyError)):
        message = f"unknown key {' '.join(lines)!r}"
    else:
        message = " ".join(lines)
    config_error(message)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing (``app.run(..., flags_parser=parse_flags)``), where ``--config.key=value``
    overrides are applied: a mistake there is one ``config error:`` line, not a traceback. The towers'
    shape overrides are taken out first and applied by :func:`loaded_config`."""
    rest = []
    named = any(a == "--config" or a.startswith("--config=") for a in argv)
    if not named and any(a.startswith("--config.") for a in argv):
        config_error("--config.KEY=VALUE overrides need --config=FILE (for evaluate: the run's config file; "
                     "evaluation keys only)")
    for arg in argv:
        match = _TOWER_FLAG.fullmatch(arg)
        field = tower_field_type(match.group(1)) if match else None
        if field is None:
            rest.append(arg)
            continue
        try:
            _tower_overrides.append((match.group(1), parse_value(match.group(1), match.group(2), *field)))
        except ValueError as err:
            config_error(err)
    sys.argv = [a for a in sys.argv if a in rest or not a.startswith("--config.")]  # config_flags reads it too
    try:
        return app.parse_flags_with_usage(rest)
    except _CONFIG_MISTAKES as err:
        _config_mistake(err)


def loaded_config() -> ml_collections.ConfigDict | None:
    """A copy of ``--config`` with its overrides applied (None without ``--config``); a config file that
    does not load is one line."""
    try:
        config = copy.deepcopy(flags.FLAGS.config)
        if config is not None:
            for key, value in _tower_overrides:
                set_tower_override(config, key, value)
        return config
    except _CONFIG_MISTAKES as err:
        _config_mistake(err)
