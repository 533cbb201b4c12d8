"""Data parallelism keeps balancing exact: two replicas give the weights and balancer state of one device.

The small model of test_training_matches_reference.py trains a few steps on the same global batches once on one
device and once data-parallel on two (tests/multi_device_worker.py, one subprocess running every balancer, since
the devices must be set up before the backend initialises):
- jax: two forced host devices and `keras.distribution.DataParallel` (GSPMD partitions the global step);
- tensorflow: two logical CPU devices and `tf.distribute.MirroredStrategy` (per-replica steps; the per-task
  gradients are all-reduced before the balancer).
Torch DDP has its own test (it needs process groups).
"""

import json
import os
import subprocess
import sys

import keras
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKEND = keras.backend.backend()
BALANCERS = ("ew", "uw", "gls", "dbmtl", "pcgrad", "mgda")
RTOL = 2e-6  # float32: differences up to a few ulps of the largest value, after 6 steps

pytestmark = pytest.mark.skipif(
    BACKEND not in ("tensorflow", "jax"), reason="the jax (DataParallel) and tensorflow (MirroredStrategy) cases"
)


@pytest.fixture(scope="module")
def report():
    env = dict(os.environ, KERAS_BACKEND=BACKEND, TF_CPP_MIN_LOG_LEVEL="2")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    args = [sys.executable, "-m", "tests.multi_device_worker", *BALANCERS]
    if BACKEND == "jax":
        env["JAX_PLATFORMS"] = "cpu"
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2").strip()
    else:
        env["CUDA_VISIBLE_DEVICES"] = ""
        args.append("--control")
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    line = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def tolerance(result, what):
    return RTOL * max(1.0, result[f"{what}_magnitude"])


@pytest.mark.parametrize("balancer", BALANCERS)
def test_two_replicas_match_one_device(report, balancer):
    result = report["results"][balancer]
    assert result["initial"] == 0.0
    assert result["finite"] and result["moved"] > 1e-2, result      # the steps moved the weights
    # Every replica's copy of every weight, and of the balancer's state (DB-MTL's EMA, UW's log-variances,
    # PCGrad's seed), equals the one-device run's.
    assert result["weights"] <= tolerance(result, "weights"), result
    assert result["balancer_state"] <= tolerance(result, "balancer_state"), result


@pytest.mark.skipif(BACKEND != "tensorflow", reason="the control disables the tensorflow all-reduce")
@pytest.mark.parametrize("balancer", ("gls", "dbmtl"))
def test_without_the_allreduce_the_runs_differ(report, balancer):
    # Each replica balancing its own half (log of its own losses for GLS, normalising its own gradients and
    # its own EMA for DB-MTL) is not the one-device run: the test above would catch a missing all-reduce.
    result = report["control"][balancer]
    assert result["weights"] > 100 * tolerance(result, "weights"), result
    if balancer == "dbmtl":
        assert result["balancer_state"] > 100 * tolerance(result, "balancer_state"), result


@pytest.mark.skipif(BACKEND != "jax", reason="GSPMD partitioning of the jitted step")
def test_jax_step_is_partitioned_over_the_batch(report):
    # Verified, not assumed: each device holds half of the global batch, and the compiled step all-reduces.
    result = report["results"]["dbmtl"]
    assert result["batch_shard_rows"] == [8, 8], result
    assert result["all_reduces"] >= 1, result
