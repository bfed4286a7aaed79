"""Plan a run before renting the hardware: compile the full train step ahead of time for a TPU slice.

``python -m mlcd_jax.aot --config=configs/vitl14.py --topology=v5p-64 [--num-slices=N] [--json=OUT.json] [--config.key=value ...]``

The step the trainer runs (uint8 canvases cropped and flipped on device, ViT, sharded prototype head,
optimizer update, state donated) is lowered on abstract arrays and compiled by libtpu for the named
slice, on any machine and without TPU hardware (``pip install 'mlcd_jax[tpu]'``). ``--topology=cpu:N``
compiles for N fake CPU devices instead (no libtpu; XLA:CPU's memory plan approximates an
accelerator's). ``--num-slices=N`` compiles for N such slices (multislice: the mesh's data axis spans
them). Prints, and writes to ``--json``::

    {"topology", "num_slices", "num_chips" (per slice), "hbm_bytes_per_chip",
     "per_chip": {"argument_bytes", "output_bytes", "temp_bytes", "total_bytes"},
     "cross_slice": {"bytes_per_chip", "bytes_per_step", "by_collective"},
     "fits", "xla_flops_per_step", "model_flops_per_step",
     "head": {"rows_per_shard", "positive_budget", "capacity", "exact_capacity"}}

``total_bytes`` = arguments + outputs − donated (aliased) bytes + temporaries: the step's peak. libtpu
refuses a program larger than the chip's HBM; such a config prints ``fits: false`` with the usage the
compiler reported as ``total_bytes`` (a lower bound when it reports the temporaries alone, which then
are ``temp_bytes``; the rest of the split is unknown: null). On ``cpu:N`` ``fits`` is null. ``xla_flops_per_step`` is XLA's count for
one device times the device count; ``model_flops_per_step`` the trainer's MFU convention (3 × the
backbone's matmul FLOPs per image × global batch). ``cross_slice`` counts what one step sends over DCN,
read from the program libtpu compiled (its optimized HLO, dumped to a temporary folder): libtpu lowers
every collective that spans slices to megascale ``send`` ops, one per chip and cross-slice hop, and
``bytes_per_chip`` sums their payloads (``by_collective``: per ALL_REDUCE, REDUCE_SCATTER, ALL_GATHER,
...); ``bytes_per_step`` is that times all chips of all slices. One slice sends nothing (all zeros);
``cpu:N``, and a program that does not fit, give null. Slice names follow Cloud TPU: ``v4-N`` and
``v5p-N`` count TensorCores (two per chip), ``v5e-N`` / ``v5litepod-N`` and ``v6e-N`` count chips.
``head`` (null without prototypes) gives the prototype head's static sizes per shard: its rows (k/N), the
rows reserved for a batch's positives (null: every possible positive), the rows the compiled step scores
(``capacity``) and those of the exact step a batch beyond the budget runs instead (``exact_capacity``;
``losses/partial_fc.py``).
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import importlib.util
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from typing import Any

from absl import app, flags
from ml_collections import config_flags

from mlcd_jax import fileio
from mlcd_jax.cli_config import config_error, loaded_config, parse_flags

FLAGS = flags.FLAGS


def _define_flags() -> None:
    """The CLI's flags, defined only when run as a program: importing this module (tests, notebooks,
    benchmarks) next to ``mlcd_jax.cli`` must not define a second ``--config``."""
    config_flags.DEFINE_config_file("config", None, "Training config file (get_config()).", lock_config=True)
    flags.DEFINE_string("topology", None, "TPU slice (v4-8, v5e-16, v5litepod-16, v5p-64, v6e-8, ...) or cpu:N.")
    flags.DEFINE_integer("num-slices", 1, "Slices of --topology (multislice over DCN); TPU topologies only.")
    flags.DEFINE_string("json", None, "Also write the plan to this file.")
    flags.mark_flags_as_required(["config", "topology"])

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Generation:
    """A TPU generation as Cloud TPU names and builds its slices."""

    prefix: str  # libtpu's topology-name prefix
    cores_per_chip: int  # how many the slice name counts per chip
    hbm_gib: int
    torus_dims: int
    chip_config: str  # "megacore": one JAX device per chip


GENERATIONS = {
    "v4": Generation("v4", 2, 32, 3, "megacore"),
    "v5p": Generation("v5p", 2, 95, 3, "default"),
    "v5e": Generation("v5e", 1, 16, 2, "default"),
    "v6e": Generation("v6e", 1, 32, 2, "default"),
}
ALIASES = {"v5litepod": "v5e"}
HOST_BOUNDS = (2, 2, 1)  # chips per host of multi-host slices


@dataclasses.dataclass(frozen=True)
class Topology:
    """A parsed ``--topology``: a TPU slice (generation set) or ``num_chips`` fake CPU devices."""

    name: str
    num_chips: int
    generation: Generation | None = None

    @property
    def hbm_bytes_per_chip(self) -> int | None:
        return None if self.generation is None else self.generation.hbm_gib * GIB

    @property
    def grid(self) -> tuple[int, ...]:
        """The slice's chip grid as Cloud TPU lays it out: v5p-8 2x2x1, v5p-64 2x4x4, v5e-8 2x4, v6e-16 4x4."""
        assert self.generation is not None
        dims = [2, 2, 1] if self.generation.torus_dims == 3 else [1, 1]  # 3-D slices start at one host
        while math.prod(dims) < self.num_chips:
            smallest = min(dims)
            last = max(i for i, d in enumerate(dims) if d == smallest)
            dims[last] *= 2
        return tuple(dims)


