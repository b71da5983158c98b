"""The prior-preservation loss on hand-computed values, and its independence of the sharding."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dreambooth_jax.training.loss import min_snr_weights, per_example_mse, prior_preservation_loss
from dreambooth_jax.sharding import batch_sharding, make_mesh


def test_hand_computed_values_lambda_not_one():
    # 4 examples of shape (1, 1, 2): squared errors per example 1, 4, 9, 16 (means over 2 entries)
    pred = jnp.array([[[[1.0, 1.0]]], [[[2.0, 2.0]]], [[[3.0, 3.0]]], [[[4.0, 4.0]]]])
    target = jnp.zeros_like(pred)
    is_class = jnp.array([False, True, False, True])
    loss, m = prior_preservation_loss(pred, target, is_class, 0.5)
    np.testing.assert_allclose(m["instance_loss"], (1 + 9) / 2)
    np.testing.assert_allclose(m["prior_loss"], (4 + 16) / 2)
    np.testing.assert_allclose(loss, 5 + 0.5 * 10)
    w = jnp.array([1.0, 0.0, 0.5, 2.0])
    loss_w, _ = prior_preservation_loss(pred, target, is_class, 0.5, weights=w)
    np.testing.assert_allclose(loss_w, (1 + 4.5) / 2 + 0.5 * (0 + 32) / 2)


def test_without_class_examples_is_plain_mse():
    pred = jnp.arange(6.0).reshape(3, 2)
    loss, m = prior_preservation_loss(pred, jnp.zeros_like(pred), jnp.zeros(3, bool), 1.0)
    np.testing.assert_allclose(loss, per_example_mse(pred, jnp.zeros_like(pred)).mean())
    assert float(m["prior_loss"]) == 0.0


def test_min_snr_weights():
    snr = jnp.array([0.5, 5.0, 50.0])
    np.testing.assert_allclose(min_snr_weights(snr, 5.0, "epsilon"), [1.0, 1.0, 0.1])
    np.testing.assert_allclose(min_snr_weights(snr, 5.0, "v_prediction"), [0.5 / 1.5, 5 / 6, 5 / 51], rtol=1e-6)


def test_same_loss_on_8_devices_with_interleaved_halves():
    """Instance/class examples interleaved over 8 devices: the global result must not change
    (the bug of the old diffusers Flax script was a per-device split)."""
    assert len(jax.devices()) == 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"
    rng = np.random.RandomState(0)
    pred = rng.randn(16, 4, 4, 2).astype(np.float32)
    target = rng.randn(16, 4, 4, 2).astype(np.float32)
    is_class = np.array([i % 3 == 0 for i in range(16)])
    fn = jax.jit(lambda p, t, c: prior_preservation_loss(p, t, c, 0.3)[0])
    single = float(fn(pred, target, is_class))
    mesh = make_mesh(fsdp=2)
    put = lambda a: jax.device_put(a, batch_sharding(mesh, a.ndim))
    sharded = float(fn(put(pred), put(target), put(is_class)))
    err = ((pred - target) ** 2).mean(axis=(1, 2, 3))
    expected = err[~is_class].mean() + 0.3 * err[is_class].mean()
    np.testing.assert_allclose(single, expected, rtol=1e-6)
    np.testing.assert_allclose(sharded, expected, rtol=1e-6)
