"""The largest per-chip batch of each paper model's train step on TPU slices, compiled by libtpu.

For each model config (k = 1M prototypes, the paper's recipe) and TPU generation, the full train step
(:func:`mlcd_jax.aot.plan`: canvases cropped on device, ViT, sharded head, AdamW) is compiled for a
slice of ``--chips`` chips with full remat, scanned layers and a pure-FSDP mesh (``data = 1``,
``fsdp = all``: weights, optimizer state and prototypes split over every chip, the batch over every
chip too). The per-chip batch is searched over powers of two: the first guess comes from the memory
per image of an earlier compile (a prior for the first), then it doubles while the step fits and
halves while it does not.
Every compile is printed; the table at the end is the largest fitting power of two per cell and its
per-chip memory, with the next power of two's refusal as libtpu reported it.

Needs libtpu (``pip install 'mlcd_jax[tpu]'``); no TPU. On the 2-core CPU box one compile takes
1-5 minutes.

Usage: python benchmarks/tpu_fit.py [--models B/16,L/14,L/14-336,bigG/14] [--generations v5e,v5p,v6e]
       [--chips 32] [--remat full] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import time

from mlcd_jax import aot

CONFIGS = {"B/16": "configs/vitb16.py", "L/14": "configs/vitl14.py", "L/14-336": "configs/vitl14_336.py",
           "bigG/14": "configs/vitbigg14.py"}
GIB = 2**30
MAX_PER_CHIP = 4096
# First guesses of per-image memory (MiB) under full remat, refined by every compile that fits.
PRIOR_MIB_PER_IMAGE = {"B/16": 16, "L/14": 40, "L/14-336": 95, "bigG/14": 140}
PRIOR_FIXED_GIB = 3


def load_config(path: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location("cfg", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def compile_once(model: str, topology: aot.Topology, per_chip: int, remat: str) -> dict:
    config = load_config(CONFIGS[model])
    config.batch_size = per_chip * topology.num_chips
    config.model.remat, config.model.scan_layers = remat, True
    config.mesh.data, config.mesh.fsdp, config.mesh.model = 1, -1, 1
    t0 = time.perf_counter()
    result = aot.plan(config, topology)
    total = result["per_chip"]["total_bytes"]
    print(f"  {model:8s} {topology.name:8s} {per_chip:5d}/chip: {'fits' if result['fits'] else 'no  '} "
          f"{total / GIB:7.2f} GiB{' (temporaries, lower bound)' if not result['fits'] else ''} "
          f"[{time.perf_counter() - t0:.0f} s]", flush=True)
    return result


def largest(model: str, topology: aot.Topology, guess: int, remat: str) -> dict:
    """Largest power-of-two per-chip batch that fits, its plan and the refused next power of two."""
    tried: dict[int, dict] = {}
    b = max(1, min(MAX_PER_CHIP, guess))
    while True:
        tried[b] = compile_once(model, topology, b, remat)
        if tried[b]["fits"]:
            if 2 * b in tried or b >= MAX_PER_CHIP:
                break
            b *= 2
        else:
            if b == 1 or b // 2 in tried:
                b //= 2
                break
            b //= 2
    fitting = tried.get(b)
    return {"model": model, "topology": topology.name, "per_chip_batch": b if fitting else 0,
            "fit": fitting, "refused": tried.get(2 * b if b else 1)}


def power_of_two_guess(per_image_bytes: float, fixed_bytes: float, hbm_bytes: float) -> int:
    """Largest power of two whose linear memory estimate stays under 90 % of HBM (at least 1)."""
    room = 0.9 * hbm_bytes - fixed_bytes
    b = 1
    while (2 * b) * per_image_bytes <= room:
        b *= 2
    return b


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(CONFIGS))
    parser.add_argument("--generations", default="v5e,v5p,v6e")
    parser.add_argument("--chips", type=int, default=32)
    parser.add_argument("--remat", default="full")
    parser.add_argument("--json", default="")
    a = parser.parse_args()
    aot.quiet_libtpu()
    rows = []
    for model in a.models.split(","):
        per_image, fixed = PRIOR_MIB_PER_IMAGE.get(model, 64) * 2**20, PRIOR_FIXED_GIB * GIB
        for gen in a.generations.split(","):
            g = aot.GENERATIONS[gen]
            topology = aot.parse_topology(f"{gen}-{a.chips * g.cores_per_chip}")
            guess = power_of_two_guess(per_image, fixed, topology.hbm_bytes_per_chip)
            row = largest(model, topology, guess, a.remat)
            rows.append(row)
            if a.json:  # after every cell: a long search keeps what it found
                with open(a.json, "w") as f:
                    json.dump(rows, f, indent=2)
            if row["fit"]:  # memory per image from this compile: the state is the fixed part
                per = row["fit"]["per_chip"]
                fixed = per["argument_bytes"]
                per_image = max(1.0, (per["total_bytes"] - fixed) / row["per_chip_batch"])
    print("\n| model | slice | largest per-chip batch (power of 2) | per-chip memory at it | next power of 2 |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        fit, refused = r["fit"], r["refused"]
        hbm = aot.parse_topology(r["topology"]).hbm_bytes_per_chip / GIB
        used = f"{fit['per_chip']['total_bytes'] / GIB:.1f} of {hbm:.0f} GiB" if fit else "—"
        nxt = (f"refused, ≥ {refused['per_chip']['total_bytes'] / GIB:.1f} GiB" if refused and not refused["fits"]
               else "not tried")
        print(f"| {r['model']} | {r['topology']} | {r['per_chip_batch'] or 'none fits'} | {used} | {nxt} |")


if __name__ == "__main__":
    main()
