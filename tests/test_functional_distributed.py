"""Data parallelism through door 1: a functional `MultiTaskModel(inputs=..., outputs=...)` whose graph branches
twice (tests/test_functional_model.py's `branching`: a trunk shared by every task, a tower shared by a and b but
not c, a gate of b's own, a skip connection from the input to c) trained on two replicas ends with the weights
and DB-MTL state of one device training on the same global batches (2 steps of 16 rows).

As in tests/test_multi_device.py and tests/test_multi_device_torch.py, the replicas live in subprocesses, since the
devices (or the process group) must be set up before the backend initialises; this file is its own worker
(`python -m tests.test_functional_distributed --worker`):

- jax: two forced host devices (`--xla_force_host_platform_device_count=2`) and `keras.distribution.DataParallel`;
- tensorflow: two logical CPU devices and `tf.distribute.MirroredStrategy`;
- torch: two gloo processes (`keras_dbmtl.distributed`: different initial weights per rank, then
  `broadcast_variables`, `shard_batches`); the one-process run is made in the test's own process.

The tolerance can tell a broken all-reduce apart. This was checked by hand when the test was written, and is not
part of the test. With the all-reduce replaced by the identity (TensorFlow: `replica_mean` and `global_losses` of the
backend module `keras_dbmtl.gradients.tensorflow`; torch: `_replica_mean_list`), the weights after the 2 steps
differ by 1e-4 to 8e-2 and DB-MTL's EMA by 0.35-0.5, against at most 1.2e-7 with it.
"""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_REPLICAS = 2

if __name__ == "__main__":                 # the worker: devices first, before the backend initialises
    sys.path.insert(0, ROOT)
    if os.environ.get("KERAS_BACKEND") != "tensorflow":
        # A jax or torch worker never needs TensorFlow, and `keras.utils.set_random_seed` would import it only to
        # seed it (about 3 s of CPU time per process, a quarter of the test): keep it out of this process.
        sys.modules["tensorflow"] = None
    else:
        import tensorflow as tf

        _cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            _cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(NUM_REPLICAS)])

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import keras_dbmtl  # noqa: E402
from keras_dbmtl import distributed  # noqa: E402
from tests import gloo  # noqa: E402
from tests.multi_device_worker import component_values, distributed_scope  # noqa: E402
from tests.test_functional_model import BATCH, D_IN, branching, branching_layers, data  # noqa: E402

BACKEND = keras.backend.backend()
STEPS = 2
RTOL = 1e-5          # float32, 2 steps: a few ulps of the largest value
SHARED = ["trunk/kernel", "trunk/bias", "tower/kernel", "tower/bias"]


def global_batches():
    X, Y = data()
    rows = STEPS * BATCH
    return X[:rows], {t: y[:rows] for t, y in Y.items()}


def make_model(seed=3):
    keras.utils.set_random_seed(seed)
    x, outputs = branching(branching_layers())
    model = keras_dbmtl.MultiTaskModel(inputs=x, outputs=outputs)
    model.build((None, D_IN))
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse",
                  balancer=keras_dbmtl.balancers.DBMTL(beta=0.5, beta_sigma=0.5))
    return model


def state_of(model):
    """{name: list of replica copies} of every trainable weight and of the balancer's variables."""
    state = {f"weight:{v.path}": component_values(v) for v in model.trainable_variables}
    state.update({f"balancer:{v.name}": component_values(v) for v in model.balancer.variables})
    return state


def train(batch_size, x, y, seed=3):
    model = make_model(seed)
    initial = {k: c[0] for k, c in state_of(model).items() if k.startswith("weight:")}
    distributed.broadcast_variables(model)                 # torch process group: rank 0's weights; else identity
    model.fit(x, y, batch_size=batch_size, epochs=1, shuffle=False, verbose=0)
    return model, initial


