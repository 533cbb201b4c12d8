"""One process of tests/test_multi_device_torch.py (not a test module itself).

    KERAS_BACKEND=torch RANK=r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=p
        python tests/multi_device_torch_worker.py OUT.npz [--no-all-reduce | --no-global-losses]

trains the small model of tests/test_training_matches_reference.py with every balancer of `BALANCERS` on this
process's shard of the same global batches, and writes the final weights and balancer state to OUT.npz.
`--no-all-reduce` replaces the all-reduces by the identity (each process then trains on its shard alone), and
`--no-global-losses` keeps the gradient all-reduce but lets the log transform and loss-level combinations see each
process's local losses: the checks that the test fails without them (`ONLY=dbmtl,gls` trains only those).
`train_all(rank=0)` without a process group is the one-process run.
"""

import os
import sys

os.environ.setdefault("KERAS_BACKEND", "torch")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if __name__ == "__main__":
    # A torch worker process never needs TensorFlow; `keras.utils.set_random_seed` would import it only to seed it
    # (about 3 s of CPU time per process). Not when the test imports this module into its own process.
    sys.modules["tensorflow"] = None
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_dbmtl  # noqa: E402
from keras_dbmtl import distributed  # noqa: E402
from tests.test_training_matches_reference import BATCH, EPOCHS, LR, make_data, make_model  # noqa: E402

# name -> (balancer factory of the rank, L2 factor, learning rate, compile kwargs). PCGrad's seed differs per rank
# on purpose, and so do the initial weights: `broadcast_variables` must give every process rank 0's. PCGrad uses
# the vectorised Jacobian, the others the looped one. The task losses differ in scale by 10^4: the balancers that
# use raw losses get loss weights or a small learning rate; MGDA takes the log transform.
EW_WEIGHTS = {"task0": 1.0, "task1": 1e-2, "task2": 1e-4}
BALANCERS = {
    "ew": (lambda rank: "ew", 0.01, LR, {"loss_weights": EW_WEIGHTS}),
    "dbmtl": (lambda rank: keras_dbmtl.balancers.DBMTL(beta=0.9), 0.0, LR, {}),
    "pcgrad": (lambda rank: keras_dbmtl.balancers.PCGrad(seed=3 + rank), 0.0, 1e-5, {"vectorize_jacobian": True}),
    "mgda": (lambda rank: keras_dbmtl.balancers.get("mgda", loss_transform="log"), 0.0, LR, {}),
    "uw": (lambda rank: "uw", 0.0, 1e-4, {}),
    "gls": (lambda rank: "gls", 0.0, 1e-3, {}),
    "famo": (lambda rank: "famo", 0.0, LR, {}),
}


def train_all(rank):
    X, Y = make_data()
    results = {}
    only = os.environ.get("ONLY")
    for name, (make_balancer, l2, lr, compile_kwargs) in BALANCERS.items():
        if only and name not in only.split(","):
            continue
        print("balancer", name, flush=True)
        model = make_model(l2=l2, seed=1 + rank)
        model.compile(
            optimizer=keras.optimizers.SGD(lr), loss="mse", balancer=make_balancer(rank), **compile_kwargs
        )
        distributed.broadcast_variables(model)
        targets = {t: y for t, y in zip(model.task_names, Y)}
        x_local, y_local = distributed.shard_batches((X, targets), global_batch_size=BATCH)
        model.fit(
            x_local, y_local, batch_size=BATCH // distributed.num_replicas(), epochs=EPOCHS, shuffle=False, verbose=0
        )
        for i, v in enumerate(model.trainable_variables):
            results[f"{name}/weight{i}"] = keras.ops.convert_to_numpy(v)
        for i, v in enumerate(model.balancer.non_trainable_variables):
            results[f"{name}/state{i}:{v.name}"] = keras.ops.convert_to_numpy(v)
    return results


def main(out, no_all_reduce=False, no_global_losses=False):
    if no_all_reduce:
        from keras_dbmtl.gradients import torch as torch_gradients

        torch_gradients._replica_mean_list = lambda tensors: list(tensors)
    if no_global_losses:
        keras_dbmtl.gradients.global_losses = lambda losses: losses
    rank, world = distributed.initialize("gloo")
    assert world == 2 and distributed.num_replicas() == 2
    results = train_all(rank)
    np.savez(out, **results)
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], no_all_reduce="--no-all-reduce" in sys.argv[2:],
         no_global_losses="--no-global-losses" in sys.argv[2:])