def parse_topology(spec: str) -> Topology:
    """``v5p-64`` / ``v5e-16`` / ``cpu:8`` -> :class:`Topology`; ValueError with the accepted forms."""
    if m := re.fullmatch(r"cpu:(\d+)", spec):
        if int(m.group(1)) < 1:
            raise ValueError(f"topology {spec!r}: cpu:N needs N >= 1")
        return Topology(spec, int(m.group(1)))
    m = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)-(\d+)", spec)
    if not m:
        raise ValueError(
            f"topology {spec!r}: use v4-N, v5p-N, v5e-N (v5litepod-N), v6e-N as Cloud TPU names slices, or cpu:N"
        )
    gen = GENERATIONS[ALIASES.get(m.group(1), m.group(1))]
    cores = int(m.group(2))
    chips, rest = divmod(cores, gen.cores_per_chip)
    if rest or chips < 1 or chips & (chips - 1):
        unit = "TensorCores (2 per chip)" if gen.cores_per_chip == 2 else "chips"
        raise ValueError(f"topology {spec!r}: N counts {unit} and must give a power-of-two number of chips")
    if gen.torus_dims == 3 and chips < 4:
        raise ValueError(f"topology {spec!r}: the smallest {gen.prefix} slice is {gen.prefix}-8 (4 chips)")
    return Topology(spec, chips, gen)


