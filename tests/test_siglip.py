"""SigLIP (``loss.kind=siglip``): the ring-chunked sigmoid loss over 8 fake devices against a NumPy float64
reference (loss and gradients w.r.t. both embeddings, the temperature and the bias), the same on one
device, no B×B array in the compiled program, and the objective in the trainer (big_vision's t = 10,
b = -10 at the start, both trained)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from mlcd_jax import sharding, train
from mlcd_jax.config_lib import base_config
from mlcd_jax.objectives.siglip import sigmoid_loss

B, D = 32, 12


def _reference(x: np.ndarray, y: np.ndarray, log_t: float, b: float) -> tuple[float, dict[str, object]]:
    """``-1/B Σ_ij log σ(y_ij (t·cos_ij + b))`` and its gradients, written out in float64."""
    xn_norm, yn_norm = np.linalg.norm(x, axis=1, keepdims=True), np.linalg.norm(y, axis=1, keepdims=True)
    xn, yn = x / xn_norm, y / yn_norm
    t = math.exp(log_t)
    cos = xn @ yn.T
    z = t * cos + b
    sign = 2 * np.eye(len(x)) - 1
    loss = np.sum(np.logaddexp(0.0, -sign * z)) / len(x)  # -log σ(u) = log(1 + e^-u)
    dz = -sign / (1 + np.exp(sign * z)) / len(x)  # d/dz of log(1 + e^{-s z}) = -s σ(-s z)
    d_cos = dz * t
    dxn, dyn = d_cos @ yn, d_cos.T @ xn
    grads = {
        "image": (dxn - xn * np.sum(dxn * xn, axis=1, keepdims=True)) / xn_norm,
        "text": (dyn - yn * np.sum(dyn * yn, axis=1, keepdims=True)) / yn_norm,
        "log_t": np.sum(dz * cos) * t,
        "bias": np.sum(dz),
    }
    return loss, grads


def _loss_and_grads(mesh: jax.sharding.Mesh, axes: tuple[str, ...]):
    def f(x, y, log_t, b):
        return sigmoid_loss(x, y, log_t, b, mesh=mesh, batch_axes=axes)[0]

    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3)))


@pytest.mark.parametrize("log_t,b", [(math.log(10.0), -10.0), (1.0, -2.0), (math.log(100.0), 0.5)])  # the last: at the clamp
def test_ring_loss_and_gradients_match_numpy_on_8_devices(log_t, b):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(B, D)), rng.normal(size=(B, D))
    y[:4] = x[:4] + 0.1 * rng.normal(size=(4, D))  # some pairs close, so positives and negatives both matter
    mesh = sharding.make_mesh({"data": 8})
    split = NamedSharding(mesh, P("data"))
    args = (jax.device_put(x.astype(np.float32), split), jax.device_put(y.astype(np.float32), split),
            jnp.float32(log_t), jnp.float32(b))
    loss, (gx, gy, gt, gb) = _loss_and_grads(mesh, ("data",))(*args)
    want, grads = _reference(x, y, log_t, b)
    np.testing.assert_allclose(float(loss), want, rtol=2e-5)
    np.testing.assert_allclose(np.asarray(gx), grads["image"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(gy), grads["text"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(float(gt), grads["log_t"], rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(float(gb), grads["bias"], rtol=1e-4, atol=1e-7)
    # one device (no ring) gives the same value
    one = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
    alone, _ = _loss_and_grads(one, ())(x.astype(np.float32), y.astype(np.float32), jnp.float32(log_t),
                                         jnp.float32(b))
    np.testing.assert_allclose(float(alone), float(loss), rtol=1e-6)


def test_metrics_split_the_loss_and_no_device_holds_a_batch_by_batch_array():
    mesh = sharding.make_mesh({"data": 8})
    split = NamedSharding(mesh, P("data"))
    x = jax.device_put(jnp.asarray(np.random.default_rng(1).normal(size=(B, D)), jnp.float32), split)

    def f(x, y):
        return sigmoid_loss(x, y, jnp.float32(math.log(10.0)), jnp.float32(-10.0), mesh=mesh, batch_axes=("data",))

    loss, metrics = jax.jit(f)(x, x)
    assert float(metrics["loss_pos"]) + float(metrics["loss_neg"]) == pytest.approx(float(loss), rel=1e-6)
    assert float(metrics["mean_pos_cos"]) == pytest.approx(1.0, abs=1e-5)  # each image with itself
    assert float(metrics["logit_scale"]) == pytest.approx(10.0) and float(metrics["logit_bias"]) == -10.0
    hlo = jax.jit(jax.grad(lambda x, y: f(x, y)[0], argnums=(0, 1))).lower(x, x).compile().as_text()
    assert f"[{B},{B}]" not in hlo and f"[{B // 8},{B // 8}]" in hlo  # per-device blocks only
    assert "collective-permute" in hlo


def test_siglip_trains_in_the_trainer_from_big_visions_start():
    c = base_config()
    c.model.name, c.model.dtype, c.data.image_size, c.model.overrides = "tiny", "float32", 16, {"patch_size": 8}
    c.text.name, c.text.context_length = "tiny", 8
    c.text.overrides = {"width": 32, "depth": 1, "num_heads": 2, "mlp_dim": 64}
    c.loss.kind, c.batch_size, c.warmup_steps, c.learning_rate = "siglip", 16, 0, 1e-2
    mesh = sharding.make_mesh(dict(c.mesh))
    train.validate(c, mesh)
    setup = train.TrainSetup.create(c, mesh, num_train_steps=10)
    state = setup.init_state(0)
    assert float(state["logit_scale"]) == pytest.approx(math.log(10.0)) and float(state["logit_bias"]) == -10.0
    rng = np.random.default_rng(0)
    batch = {"image": rng.normal(size=(16, 16, 16, 3)).astype(np.float32),
             "labels": np.zeros((16, 1), np.int32), "tokens": rng.integers(1, 100, (16, 8)).astype(np.int32)}
    new, metrics = train.make_train_step(setup)(state, sharding.host_to_global(batch, mesh, setup.rules))
    assert np.isfinite(float(metrics["loss"])) and float(metrics["logit_bias"]) == -10.0
    assert float(new["logit_bias"]) != -10.0 and float(new["logit_scale"]) != pytest.approx(math.log(10.0))
    assert setup.objective.groups["logit_bias"] == "scale"  # as the temperature: no weight decay, not clipped
