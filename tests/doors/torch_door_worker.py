"""One process of tests/doors/test_torch_door.py's two-process test (not a test module itself).

    KERAS_BACKEND=torch RANK=r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=p \\
        python tests/doors/torch_door_worker.py OUT.npz

trains tests/doors/test_torch_door.py's plain torch model with door 3 (DB-MTL, gradient level; UW, loss level
with learned parameters; MGDA and DB-MTL at the representation level, `features=`) on this process's shard of every
global batch and writes the final parameters and balancer state to OUT.npz. `train_all()` without a process group
is the one-process run on the global batches.
"""

import os
import sys

os.environ.setdefault("KERAS_BACKEND", "torch")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import keras_dbmtl  # noqa: E402
from keras_dbmtl import distributed  # noqa: E402
from tests.doors.test_torch_door import Net, task_losses  # noqa: E402
from tests.test_training_matches_reference import BATCH, D_HID, EPOCHS, LR, make_data  # noqa: E402

# run name: (balancer, hyperparameters, learning rate, features=z instead of shared_parameters=)
BALANCERS = {"dbmtl": ("dbmtl", dict(beta=0.9), LR, False), "uw": ("uw", {}, 1e-4, False),
             "mgda_features": ("mgda", dict(loss_transform="log"), LR, True),
             "dbmtl_features": ("dbmtl", dict(beta=0.5, beta_sigma=0.5), LR, True)}


def train_all():
    X, Y = make_data()
    results = {}
    world = distributed.num_replicas()
    for name, (method, kwargs, lr, features) in BALANCERS.items():
        net = Net(seed=1 + distributed.replica_rank())           # different per rank: rank 0's is broadcast
        with torch.no_grad():
            for p, value in zip(net.parameters(), distributed.gradient_backends.broadcast_from_root(
                    list(net.parameters()))):
                p.copy_(value)
        balancer = keras_dbmtl.torch.Balancer(method, **kwargs)
        if features:                            # this process's shapes: the state is sized by the global batch
            balancer.build(3, features=torch.zeros(BATCH // world, D_HID))
        else:
            balancer.build(3, net.trunk.parameters())
        optimizer = torch.optim.SGD([*net.parameters(), *balancer.parameters()], lr=lr)
        x_local, y_local = distributed.shard_batches((X, Y), global_batch_size=BATCH)
        x_local, y_local = torch.tensor(x_local), [torch.tensor(y) for y in y_local]
        local = BATCH // world
        for _ in range(EPOCHS):
            for start in range(0, len(x_local), local):
                optimizer.zero_grad()
                z, losses = task_losses(net, x_local[start:start + local], [y[start:start + local] for y in y_local])
                if features:
                    assert balancer.backward(losses, features=z) is not None
                else:
                    assert balancer.backward(losses, shared_parameters=net.trunk.parameters()) is not None
                optimizer.step()
        for i, p in enumerate(net.parameters()):
            results[f"{name}/parameter{i}"] = p.detach().numpy().copy()
        for key, value in balancer.state_dict().items():
            results[f"{name}/state{key}"] = value.numpy().copy()
    return results


def main(out):
    rank, world = distributed.initialize("gloo")
    assert world == 2
    np.savez(out, **train_all())
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