def quiet_libtpu() -> None:
    """Compile-only use of libtpu on a machine without TPUs: keep JAX on CPU, libtpu from probing the
    (absent) Cloud TPU metadata server, which it otherwise reports on stderr, and from taking its
    one-process-per-host lock, which only guards real chips (plans may run side by side)."""
    os.environ["JAX_PLATFORMS"] = "cpu"
    for key, value in {"TPU_SKIP_MDS_QUERY": "1", "TPU_ACCELERATOR_TYPE": "v5p-8",
                       "TPU_WORKER_HOSTNAMES": "localhost", "TPU_WORKER_ID": "0",
                       "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}.items():
        os.environ.setdefault(key, value)


def devices(topology: Topology, num_slices: int = 1) -> list[Any]:
    """Compile-only TPU devices of ``num_slices`` slices (libtpu), or this process's CPU devices."""
    import jax

    if topology.generation is None:
        if num_slices != 1:
            raise ValueError(f"topology {topology.name}: several slices need a TPU topology")
        found = jax.devices("cpu")
        if len(found) != topology.num_chips:
            raise ValueError(f"topology {topology.name}: this process has {len(found)} CPU devices "
                             f"(XLA_FLAGS --xla_force_host_platform_device_count wins over cpu:N)")
        return found
    if importlib.util.find_spec("libtpu") is None:
        raise ValueError(f"topology {topology.name} needs libtpu: pip install 'mlcd_jax[tpu]'")
    from jax.experimental import topologies

    grid = topology.grid
    host = tuple(min(g, h) for g, h in zip(grid + (1,) * (3 - len(grid)), HOST_BOUNDS))
    name = f"{topology.generation.prefix}:{'x'.join(map(str, grid))}"
    return topologies.get_topology_desc(
        platform="tpu", topology_name=name, chip_config_name=topology.generation.chip_config,
        chips_per_host_bounds=host, num_slices=num_slices,
    ).devices


# libtpu's refusals: "Used 20.50G of 15.48G hbm" (whole program) or "the total memory required for HLO
# temporaries (108.11G) exceeds available HBM (15.75G)" (temporaries alone, a lower bound of the total).
_OOM = (re.compile(r"Used ([\d.]+)([KMGT]) of [\d.]+[KMGT] hbm"),
        re.compile(r"HLO temporaries \(([\d.]+)([KMGT])\) exceeds available HBM"))


def _reported_usage(message: str) -> tuple[int, bool] | None:
    """(bytes libtpu said the program needs, whether that is temporaries only) from its out-of-memory
    error; None if the error is another one."""
    for temporaries_only, pattern in enumerate(_OOM):
        if m := pattern.search(message):
            return int(float(m.group(1)) * 1024 ** ("KMGT".index(m.group(2)) + 1)), bool(temporaries_only)
    return None


_STEP_MODULE = "jit_step_fn"
# A megascale send: "%send.3 = (bf16[24,8,128]{...}, u32[]..., token[]) send(...), ...
# _xla_megascale_transfer_type="ALL_REDUCE"": its payload is the tuple's first shape.
_SEND = re.compile(r"= \((\w+)\[([\d,]*)\][^ ]* .* send\(.*_xla_megascale_transfer_type=\"(\w+)\"")
_COMPUTATION = re.compile(r"(ENTRY )?%([\w.-]+) \(")  # a computation's header line
_CALLED = re.compile(r"\b(body|condition|calls|to_apply|branch_computations|true_computation|false_computation)"
                     r"=\{?(%[\w.-]+(?:, ?%[\w.-]+)*)")
_DEF = re.compile(r"\s+(?:ROOT )?%([\w.-]+) = ")  # an instruction's name
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_BITS = re.compile(r"[a-z]+(\d+)")  # an HLO element type's width: s32, bf16, f8e4m3fn; pred is a byte


def dump_hlo(directory: str) -> None:
    """Makes XLA (and libtpu, which reads the same flags) write the train step's optimized HLO as text
    under ``directory``; call before JAX starts its backends."""
    flags_now = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = (f"{flags_now} --xla_dump_to={directory} --xla_dump_hlo_as_text "
                               f"--xla_dump_hlo_module_re={_STEP_MODULE}")


def cross_slice_bytes(hlo_text: str) -> dict[str, int]:
    """Bytes one chip sends to other slices per step, by collective kind, from an optimized HLO module's
    text (the megascale ``send`` ops libtpu lowers cross-slice collectives to). A send inside a loop
    counts once per iteration (see :func:`_trip_count`)."""
    blocks: dict[str, list[str]] = {}
    entry = ""
    lines: list[str] = []
    for line in hlo_text.splitlines():
        if header := _COMPUTATION.match(line):
            lines = blocks.setdefault(header.group(2), [])
            entry = header.group(2) if header.group(1) else entry
        else:
            lines.append(line)
    defs = {m.group(1): line for body in blocks.values() for line in body if (m := _DEF.match(line))}
    callers: dict[str, list[tuple[str, int]]] = {}  # computation -> (caller, times per call of the caller)
    for name, body in blocks.items():
        for line in body:
            trip = _trip_count(line, blocks, defs) if " while(" in line else 1
            for key, callees in _CALLED.findall(line):
                for callee in callees.split(","):
                    callers.setdefault(callee.strip().lstrip("%"), []).append((name, trip if key == "body" else 1))

    @functools.cache
    def runs(name: str) -> int:
        """How often computation ``name`` runs in one step."""
        return 1 if name == entry else sum(runs(caller) * times for caller, times in callers.get(name, []))

    sent: dict[str, int] = {}
    for name, body in blocks.items():
        for line in body:
            if send := _SEND.search(line):
                dtype, dims, kind = send.groups()
                bits = _BITS.match(dtype)
                size = math.prod(int(d) for d in dims.split(",") if d) * (int(bits.group(1)) // 8 if bits else 1)
                sent[kind] = sent.get(kind, 0) + size * runs(name)
    return sent


def _trip_count(loop: str, blocks: dict[str, list[str]], defs: dict[str, str]) -> int:
    """Iterations of the ``while`` instruction ``loop``: its ``known_trip_count``, else, for a counted
    loop (``i < N`` in its condition), N minus the counter's constant start (1 after libtpu peeled the
    first iteration); 1 when neither can be read."""
    if known := _TRIP.search(loop):
        return int(known.group(1))
    condition = re.search(r"condition=%([\w.-]+)", loop)
    init = re.search(r" while\(%([\w.-]+)\)", loop)
    cond = "\n".join(blocks.get(condition.group(1), [])) if condition else ""
    bound = re.search(r"s32\[\][^ ]* constant\((\d+)\)", cond)
    if not (init and bound and "direction=LT" in cond):
        return 1
    counter = re.search(r" tuple\(%([\w.-]+)", defs.get(init.group(1), ""))
    line = defs.get(counter.group(1), "") if counter else ""
    while copied := re.search(r" copy\(%([\w.-]+)\)", line):  # the counter's start, through its copies
        line = defs.get(copied.group(1), "")
    start = re.search(r" constant\((\d+)\)", line)
    return int(bound.group(1)) - (int(start.group(1)) if start else 0)


def _cross_slice(hlo_dir: str | None, topology: Topology, num_slices: int) -> dict[str, Any]:
    """The contract's ``cross_slice`` entry from the train step dumped under ``hlo_dir`` (one slice: zeros)."""
    if num_slices == 1:
        return {"bytes_per_chip": 0, "bytes_per_step": 0, "by_collective": {}}
    [path] = glob.glob(os.path.join(hlo_dir, f"*.{_STEP_MODULE}*.after_optimizations.txt"))
    with open(path) as f:
        by_collective = cross_slice_bytes(f.read())
    per_chip = sum(by_collective.values())
    return {"bytes_per_chip": per_chip, "bytes_per_step": per_chip * topology.num_chips * num_slices,
            "by_collective": by_collective}


def plan(config: Any, topology: Topology, num_slices: int = 1, hlo_dir: str | None = None) -> dict[str, Any]:
    """Compiles the train step of ``config`` for ``num_slices`` slices of ``topology`` and returns the
    contract's dict; ``hlo_dir``: where :func:`dump_hlo` made libtpu write the step (needed for the
    ``cross_slice`` figures of several slices, null without it)."""
    import jax
    import jax.numpy as jnp

    from mlcd_jax import sharding, train
    from mlcd_jax.config_lib import train_augment
    from mlcd_jax.data import pipeline

    mesh = sharding.make_mesh(dict(config.mesh), devices=devices(topology, num_slices))
    train.validate(config, mesh)
    steps = config.num_train_steps if config.num_train_steps > 0 else 10_000  # shapes only
    setup = train.TrainSetup.create(config, mesh, steps)
    size, b, canvas = config.data.image_size, config.batch_size, 2 * config.data.image_size
    batch_sharding = sharding.batch_sharding(mesh, setup.rules)

    def spec(shape: tuple[int, ...], dtype: Any) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding)

    batch = {  # what the streamed input path feeds the step: uint8 canvases of twice the image size
        "image": spec((b, canvas, canvas, 3), jnp.uint8), "size": spec((b, 2), jnp.int32),
        "seed": spec((b, 2), jnp.uint32), "labels": spec((b, config.loss.top_l), jnp.int32),
    }
    batch.update({name: spec((b, *shape), dtype) for name, (shape, dtype) in setup.objective.input_specs(config).items()})

    def preprocess(canvases: dict[str, jax.Array]) -> dict[str, jax.Array]:
        return pipeline.canvas_to_inputs(canvases, image_size=size, augment=train_augment(config),
                                         crop_scale=tuple(config.data.crop_scale))

    result: dict[str, Any] = {
        "topology": topology.name, "num_slices": num_slices, "num_chips": topology.num_chips,
        "hbm_bytes_per_chip": topology.hbm_bytes_per_chip,
        "per_chip": dict.fromkeys(("argument_bytes", "output_bytes", "temp_bytes", "total_bytes")),
        "cross_slice": None, "fits": False, "xla_flops_per_step": None, "model_flops_per_step": setup.flops_per_step,
        "head": setup.objective.plan(),
    }
    t0 = time.perf_counter()
    lowered = train.make_train_step(setup, preprocess).lower(setup.abstract_state, batch)
    t1 = time.perf_counter()
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as err:
        reported = _reported_usage(str(err))
        if reported is None:
            raise
        used, temporaries_only = reported
        result["per_chip"]["total_bytes"] = used
        if temporaries_only:
            result["per_chip"]["temp_bytes"] = used
        print(f"does not fit: libtpu reports {used / GIB:.2f} GiB"
              f"{' of temporaries alone' if temporaries_only else ''} per chip", file=sys.stderr, flush=True)
        return result
    print(f"lowered in {t1 - t0:.0f} s, compiled in {time.perf_counter() - t1:.0f} s", file=sys.stderr, flush=True)
    m = compiled.memory_analysis()
    total = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
    result["per_chip"] = {
        "argument_bytes": int(m.argument_size_in_bytes), "output_bytes": int(m.output_size_in_bytes),
        "temp_bytes": int(m.temp_size_in_bytes), "total_bytes": int(total),
    }
    if topology.generation is not None and (num_slices == 1 or hlo_dir is not None):
        result["cross_slice"] = _cross_slice(hlo_dir, topology, num_slices)
    hbm = topology.hbm_bytes_per_chip
    result["fits"] = None if hbm is None else total <= hbm  # fake CPU devices have no capacity
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    if cost and cost.get("flops"):
        result["xla_flops_per_step"] = float(cost["flops"]) * mesh.size
    return result


def main(argv: list[str]) -> None:
    del argv
    config = loaded_config()
    if FLAGS.json and not fileio.is_remote(FLAGS.json) and not os.path.isdir(os.path.dirname(FLAGS.json) or "."):
        config_error(f"--json={FLAGS.json}: its folder does not exist (checked before compiling)")
    try:
        topology = parse_topology(FLAGS.topology)
    except ValueError as err:
        config_error(err)
    hlo_dir = None
    if topology.generation is None:
        flags_now = os.environ.get("XLA_FLAGS", "")
        if "xla_force_host_platform_device_count" not in flags_now:
            os.environ["XLA_FLAGS"] = f"{flags_now} --xla_force_host_platform_device_count={topology.num_chips}"
    else:
        quiet_libtpu()
        if FLAGS["num-slices"].value > 1:
            hlo_dir = tempfile.mkdtemp(prefix="mlcd_jax_aot_hlo_")
            dump_hlo(hlo_dir)

    print(f"compiling {config.model.name} @ {config.data.image_size}px, k={config.loss.num_classes:,}, "
          f"global batch {config.batch_size:,} for {FLAGS['num-slices'].value} x {topology.name} "
          f"({topology.num_chips} chips each)", file=sys.stderr, flush=True)
    try:
        result = plan(config, topology, FLAGS["num-slices"].value, hlo_dir)
    except ValueError as err:  # ConfigError too
        config_error(err)
    finally:
        if hlo_dir is not None:
            shutil.rmtree(hlo_dir, ignore_errors=True)
    text = json.dumps(result, indent=2)
    print(text)
    if FLAGS.json:
        from etils import epath

        epath.Path(FLAGS.json).write_text(text + "\n")


if __name__ == "__main__":
    _define_flags()
    app.run(main, flags_parser=parse_flags)
