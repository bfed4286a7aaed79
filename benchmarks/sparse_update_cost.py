"""What XLA:TPU's cost model charges the prototypes' AdamW update, dense against ``loss.proto_update=lazy``.

``python benchmarks/sparse_update_cost.py [--topology v5p-8] [--num-classes 1000000] [--dim 768]
[--batch 4096] [--touched 32768 1024 ...]``

Part 1 compiles, with libtpu for the named slice (no TPU needed), the trainer's own optimizer update
(``TrainSetup.tx``: AdamW, prototype rows split over every chip) for k prototypes of ``dim`` with a
negligible image tower (the tiny ViT projected to ``dim``), once dense and once lazy. The lazy
program is what the train step runs: take the sampled rows of the matrix and both moments, update
them, write them back (``row_sparse``, ``take_rows`` / ``put_rows``), for the rows a batch of
``--batch`` × l = 8 samples at r = 0.1. It prints ``bytes accessed`` per chip from ``cost_analysis()``,
the ratio lazy / dense, and the bytes the sampled rows hold.

Part 2 compiles the trainer's gather and scatter of ``--touched`` rows (``take_rows``, ``put_rows``) of
one chip's shard alone, the operations a row-sparse update is made of, against the bytes those rows hold.
"""

from __future__ import annotations

import argparse
import functools

from mlcd_jax import aot


def _accessed(compiled) -> float:
    cost = compiled.cost_analysis()
    return float((cost[0] if isinstance(cost, list) else cost)["bytes accessed"])


def update_programs(topology: str, num_classes: int, dim: int, batch: int) -> None:
    """Part 1: the trainer's dense and lazy optimizer updates, per chip."""
    import jax
    import jax.numpy as jnp

    from mlcd_jax import sharding, train
    from mlcd_jax.config_lib import base_config
    from mlcd_jax.losses import Selection
    from mlcd_jax.train.step import apply_gradients

    setups, chips = {}, aot.devices(aot.parse_topology(topology))
    for update in ("dense", "lazy"):
        c = base_config()
        c.model.name, c.model.overrides, c.data.image_size = "tiny", {"proj_dim": dim, "patch_size": 8}, 32
        c.batch_size, c.loss.num_classes, c.loss.proto_update = batch, num_classes, update
        c.mesh.data, c.mesh.fsdp = 1, -1
        mesh = sharding.make_mesh(dict(c.mesh), devices=chips)
        setups[update] = train.TrainSetup.create(c, mesh, num_train_steps=1000)
    dense, lazy = setups["dense"], setups["lazy"]
    goal, head = lazy.objective, lazy.objective.head
    trainable = {k: dense.abstract_state[k] for k in goal.trainable}
    opt_state = dense.abstract_state["opt_state"]
    rows_sharding = jax.sharding.NamedSharding(lazy.mesh, jax.sharding.PartitionSpec(goal.proto_axes))
    n = goal.shards

    def rows_spec(shape: tuple[int, ...], dtype=jnp.float32, sharding=rows_sharding) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

    chosen = Selection(rows_spec((n * head.capacity,), jnp.int32), rows_spec((n * head.capacity,), bool),
                       rows_spec((n,), jnp.int32), head.rows_per_shard)
    row_grads = {**trainable, "proto": rows_spec((n * head.capacity, dim), sharding=trainable["proto"].sharding)}

    def dense_update(grads, opt_state, params):
        return apply_gradients(dense, grads, opt_state, params)

    def lazy_update(grads, opt_state, params, chosen):  # as the train step: the rows, then back
        rows = {**params, "proto": goal.take(params["proto"], chosen)}
        return apply_gradients(lazy, grads, opt_state, rows, (params["proto"], chosen))

    first = _accessed(jax.jit(dense_update, donate_argnums=(1, 2)).lower(trainable, opt_state, trainable).compile())
    lowered = jax.jit(lazy_update, donate_argnums=(1, 2)).lower(row_grads, opt_state, trainable, chosen)
    second = _accessed(lowered.compile())
    held = head.capacity * dim * 4
    print(f"{topology}, k = {num_classes:,} x {dim}: {head.rows_per_shard:,} rows per chip, {head.capacity:,} "
          f"sampled at batch {batch:,} (l = 8, r = 0.1); they hold {held / 1e6:.0f} MB per array per chip")
    print(f"  dense AdamW update   {first / 1e9:7.2f} GB accessed per chip  1.00x")
    print(f"  lazy AdamW update    {second / 1e9:7.2f} GB accessed per chip  {second / first:.2f}x dense")


def row_programs(topology: str, rows: int, dim: int, touched: list[int]) -> None:
    """Part 2: the trainer's gather and scatter (``take_rows``, ``put_rows``) of ``touched`` rows of one
    chip's [rows, dim] shard."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from mlcd_jax.losses import Selection, put_rows, take_rows

    mesh = Mesh(aot.devices(aot.parse_topology(topology))[:1], ("fsdp",))
    sharding = NamedSharding(mesh, P("fsdp"))
    spec = lambda *shape, dtype=jnp.float32: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)  # noqa: E731
    full = spec(rows, dim)
    print(f"one {topology} chip's {rows:,} x {dim} shard ({rows * dim * 4 / 1e6:.0f} MB):")
    for count in touched:
        chosen = Selection(spec(count, dtype=jnp.int32), spec(count, dtype=bool), spec(1, dtype=jnp.int32), rows)
        gather = jax.jit(functools.partial(take_rows, mesh=mesh, proto_axes=("fsdp",))).lower(full, chosen).compile()
        scatter = jax.jit(functools.partial(put_rows, mesh=mesh, proto_axes=("fsdp",)),
                          donate_argnums=(0,)).lower(full, chosen, spec(count, dim)).compile()
        held = count * dim * 4
        print(f"  {count:>7,} rows ({held / 1e6:6.1f} MB): gather {_accessed(gather) / 1e6:8.1f} MB "
              f"({_accessed(gather) / held:5.1f}x the rows), scatter {_accessed(scatter) / 1e6:8.1f} MB "
              f"({_accessed(scatter) / held:5.1f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--topology", default="v5p-8")
    parser.add_argument("--num-classes", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--touched", type=int, nargs="+", default=[1024, 2048, 8192, 32768])
    a = parser.parse_args()
    aot.quiet_libtpu()
    update_programs(a.topology, a.num_classes, a.dim, a.batch)
    chips = aot.parse_topology(a.topology).num_chips
    row_programs(a.topology, -(-a.num_classes // chips), a.dim, a.touched)


if __name__ == "__main__":
    main()
