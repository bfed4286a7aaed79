"""Linear probe on the accelerators: scikit-learn's probe (:mod:`mlcd_jax.evaluate.linear_probe`, kept as the
small-set reference) with the fits in JAX, for feature sets too large for single-thread scikit-learn.

The same protocol: features standardised with train's statistics; multinomial logistic regression with
scikit-learn's objective (mean cross-entropy + ``||W||^2 / (2 C n)``, intercepts not penalised); C chosen by
CLIP's coarse-to-fine search (:func:`~mlcd_jax.evaluate.linear_probe.search_c`) on a held-out part of train
(the same split), each fit warm-started from its neighbour's; then a refit on all of train.

Each fit is full-batch L-BFGS (``optax.lbfgs``, zoom line search) inside one jitted ``while_loop`` that
stops at ``max_iter`` or when the gradient's largest entry is below ``tol`` (scikit-learn's lbfgs test).
Feature rows are sharded over the devices (a 1-D mesh; rows padded to a multiple of it and masked out),
the weights replicated: XLA sums the per-device parts of the loss and gradient, so a feature matrix
needs only 1 / devices of it per device. One compiled program serves every C (C is an argument).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.tree_utils as otu
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mlcd_jax.evaluate.linear_probe import checked_inputs, search_c, split

Params = dict[str, jax.Array]


def _loss(params: Params, x: jax.Array, y: jax.Array, mask: jax.Array, inv_c: jax.Array) -> jax.Array:
    """scikit-learn's multinomial objective, per row: mean cross-entropy + ``||W||^2 / (2 C n)``."""
    logits = jnp.matmul(x, params["w"], precision=jax.lax.Precision.HIGHEST) + params["b"]
    nll = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, y[:, None], axis=-1)[:, 0]
    n = jnp.sum(mask)
    return jnp.sum(mask * nll) / n + 0.5 * inv_c / n * jnp.sum(params["w"] ** 2)


@functools.partial(jax.jit, static_argnames=("max_iter",))
def _fit(params: Params, x: jax.Array, y: jax.Array, mask: jax.Array, c: jax.Array, *, max_iter: int,
         tol: float) -> tuple[Params, jax.Array]:
    """L-BFGS from ``params`` at C = ``c`` on the rows with ``mask``; returns the fit and its iteration count."""
    fun = functools.partial(_loss, x=x, y=y, mask=mask, inv_c=1.0 / c)
    solver = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(fun)

    def step(carry: tuple[Params, Any]) -> tuple[Params, Any]:
        params, state = carry
        value, grad = value_and_grad(params, state=state)
        updates, state = solver.update(grad, state, params, value=value, grad=grad, value_fn=fun)
        return optax.apply_updates(params, updates), state

    def going(carry: tuple[Params, Any]) -> jax.Array:
        count = otu.tree_get(carry[1], "count")
        grad = otu.tree_get(carry[1], "grad")
        largest = jnp.max(jnp.stack([jnp.max(jnp.abs(g)) for g in jax.tree.leaves(grad)]))
        return (count == 0) | ((count < max_iter) & (largest >= tol))

    params, state = jax.lax.while_loop(going, step, (params, solver.init(params)))
    return params, otu.tree_get(state, "count")


@jax.jit
def _accuracy(params: Params, x: jax.Array, y: jax.Array, mask: jax.Array) -> jax.Array:
    """Fraction of the masked rows whose arg-max logit is their label."""
    logits = jnp.matmul(x, params["w"], precision=jax.lax.Precision.HIGHEST) + params["b"]
    return jnp.sum(mask * (jnp.argmax(logits, axis=-1) == y)) / jnp.sum(mask)


class _Rows:
    """Feature rows, labels and row masks on the devices, rows split over a 1-D mesh (padded, masked out)."""

    def __init__(self, features: np.ndarray, labels: np.ndarray, mesh: Mesh):
        pad = -len(features) % mesh.size
        rows = NamedSharding(mesh, P("rows"))
        self.mesh = mesh
        self.x = jax.device_put(np.pad(features.astype(np.float32), ((0, pad), (0, 0))), rows)
        self.y = jax.device_put(np.pad(labels.astype(np.int32), (0, pad)), rows)
        self.n = len(features)

    def mask(self, index: np.ndarray) -> jax.Array:
        """A 0/1 row mask of ``index`` (rows of the unpadded set)."""
        mask = np.zeros(len(self.y), np.float32)
        mask[index] = 1.0
        return jax.device_put(mask, NamedSharding(self.mesh, P("rows")))


def device_linear_probe(
    train_features: np.ndarray, train_labels: np.ndarray, test_features: np.ndarray, test_labels: np.ndarray, *,
    val_fraction: float = 0.2, c_grid: Sequence[float] | None = None, seed: int = 0, max_iter: int = 1000,
    tol: float = 1e-4, devices: list[jax.Device] | None = None,
) -> dict[str, Any]:
    """:func:`~mlcd_jax.evaluate.linear_probe.linear_probe` with JAX fits over ``devices`` (default: this
    process's); the same arguments and result (``top1``, ``best_c``, ``val_top1``) plus ``iterations``
    ({C: L-BFGS iterations of its search fit})."""
    train_features, train_labels, test_features, test_labels = checked_inputs(
        train_features, train_labels, test_features, test_labels, val_fraction, c_grid)
    mean = train_features.mean(axis=0)
    std = train_features.std(axis=0)
    std[std == 0] = 1.0  # as StandardScaler: a constant feature stays 0
    mesh = Mesh(np.asarray(devices or jax.local_devices()), ("rows",))
    train = _Rows((train_features - mean) / std, train_labels, mesh)
    test = _Rows((test_features - mean) / std, test_labels, mesh)
    fit_idx, val_idx = split(train_labels, val_fraction, seed)
    fit_mask, val_mask, all_mask = train.mask(fit_idx), train.mask(val_idx), train.mask(np.arange(train.n))
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    counts = np.bincount(train_labels[fit_idx], minlength=num_classes)
    log_freq = np.log(np.maximum(counts, 0.5) / len(fit_idx))  # the C -> 0 optimum (an absent class: ~0.5 rows)
    prior = {"w": jnp.zeros((train_features.shape[1], num_classes)), "b": jnp.asarray(log_freq - log_freq.mean())}
    fits: dict[float, Params] = {}
    iterations: dict[float, int] = {}

    def validate(c: float, start: float | None) -> float:
        fits[c], count = _fit(fits.get(start, prior), train.x, train.y, fit_mask, jnp.float32(c),
                              max_iter=max_iter, tol=tol)
        iterations[c] = int(count)
        return float(_accuracy(fits[c], train.x, train.y, val_mask))

    best_c, val_top1 = search_c(validate, c_grid)
    final, _ = _fit(fits[best_c], train.x, train.y, all_mask, jnp.float32(best_c), max_iter=max_iter, tol=tol)
    top1 = float(_accuracy(final, test.x, test.y, test.mask(np.arange(test.n))))
    return {"top1": top1, "best_c": best_c, "val_top1": val_top1, "iterations": dict(sorted(iterations.items()))}