# --------------------------------------------------------------------------- the worker (jax, tensorflow)
def worker():
    x, y = global_batches()
    one, initial = train(BATCH, x, y)
    with distributed_scope():
        many, initial_many = train(BATCH, x, y)
    single, copies = state_of(one), state_of(many)
    assert set(single) == set(copies)
    result = {
        "replicas": sorted({len(c) for c in copies.values()}),
        "shared": [[v.path for v in m.shared_variables()] for m in (one, many)],
        "initial": max(float(np.abs(initial[k] - initial_many[k]).max()) for k in initial),
        "moved": max(float(np.abs(single[k][0] - initial[k]).max()) for k in initial),
        "difference": {k: max(float(np.abs(single[k][0].astype(np.float64) - c.astype(np.float64)).max())
                              for c in copies[k]) for k in single},
        "magnitude": {k: float(np.abs(single[k][0]).max()) for k in single},
        "finite": bool(all(np.isfinite(c).all() for cs in copies.values() for c in cs)),
    }
    if BACKEND == "jax":
        result["variable_devices"] = sorted({len(v.value.sharding.device_set) for v in many.trainable_variables})
    print("RESULT " + json.dumps(result))


# --------------------------------------------------------------------------- the worker (torch, one rank)
def torch_rank_worker(out):
    rank, world = distributed.initialize("gloo")
    assert world == NUM_REPLICAS and distributed.num_replicas() == NUM_REPLICAS
    x, y = global_batches()
    x_local, y_local = distributed.shard_batches((x, y), global_batch_size=BATCH)
    # Each rank starts from its own weights: broadcast_variables must give every rank rank 0's (seed 3).
    model, _ = train(BATCH // world, x_local, y_local, seed=3 + rank)
    np.savez(out, **{k: c[0] for k, c in state_of(model).items()})
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()


# --------------------------------------------------------------------------- the tests
def _env(**extra):
    env = dict(os.environ, KERAS_BACKEND=BACKEND, TF_CPP_MIN_LOG_LEVEL="2", **extra)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    return env


@pytest.mark.skipif(BACKEND not in ("jax", "tensorflow"), reason="jax DataParallel / tensorflow MirroredStrategy")
def test_functional_model_on_two_replicas_matches_one_device():
    if BACKEND == "jax":
        flags = (os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={NUM_REPLICAS}").strip()
        env = _env(JAX_PLATFORMS="cpu", XLA_FLAGS=flags)
    else:
        env = _env(CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-m", "tests.test_functional_distributed", "--worker"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    result = json.loads([line for line in proc.stdout.splitlines() if line.startswith("RESULT ")][-1][7:])
    assert result["shared"] == [SHARED, SHARED], result["shared"]          # the graph's split, in both runs
    assert result["replicas"] == [NUM_REPLICAS], result                     # every variable on both replicas
    if BACKEND == "jax":
        assert result["variable_devices"] == [NUM_REPLICAS], result
    assert result["initial"] == 0.0 and result["finite"], result
    assert result["moved"] > 1e-2, result                                   # the two steps moved the weights
    ema = [k for k in result["difference"] if "ema" in k]
    assert ema and result["magnitude"][ema[0]] > 0, result                  # DB-MTL's EMA took part
    for key, difference in result["difference"].items():
        assert difference <= RTOL * max(1.0, result["magnitude"][key]), (key, difference, result["magnitude"][key])


@pytest.mark.skipif(BACKEND != "torch", reason="torch.distributed: torch backend only")
def test_functional_model_on_two_gloo_processes_matches_one_process(tmp_path):
    def one_process():                                     # meanwhile, one process on the global batches
        x, y = global_batches()
        model, _ = train(BATCH, x, y, seed=3)
        assert [v.path for v in model.shared_variables()] == SHARED
        return {k: c[0] for k, c in state_of(model).items()}

    ranks, single = gloo.run_ranks(
        lambda out: [sys.executable, "-m", "tests.test_functional_distributed", "--torch-rank", out], tmp_path,
        meanwhile=one_process)
    assert set(ranks[0]) == set(ranks[1]) == set(single)
    assert any("ema" in k and np.abs(v).max() > 0 for k, v in single.items())
    for key in single:
        # Every rank applies the same all-reduced update: identical weights and balancer state.
        np.testing.assert_array_equal(ranks[0][key], ranks[1][key], err_msg=key)
        np.testing.assert_allclose(ranks[0][key], single[key], rtol=RTOL, atol=1e-6, err_msg=key)


if __name__ == "__main__":
    if "--torch-rank" in sys.argv:
        torch_rank_worker(sys.argv[sys.argv.index("--torch-rank") + 1])
    else:
        worker()
