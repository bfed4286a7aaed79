"""Renders the GKE JobSet manifests of this folder for one run; prints the YAML (``kubectl apply -f -``).

    python launch/gke/render.py tpu --name NAME --image IMAGE --type v5p-64 [--num-slices N] \
        --config FILE --workdir gs://... [--max-restarts N] [-- --config.key=value ...]
    python launch/gke/render.py gpu --name NAME --image IMAGE --nodes N [--gpus-per-node 8] \
        [--accelerator nvidia-h100-80gb] [--cpus-per-node N] --config FILE --workdir gs://... [-- ...]

IMAGE holds this checkout installed with its ``[tpu]`` or ``[gpu]`` extra; FILE is a path inside it.
The container runs ``python -m mlcd_jax.main --config=FILE --workdir=DIR [overrides]``, each override
one argument (spaces kept). A TPU slice's GKE topology and host count follow Cloud TPU's slice names
(:func:`mlcd_jax.aot.parse_topology`); run from the checkout's environment.
"""

from __future__ import annotations

import argparse
import json
import math
import string
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from mlcd_jax.aot import HOST_BOUNDS, parse_topology  # noqa: E402

# Accelerator generation -> GKE's node label value (cloud.google.com/gke-tpu-accelerator).
TPU_ACCELERATORS = {"v4": "tpu-v4-podslice", "v5e": "tpu-v5-lite-podslice", "v5p": "tpu-v5p-slice",
                    "v6e": "tpu-v6e-slice"}
SINGLE_HOST_CHIPS = 8  # v5e / v6e slices up to 8 chips are one VM; larger ones, and v4 / v5p, 4 chips per VM
PORT = 1234  # process 0's coordinator port (GPU)


def _command(args: argparse.Namespace) -> str:
    """The container's command as a YAML flow sequence (JSON), every argument one item."""
    return json.dumps(["python", "-m", "mlcd_jax.main", f"--config={args.config}", f"--workdir={args.workdir}",
                       *args.overrides])


def tpu_values(args: argparse.Namespace) -> dict[str, object]:
    """The TPU template's values: GKE accelerator label, topology (``2x4x4``) and hosts per slice."""
    topology = parse_topology(args.type)
    if topology.generation is None:
        raise ValueError(f"--type {args.type}: name a TPU slice (v4-N, v5p-N, v5e-N, v6e-N)")
    per_host = (topology.num_chips if topology.generation.torus_dims == 2 and topology.num_chips <= SINGLE_HOST_CHIPS
                else math.prod(HOST_BOUNDS))
    return {"TYPE": args.type, "NUM_SLICES": args.num_slices,
            "ACCELERATOR": TPU_ACCELERATORS[topology.generation.prefix], "TOPOLOGY": "x".join(map(str, topology.grid)), "HOSTS": topology.num_chips // per_host,
            "CHIPS_PER_HOST": per_host}


def gpu_values(args: argparse.Namespace) -> dict[str, object]:
    """The GPU template's values: nodes, GPUs and decode cores per node, accelerator, coordinator port."""
    return {"NODES": args.nodes, "GPUS_PER_NODE": args.gpus_per_node, "ACCELERATOR": args.accelerator,
            "CPUS": args.cpus_per_node or 8 * args.gpus_per_node, "PORT": PORT}


def render(args: argparse.Namespace) -> str:
    """The manifest of ``args.kind`` (``tpu`` or ``gpu``) with every ``${KEY}`` filled in."""
    values = tpu_values(args) if args.kind == "tpu" else gpu_values(args)
    values |= {"NAME": args.name, "IMAGE": args.image, "COMMAND": _command(args), "MAX_RESTARTS": args.max_restarts}
    return string.Template((HERE / f"{args.kind}_jobset.yaml").read_text()).substitute(values)


def parse_args(argv: list[str]) -> argparse.Namespace:
    """``argv`` (overrides after ``--`` kept as given) -> the render settings."""
    argv, overrides = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    kinds = parser.add_subparsers(dest="kind", required=True)
    for kind in ("tpu", "gpu"):
        sub = kinds.add_parser(kind)
        sub.add_argument("--name", required=True, help="JobSet name (a DNS label)")
        sub.add_argument("--image", required=True, help="container image with mlcd_jax installed")
        sub.add_argument("--config", required=True, help="config file inside the image, e.g. configs/vitl14.py")
        sub.add_argument("--workdir", required=True, help="run directory every pod can write (gs://...)")
        sub.add_argument("--max-restarts", type=int, default=3, help="JobSet restarts after a failure")
        if kind == "tpu":
            sub.add_argument("--type", required=True, help="slice type as Cloud TPU names it, e.g. v5p-64")
            sub.add_argument("--num-slices", type=int, default=1, help="slices (multislice over DCN)")
        else:
            sub.add_argument("--nodes", type=int, required=True, help="GPU nodes, one process each")
            sub.add_argument("--gpus-per-node", type=int, default=8)
            sub.add_argument("--accelerator", default="nvidia-h100-80gb", help="cloud.google.com/gke-accelerator")
            sub.add_argument("--cpus-per-node", type=int, default=0, help="decode cores (default 8 per GPU)")
    args = parser.parse_args(argv)
    args.overrides = overrides
    return args


def main(argv: list[str]) -> None:
    try:
        print(render(parse_args(argv)), end="")
    except ValueError as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main(sys.argv[1:])
