"""An HF checkpoint directory's files: ``config.json`` and the weights (``model.safetensors``, or shards
with a ``model.safetensors.index.json``), read and written for :mod:`mlcd_jax.interop.hf` (vision) and
:mod:`mlcd_jax.interop.hf_text` (text); errors name the file and why (:class:`InteropError`)."""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import jax
import numpy as np

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"

Config = TypeVar("Config")  # what a config parser returns (ViTConfig, TextConfig)


class InteropError(ValueError):
    """An HF checkpoint directory that cannot be read as it says: the message names the file and why."""


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """All tensors of ``path`` (one file, or a directory with ``model.safetensors`` or a sharded index)."""
    from safetensors import safe_open

    if os.path.isdir(path):
        index = os.path.join(path, INDEX)
        if os.path.exists(os.path.join(path, WEIGHTS)):
            files = [os.path.join(path, WEIGHTS)]
        elif os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            files = [os.path.join(path, name) for name in sorted(set(weight_map.values()))]
        else:
            raise FileNotFoundError(f"no {WEIGHTS} or {INDEX} in {path}")
    else:
        files = [path]
    tensors: dict[str, np.ndarray] = {}
    with jax.default_device(jax.local_devices(backend="cpu")[0]):
        for file in files:
            try:
                with safe_open(file, framework="flax") as f:
                    for key in f.keys():
                        tensors[key] = np.asarray(f.get_tensor(key))
            except Exception as err:  # noqa: BLE001  (safetensors' SafetensorError derives from Exception only)
                raise InteropError(f"{file} is not a readable safetensors file ({type(err).__name__}: {err})") from None
    return tensors


def read_config(path: str, parse: Callable[[Mapping[str, Any]], tuple[Config, str]]) -> tuple[Config, str]:
    """``parse`` of ``path``/config.json: our config and the architecture; errors name the file."""
    config_path = os.path.join(path, "config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"no config.json in {path}; expected a transformers save_pretrained directory")
    with open(config_path, encoding="utf-8") as f:
        try:
            hf_config = json.load(f)
        except ValueError as err:
            raise InteropError(f"{config_path} is not JSON ({err})") from None
    try:
        return parse(hf_config)
    except (KeyError, TypeError, ValueError) as err:
        raise InteropError(f"{config_path}: {err}") from None


def write_checkpoint(
    tensors: Mapping[str, np.ndarray], hf_config: dict[str, Any], path: str, max_shard_bytes: int
) -> None:
    """Writes ``config.json`` (with the tensors' ``dtype``) and the tensors, split into shards of at most
    ``max_shard_bytes`` with a ``model.safetensors.index.json`` when they exceed it; process 0 only."""
    from safetensors.numpy import save_file

    if jax.process_index() != 0:
        return
    os.makedirs(path, exist_ok=True)
    hf_config = {**hf_config, "dtype": str(next(iter(tensors.values())).dtype)}
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for key in sorted(tensors):
        if shards[-1] and size + tensors[key].nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensors[key]
        size += tensors[key].nbytes
    for stale in [WEIGHTS, INDEX, *glob.glob(os.path.join(path, "model-*-of-*.safetensors"))]:
        if os.path.exists(os.path.join(path, stale)):
            os.remove(os.path.join(path, stale))
    if len(shards) == 1:
        save_file(shards[0], os.path.join(path, WEIGHTS), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(path, name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
        index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())}, "weight_map": weight_map}
        with open(os.path.join(path, INDEX), "w") as f:
            json.dump(index, f, indent=2)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
