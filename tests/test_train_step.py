"""The sharded train step: 8 simulated devices (data x fsdp) == 1 device; exact resume; SIGTERM."""

from __future__ import annotations

import os
import signal

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from dreambooth_jax.diffusion.schedules import schedule_from_config
from dreambooth_jax.models import load_pretrained
from dreambooth_jax.training.config import TrainConfig
from dreambooth_jax.training.run import StageData, train_stage
from dreambooth_jax.sharding import make_mesh, param_shardings, param_spec
from dreambooth_jax.training.state import init_state, make_optimizer
from dreambooth_jax.training.step import StepConfig, jit_train_step, make_train_step


@pytest.fixture(scope="module")
def sd1(pipeline_dirs):
    return load_pretrained(pipeline_dirs("sd1"))


def _data(n_inst=3, n_cls=5, hw=4):
    rng = np.random.RandomState(0)
    n = n_inst + n_cls
    return StageData(latent_mean=rng.randn(n, hw, hw, 4).astype(np.float32),
                     latent_logvar=np.full((n, hw, hw, 4), -4.0, np.float32),
                     is_class=np.arange(n) >= n_inst, context=rng.randn(2, 77, 32).astype(np.float32)), n_inst


def _one_step(sd1, mesh, batch, tx=None):
    graphdef, params = nnx.split(sd1.unet, nnx.Param)
    tx = tx or make_optimizer(1e-3)
    abstract = jax.eval_shape(lambda p: init_state({"unet": p}, tx, True), params)
    state = jax.jit(lambda p: init_state({"unet": p}, tx, True), out_shardings=param_shardings(abstract, mesh))(params)
    step = make_train_step(graphdef, schedule_from_config(sd1.scheduler_config), tx,
                           StepConfig(prior_loss_weight=0.7, ema_decay=0.9))
    ab = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
    compiled = jit_train_step(step, abstract, ab, {}, mesh)
    key = jax.random.key_data(jax.random.key(0))
    state, m = compiled(state, batch, key, {})
    state, m = compiled(state, batch, key, {})
    return jax.device_get(state), {k: float(v) for k, v in m.items()}


def test_sharded_step_equals_single_device(sd1):
    assert len(jax.devices()) == 8
    data, n_inst = _data()
    idx = np.array([0, 3, 1, 4, 2, 5, 0, 6])  # instance and class examples interleaved
    batch = dict(latent_mean=data.latent_mean[idx], latent_logvar=data.latent_logvar[idx],
                 is_class=data.is_class[idx], context=data.context[data.is_class[idx].astype(int)])
    one, eight = make_mesh(1, jax.devices()[:1]), make_mesh(fsdp=2)
    # Plain SGD: updated params must agree to float32 rounding.
    sgd = optax.sgd(0.1)
    single, m1 = _one_step(sd1, one, batch, sgd)
    sharded, m8 = _one_step(sd1, eight, batch, sgd)
    assert m1["loss"] == pytest.approx(m8["loss"], rel=1e-5)
    assert m1["grad_norm"] == pytest.approx(m8["grad_norm"], rel=1e-5)
    for a, b in zip(jax.tree.leaves((single.params, single.ema)), jax.tree.leaves((sharded.params, sharded.ema))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-6)
    # AdamW divides by sqrt(v): for near-zero gradients the summation order (8 shards vs 1) can
    # move a parameter by a visible fraction of one lr-sized step; the bulk must still agree.
    single, _ = _one_step(sd1, one, batch)
    sharded, _ = _one_step(sd1, eight, batch)
    d = np.concatenate([np.abs(np.asarray(a) - np.asarray(b)).ravel()
                        for a, b in zip(jax.tree.leaves(single.params), jax.tree.leaves(sharded.params))])
    assert d.max() <= 1e-4 and np.mean(d <= 1e-6) >= 0.999, (d.max(), np.mean(d <= 1e-6))


def test_fsdp_specs():
    assert param_spec((320, 320, 3, 3), 4) == jax.sharding.PartitionSpec("fsdp", None, None, None)
    assert param_spec((3, 3, 64, 320), 4) == jax.sharding.PartitionSpec(None, None, None, "fsdp")
    assert param_spec((320,), 4) == jax.sharding.PartitionSpec()  # small: replicated
    assert param_spec((7, 9999), 4) == jax.sharding.PartitionSpec()  # indivisible: replicated


def _cfg(tmp_path, **kw):
    return TrainConfig(**dict(dict(model="x", instance_dir="x", train_batch_size=4, fsdp=2, learning_rate=1e-3,
                                   checkpoint_every=3, log_every=1, output_dir=str(tmp_path)), **kw))


def test_exact_resume(sd1, tmp_path):
    data, n_inst = _data()
    sched = schedule_from_config(sd1.scheduler_config)
    sc = StepConfig(ema_decay=0.5)
    cfg = _cfg(tmp_path, max_train_steps=6, ema_decay=0.5)
    straight, _ = train_stage(sd1.unet, sched, data, n_inst, cfg, sc, lr=1e-3, steps=6, out_dir=tmp_path / "a",
                              log=lambda m: None)
    # 3 steps, "crash", rerun the same 6-step command: it resumes from the step-3 checkpoint.
    with pytest.raises(_Crash):
        train_stage(sd1.unet, sched, data, n_inst, cfg, sc, lr=1e-3, steps=6, out_dir=tmp_path / "b",
                    log=lambda m: None, on_step=_crash_at(3))
    resumed, _ = train_stage(sd1.unet, sched, data, n_inst, cfg, sc, lr=1e-3, steps=6, out_dir=tmp_path / "b",
                             log=lambda m: None)
    a, b = nnx.state(straight, nnx.Param), nnx.state(resumed, nnx.Param)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    before = nnx.state(sd1.unet, nnx.Param)
    assert any(not np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(before)))


class _Crash(Exception):
    pass


def _crash_at(n):
    def on_step(step, metrics, state):
        if step == n:
            raise _Crash()
    return on_step


def test_sigterm_saves_and_exits_zero(sd1, tmp_path):
    data, n_inst = _data()
    sched = schedule_from_config(sd1.scheduler_config)
    cfg = _cfg(tmp_path, max_train_steps=50, checkpoint_every=1000)

    def on_step(step, metrics, state):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(SystemExit) as e:
        train_stage(sd1.unet, sched, data, n_inst, cfg, StepConfig(), lr=1e-3, steps=50, out_dir=tmp_path / "s",
                    log=lambda m: None, on_step=on_step)
    assert e.value.code == 0
    assert sorted(p.name for p in (tmp_path / "s" / "checkpoints").iterdir() if p.name.isdigit()) == ["3"]  # the step in flight completes, then saves
