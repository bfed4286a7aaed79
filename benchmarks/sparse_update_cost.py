"""What XLA:TPU's cost model charges a lazy (row-sparse) prototype update against dense AdamW.

``python benchmarks/sparse_update_cost.py [--rows 250000] [--dim 768] [--touched 32768] [--topology v5p-8]``

Compiles, with libtpu for one chip of the slice (no TPU needed), the prototype matrix's AdamW update on
one shard (a v5p-8 chip holds 250,000 of k = 1M rows; at batch 4,096 the head touches 32,768 of them):
dense (every row: parameter, both moments, gradient) against the lazy form (gather the touched rows of
the parameter and both moments, update them, scatter them back; the buffers donated), and the gather
and the scatter alone. Prints ``bytes accessed`` from ``cost_analysis()`` and the ratio to dense, and the
bytes the touched rows actually hold, to compare the cost model against the data moved.
"""

from __future__ import annotations

import argparse

from mlcd_jax import aot


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=250_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--touched", type=int, default=32_768)
    parser.add_argument("--topology", default="v5p-8")
    a = parser.parse_args()
    aot.quiet_libtpu()
    import jax
    import jax.numpy as jnp
    from jax.sharding import SingleDeviceSharding

    sharding = SingleDeviceSharding(aot.devices(aot.parse_topology(a.topology))[0])
    spec = lambda *shape, dtype=jnp.float32: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)  # noqa: E731
    rows = dict(mode="promise_in_bounds", unique_indices=True, indices_are_sorted=True)

    def adam(w, m, v, g):
        m, v = 0.9 * m + 0.1 * g, 0.98 * v + 0.02 * g * g
        return w - 1e-3 * (m / (jnp.sqrt(v) + 1e-6) + 0.2 * w), m, v

    def lazy(w, m, v, g, idx):
        new = adam(w.at[idx].get(**rows), m.at[idx].get(**rows), v.at[idx].get(**rows), g)
        return tuple(x.at[idx].set(y, **rows) for x, y in zip((w, m, v), new))

    full, part, idx = spec(a.rows, a.dim), spec(a.touched, a.dim), spec(a.touched, dtype=jnp.int32)
    programs = {
        "dense AdamW": (adam, (full, full, full, full), (0, 1, 2)),
        "lazy AdamW (gather, update, scatter)": (lazy, (full, full, full, part, idx), (0, 1, 2)),
        "gather of the touched rows": (lambda w, i: w.at[i].get(**rows), (full, idx), ()),
        "scatter of the touched rows": (lambda w, u, i: w.at[i].set(u, **rows), (full, part, idx), (0,)),
    }
    dense = None
    print(f"{a.rows:,} rows x {a.dim}, {a.touched:,} touched, one {a.topology} chip; the touched rows hold "
          f"{a.touched * a.dim * 4 / 1e6:.0f} MB per array")
    for name, (fn, args, donate) in programs.items():
        cost = jax.jit(fn, donate_argnums=donate).lower(*args).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        accessed = float(cost["bytes accessed"])
        dense = dense or accessed
        print(f"{name:40s} {accessed / 1e9:7.2f} GB accessed  {accessed / dense:5.2f}x dense")


if __name__ == "__main__":
    main()
