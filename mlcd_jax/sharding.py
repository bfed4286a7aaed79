"""Device mesh, the one logical-axis -> mesh-axis rules table, and host-local <-> global arrays.

Models annotate every parameter with *logical* axis names (``"embed"``, ``"mlp"``, ``"heads"``,
``"proto"`` ...) through :func:`logical`, and pin their activations by ``"activation_*"`` names
through :func:`constrain`; nothing else in the code base names mesh axes for parameters or
activations. :data:`LOGICAL_RULES` is the single place that decides how those names land on the mesh
axes ``data`` (pure data parallel), ``fsdp`` (data parallel with sharded parameters) and ``model``
(tensor parallel). The prototype matrix (``"proto"``) is row-sharded over the mesh axes of its rule
(all of them by default: every device holds k / devices rows).

A run may override rules from its config (``config.mesh_rules = "embed=;proto=data,fsdp"``, see
:func:`parse_rules`); :func:`use_rules` makes a table the active one for everything traced inside it,
and every function here that takes ``rules`` defaults to the active table.

Activations keep the batch split over ``data`` *and* ``fsdp`` (each device computes only its share
of the batch) while the ``embed`` dim of every weight is split over ``fsdp``; pinning both makes XLA
all-gather each layer's weights over ``fsdp`` instead of all-gathering the activations.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "model")

# logical axis -> mesh axis (or tuple of mesh axes, or None = replicated).
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "model"),
    ("heads", "model"),
    ("kv", None),
    ("proto", ("data", "fsdp", "model")),
    ("layers", None),
    ("norm", None),
    ("patch", None),
    ("channels", None),
    ("seq", None),
    ("vocab", "model"),  # the text tower's token table rows (49,408 = 2^6 x 772: splits up to 64 ways)
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_mlp", "model"),
    ("activation_heads", "model"),
    ("activation_kv", None),
)

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]

_ACTIVE_RULES: contextvars.ContextVar[Rules] = contextvars.ContextVar("mlcd_jax_rules", default=LOGICAL_RULES)


def parse_rules(overrides: str) -> Rules:
    """:data:`LOGICAL_RULES` with a config's overrides, ``"name=axis,axis;name="`` (empty = replicated).

    An unknown logical name or mesh axis raises ``ValueError`` naming it.
    """
    table = dict(LOGICAL_RULES)
    for entry in filter(None, (e.strip() for e in overrides.split(";"))):
        name, sep, target = (part.strip() for part in entry.partition("="))
        if not sep or name not in table:
            raise ValueError(f"mesh rule {entry!r}: use NAME=AXIS[,AXIS] with NAME one of {sorted(table)}")
        axes = tuple(a.strip() for a in target.split(",") if a.strip())
        unknown = [a for a in axes if a not in MESH_AXES]
        if unknown:
            raise ValueError(f"mesh rule {entry!r}: unknown mesh axes {unknown}; known: {list(MESH_AXES)}")
        table[name] = axes or None
    return tuple(table.items())


@contextlib.contextmanager
def use_rules(rules: Rules) -> Iterator[None]:
    """Makes ``rules`` the table that :func:`constrain` and the other defaults use inside the block."""
    token = _ACTIVE_RULES.set(tuple(rules))
    try:
        yield
    finally:
        _ACTIVE_RULES.reset(token)


def active_rules(rules: Rules | None = None) -> Rules:
    """``rules``, or the table of the innermost :func:`use_rules` (default :data:`LOGICAL_RULES`)."""
    return _ACTIVE_RULES.get() if rules is None else rules


def logical(init: Callable[..., jax.Array], *axes: str | None) -> Callable[..., jax.Array]:
    """Wraps a Flax initializer so the parameter it creates carries logical axis names.

    Eager sharding is off: parameters are placed by :func:`state_shardings` under ``jax.jit``,
    which lets the same module be built abstractly, on one device, or directly sharded.
    """
    return nnx.with_partitioning(init, axes, eager_sharding=False)


def resolve_mesh_shape(
    spec: Mapping[str, int] | Sequence[tuple[str, int]], num_devices: int
) -> dict[str, int]:
    """Turns ``{"data": -1, "fsdp": 1, "model": 1}`` into concrete sizes whose product is the device count.

    At most one axis may be ``-1`` ("the rest"). Raises ``ValueError`` with the arithmetic spelled out
    when the sizes do not multiply to ``num_devices``.
    """
    items = list(spec.items()) if isinstance(spec, Mapping) else list(spec)
    names = [n for n, _ in items]
    if len(set(names)) != len(names):
        raise ValueError(f"mesh axis names repeat: {names}")
    rest = [n for n, s in items if s == -1]
    if len(rest) > 1:
        raise ValueError(f"only one mesh axis may be -1 (the rest); got {rest}")
    fixed = math.prod(s for _, s in items if s != -1)
    if any(s == 0 or s < -1 for _, s in items):
        raise ValueError(f"mesh sizes must be positive or -1; got {dict(items)}")
    if rest:
        if num_devices % fixed:
            raise ValueError(
                f"mesh {dict(items)}: the fixed axes multiply to {fixed}, which does not divide "
                f"the {num_devices} devices"
            )
        items = [(n, num_devices // fixed if s == -1 else s) for n, s in items]
    elif fixed != num_devices:
        raise ValueError(
            f"mesh {dict(items)} has {fixed} devices but {num_devices} are available; "
            "set one axis to -1 to take the rest"
        )
    return dict(items)


def make_mesh(
    spec: Mapping[str, int] | Sequence[tuple[str, int]] | None = None,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """Builds a mesh over ``devices`` (default: all) from name/size pairs, -1 meaning the rest.

    The default spec is pure data parallelism over the standard axes ``data``/``fsdp``/``model``. Devices
    of several TPU slices (multislice: they carry ``slice_index``) get a hybrid mesh whose ``data`` axis
    is split over the slices first, so only data-parallel traffic crosses the slower network between them.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(spec or {"data": -1, "fsdp": 1, "model": 1}, len(devices))
    num_slices = len({getattr(d, "slice_index", 0) for d in devices})
    if num_slices > 1:
        return Mesh(_multislice_grid(shape, devices, num_slices), tuple(shape.keys()))
    try:
        grid = mesh_utils.create_device_mesh(
            tuple(shape.values()), devices=devices, allow_split_physical_axes=True
        )
    except (AssertionError, NotImplementedError, ValueError):
        grid = np.asarray(devices).reshape(tuple(shape.values()))
    return Mesh(grid, tuple(shape.keys()))


