"""Plan past this machine: compile a training step ahead of time for N devices and print its memory.

Nothing is allocated: the step (ViT + sharded prototype head + AdamW) is lowered and compiled for a
mesh of fake CPU devices, and ``compiled.memory_analysis()`` gives the per-device bytes. CPU numbers
approximate an accelerator's (the XLA CPU backend fuses and schedules differently, and keeps bf16
activations in fp32 in places), so treat the fit column as a plan, not a promise.

Usage: python benchmarks/aot_memory.py [--config configs/vitl14.py] [--devices 8] [--batch 256]
       [--fsdp 8] [--remat full] [--set loss.num_classes=1000000 ...]
"""

from __future__ import annotations

import argparse
import os

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--config", default="configs/vitl14.py")
parser.add_argument("--devices", type=int, default=8)
parser.add_argument("--batch", type=int, nargs="*", default=[256])
parser.add_argument("--fsdp", type=int, default=-1, help="fsdp axis size (-1 = all devices)")
parser.add_argument("--remat", default="full")
parser.add_argument("--set", nargs="*", default=[], help="extra config overrides key=value")
args = parser.parse_args()
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"

import importlib.util  # noqa: E402  (XLA_FLAGS must be set before JAX starts)
import time  # noqa: E402

from mlcd_jax import train  # noqa: E402
from mlcd_jax.sharding import make_mesh  # noqa: E402

GIB = 2**30
HBM = {"TPU v5e (16 GiB)": 16, "TPU v4 (32 GiB)": 32, "H100 (80 GiB)": 80}


def load_config(path: str):
    spec = importlib.util.spec_from_file_location("cfg", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def main() -> None:
    for batch in args.batch:
        config = load_config(args.config)
        config.batch_size = batch
        config.model.remat = args.remat
        config.model.scan_layers = True
        config.mesh.data, config.mesh.fsdp, config.mesh.model = 1, args.fsdp, 1
        for item in args.set:
            key, _, value = item.partition("=")
            target = config
            *path, leaf = key.split(".")
            for part in path:
                target = target[part]
            target[leaf] = type(target[leaf])(value)
        mesh = make_mesh(dict(config.mesh))
        t0 = time.perf_counter()
        m = train.aot_memory(config, mesh, num_train_steps=1000)
        per_device = (m["argument_bytes"] + m["temp_bytes"]) / GIB
        fits = ", ".join(f"{name}: {'yes' if per_device < cap * 0.9 else 'no'}" for name, cap in HBM.items())
        print(
            f"{config.model.name} @ {config.data.image_size}px, k={config.loss.num_classes:,}, global batch {batch}, "
            f"mesh {dict(mesh.shape)}, remat={args.remat}: per device arguments {m['argument_bytes'] / GIB:.2f} GiB "
            f"(state), temp {m['temp_bytes'] / GIB:.2f} GiB, total {per_device:.2f} GiB "
            f"[compiled in {time.perf_counter() - t0:.0f} s] -> fits (90% of HBM) {fits}",
            flush=True,
        )


if __name__ == "__main__":
    main()
