"""One process of the two-process train-step test (run by tests/test_multihost.py).

    python tests/multihost_worker.py PIPELINE_DIR OUT.npz PROCESS_ID NUM_PROCESSES PORT

With NUM_PROCESSES=1 it runs the same step on 8 local devices (the reference). Each process
feeds only its own slice of the global batch (jax.make_array_from_process_local_data).
"""

import os
import sys

pipe_dir, out, pid, nproc, port = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={8 // nproc}"

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
if nproc > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=nproc, process_id=pid)

import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from dreambooth_jax.diffusion.schedules import schedule_from_config  # noqa: E402
from dreambooth_jax.models import load_pretrained  # noqa: E402
from dreambooth_jax.sharding import global_batch, make_mesh, param_shardings  # noqa: E402
from dreambooth_jax.training.state import init_state, make_optimizer  # noqa: E402
from dreambooth_jax.training.step import StepConfig, jit_train_step, make_train_step  # noqa: E402

assert jax.device_count() == 8, jax.devices()
pipe = load_pretrained(pipe_dir, components=("unet", "scheduler"))
rng = np.random.RandomState(0)
full = dict(latent_mean=rng.randn(8, 4, 4, 4).astype(np.float32),
            latent_logvar=np.full((8, 4, 4, 4), -4.0, np.float32),
            is_class=np.array([False, True] * 4), context=rng.randn(8, 77, 32).astype(np.float32))
per = 8 // nproc
local = {k: v[pid * per:(pid + 1) * per] for k, v in full.items()}
mesh = make_mesh(fsdp=2)
graphdef, params = nnx.split(pipe.unet, nnx.Param)
tx = make_optimizer(1e-3)
abstract = jax.eval_shape(lambda p: init_state({"unet": p}, tx, False), params)
state = jax.jit(lambda p: init_state({"unet": p}, tx, False), out_shardings=param_shardings(abstract, mesh))(params)
step = make_train_step(graphdef, schedule_from_config(pipe.scheduler_config), tx, StepConfig(prior_loss_weight=0.5))
batch = global_batch(local, mesh)
compiled = jit_train_step(step, abstract, {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in full.items()}, {}, mesh)
key = jax.random.key_data(jax.random.key(0))
for _ in range(2):
    state, metrics = compiled(state, batch, key, {})
# Gather the (fsdp-sharded) params to every process to compare them.
from jax.experimental import multihost_utils  # noqa: E402

flat = jax.tree.leaves(state.params)
gathered = [np.asarray(multihost_utils.process_allgather(x, tiled=True)) for x in flat]
if pid == 0:
    np.savez(out, loss=np.asarray(float(metrics["loss"])), **{f"p{i}": g for i, g in enumerate(gathered)})
print(f"process {pid}: loss {float(metrics['loss']):.6f}")