def _multislice_grid(shape: Mapping[str, int], devices: Sequence[jax.Device], num_slices: int) -> np.ndarray:
    """The device grid over several TPU slices: the ``data`` axis spans the slices (over DCN, outermost),
    every other axis stays inside a slice (ICI)."""
    data = shape.get("data", 1)
    if data % num_slices:
        raise ValueError(f"mesh data axis {data} is not a multiple of the {num_slices} slices: only the data "
                         f"axis crosses slices (set --config.mesh.data to a multiple of {num_slices})")
    ici = tuple(n // num_slices if name == "data" else n for name, n in shape.items())
    dcn = tuple(num_slices if name == "data" else 1 for name in shape)
    return mesh_utils.create_hybrid_device_mesh(ici, dcn, devices=devices, allow_split_physical_axes=True)


def logical_to_mesh_spec(logical_axes: Sequence[str | None], rules: Rules | None = None) -> P:
    """Maps a tuple of logical axis names to a ``PartitionSpec`` through ``rules``.

    Unknown logical names raise, so a typo in a model's annotation cannot silently replicate a
    parameter. A mesh axis is used at most once per spec (later dims that would reuse it replicate).
    """
    table = dict(active_rules(rules))
    used: set[str] = set()
    out: list[Any] = []
    for name in logical_axes:
        if name is None:
            out.append(None)
            continue
        if name not in table:
            raise KeyError(f"logical axis {name!r} has no rule; known: {sorted(table)}")
        target = table[name]
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(a for a in axes if a not in used)
        used.update(axes)
        out.append(axes[0] if len(axes) == 1 else (axes or None))
    return P(*out)


def _fit_spec(spec: P, shape: Sequence[int], mesh: Mesh | AbstractMesh) -> P:
    """Drops mesh axes from dims they do not divide (e.g. tiny test models), logging each drop."""
    fitted: list[Any] = []
    for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        axes = (entry,) if isinstance(entry, str) else tuple(entry or ())
        axes = tuple(a for a in axes if a in mesh.shape)
        kept: list[str] = []
        for a in axes:
            if dim % (math.prod(mesh.shape[k] for k in kept) * mesh.shape[a]) == 0:
                kept.append(a)
            elif mesh.shape[a] > 1:
                logging.info("dim of size %d not divisible by mesh axis %r: replicated there", dim, a)
        fitted.append(kept[0] if len(kept) == 1 else (tuple(kept) or None))
    return P(*fitted)


def constrain(x: jax.Array, *logical_axes: str | None, rules: Rules | None = None) -> jax.Array:
    """Pins activation ``x``'s sharding by logical axis names (one per dim) when traced under a mesh.

    The mesh is the one set by ``jax.set_mesh`` (outside jit) or ``jax.sharding.use_abstract_mesh``
    (inside, as the train step does). With no mesh, or a one-device mesh, ``x`` is returned unchanged,
    so the model runs as before on one device and in HF interop. The constraint also pins the
    cotangent in the backward pass.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return x
    spec = _fit_spec(logical_to_mesh_spec(logical_axes, rules), x.shape, mesh)
    return jax.lax.with_sharding_constraint(x, spec)


def state_shardings(abstract_state: Any, mesh: Mesh, rules: Rules | None = None) -> Any:
    """NamedShardings for an (abstract) NNX state or any pytree of ``nnx.Variable``s.

    Variables annotated through :func:`logical` are mapped through ``rules``; unannotated leaves
    (optimizer counters, RNG keys, scalars) are replicated.
    """

    def one(leaf: Any) -> NamedSharding:
        value = leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf
        names = leaf.get_metadata().get("out_sharding") if isinstance(leaf, nnx.Variable) else None
        shape = getattr(value, "shape", ())
        if not names:
            return NamedSharding(mesh, P())
        return NamedSharding(mesh, _fit_spec(logical_to_mesh_spec(names, rules), shape, mesh))

    return jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def rule_axes(name: str, mesh: Mesh | AbstractMesh, rules: Rules | None = None) -> tuple[str, ...]:
    """The mesh axes (present in ``mesh``) that the rule of logical axis ``name`` maps to."""
    target = dict(active_rules(rules))[name]
    axes = (target,) if isinstance(target, str) else tuple(target or ())
    return tuple(a for a in axes if a in mesh.shape)


def batch_axes(mesh: Mesh, rules: Rules | None = None) -> tuple[str, ...]:
    """The mesh axes a global batch's leading dimension is split over (those of the ``batch`` rule)."""
    return rule_axes("batch", mesh, rules)


def proto_axes(mesh: Mesh, rules: Rules | None = None) -> tuple[str, ...]:
    """The mesh axes the prototype matrix's rows are split over (those of the ``proto`` rule)."""
    return rule_axes("proto", mesh, rules)


def data_parallel_size(mesh: Mesh, rules: Rules | None = None) -> int:
    """How many ways a global batch is split (the product of the batch axes' sizes)."""
    return math.prod(mesh.shape[a] for a in batch_axes(mesh, rules))


def batch_sharding(mesh: Mesh, rules: Rules | None = None) -> NamedSharding:
    """Sharding of a global batch: leading dim over the mesh axes the ``batch`` rule names."""
    return NamedSharding(mesh, P(batch_axes(mesh, rules)))


def host_to_global(local: Any, mesh: Mesh, rules: Rules | None = None) -> Any:
    """Assembles host-local numpy batches (leading dim = this host's share) into global jax Arrays."""
    sharding = batch_sharding(mesh, rules)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local
    )
