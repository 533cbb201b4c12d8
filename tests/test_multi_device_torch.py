"""Data parallelism with torch.distributed (gloo, CPU): two processes, each fitting its shard of every global batch,
end with the weights and balancer state of one process fitting the global batches (keras_dbmtl.distributed).

The two-process test runs with KERAS_BACKEND=torch (skipped otherwise); one spawn of two processes trains every
balancer of the worker's BALANCERS.
"""

import os
import sys

import keras
import numpy as np
import pytest

import keras_dbmtl
from keras_dbmtl import distributed
from tests import gloo


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "multi_device_torch_worker.py")


def run_two_processes(tmp_path, *flags, timeout=240):
    ranks, _ = gloo.run_ranks(lambda out: [sys.executable, WORKER, out, *flags], tmp_path, timeout=timeout)
    return ranks


@pytest.mark.skipif(keras.backend.backend() != "torch", reason="torch.distributed: torch backend only")
def test_two_gloo_processes_train_like_one(tmp_path):
    from tests import multi_device_torch_worker as worker

    ranks = run_two_processes(tmp_path)
    single = worker.train_all(rank=0)          # no process group here: one process, global batches of 16
    assert set(ranks[0]) == set(ranks[1]) == set(single)
    for name in worker.BALANCERS:
        keys = [k for k in single if k.startswith(name + "/")]
        assert any("/weight" in k for k in keys)
        for key in keys:
            # Every replica applies the same all-reduced update: bit-identical weights and balancer state.
            np.testing.assert_array_equal(ranks[0][key], ranks[1][key], err_msg=key)
            np.testing.assert_allclose(ranks[0][key], single[key], rtol=1e-5, atol=1e-6, err_msg=key)
    # DB-MTL's EMA of the task gradients moved, and equals the one-process EMA.
    ema = [k for k in single if k.startswith("dbmtl/state") and "ema_gradients" in k]
    assert len(ema) == 1 and np.abs(single[ema[0]]).max() > 0


def test_shard_batches_splits_every_global_batch():
    x = np.arange(22)
    y = {"a": np.arange(22) * 10}
    parts = [distributed.shard_batches((x, y), global_batch_size=8, rank=r, num_replicas=2) for r in range(2)]
    assert parts[0][0].tolist() == [0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18]
    assert parts[1][0].tolist() == [4, 5, 6, 7, 12, 13, 14, 15, 19, 20, 21]
    assert parts[1][1]["a"].tolist() == [v * 10 for v in parts[1][0]]
    with pytest.raises(ValueError, match="not a multiple"):
        distributed.shard_batches(x, global_batch_size=7, rank=0, num_replicas=2)
    with pytest.raises(ValueError, match="drop_remainder"):
        distributed.shard_batches(np.arange(21), global_batch_size=8, rank=0, num_replicas=2)
    assert distributed.shard_batches(np.arange(21), 8, rank=1, num_replicas=2, drop_remainder=True).tolist() == [
        4, 5, 6, 7, 12, 13, 14, 15]
    # One process: the data unchanged, and every replica function is the identity.
    assert distributed.shard_batches(x, global_batch_size=8).tolist() == x.tolist()
    assert distributed.num_replicas() == 1 and distributed.replica_rank() == 0
    losses = keras.ops.convert_to_tensor([1.0, 2.0])
    assert keras_dbmtl.gradients.global_losses(losses) is losses
