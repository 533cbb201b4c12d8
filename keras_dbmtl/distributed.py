"""Data-parallel training on several processes, with balancing that stays exact (PyTorch backend).

One process per device (CPU: the `gloo` backend), each running `model.fit` on its own shard of every global batch:

```python
# torchrun --nproc_per_node=2 train.py        (KERAS_BACKEND=torch)
import keras, keras_dbmtl
from keras_dbmtl import distributed

rank, world = distributed.initialize()                 # torch.distributed from torchrun's environment (gloo)
model = ...                                            # a MultiTaskModel, built (model.build or one call)
model.compile(optimizer="adam", loss=..., balancer="dbmtl")
distributed.broadcast_variables(model)                 # every replica starts from rank 0's weights and state
x_local, y_local = distributed.shard_batches((x, y), global_batch_size=64)
model.fit(x_local, y_local, batch_size=64 // world, shuffle=False, epochs=10)
```

What each step does (keras_dbmtl/gradients/torch.py): the task losses take the value of their replica mean inside
the differentiated forward pass (`local + stop_gradient(mean - local)`), so the log transform and loss-level
combinations are evaluated on the global batch's losses; then every gradient the step uses (the per-task blocks of
the shared variables, the heads', the balancer's learnable variables' and the regularisation gradients, with the
task losses) is averaged over the processes in one flattened all_reduce, before the balancer runs. The balancer
(normalisation, EMAs, projections, solvers) therefore sees exactly the global batch's per-task gradients, makes the
same update on every process, and its state stays identical everywhere. With equal shards and mean-reduced
losses, the weights equal those of one process training on the global batches, to float32 rounding.

`torch.nn.parallel.DistributedDataParallel` is not used: its gradient hooks all-reduce one combined gradient during
`.backward()`, while a balancer needs each task's gradient of the global batch (and the train step uses
`torch.autograd.grad`, which DDP's hooks do not see).

Limitations: shards must be equal (the global batch size a multiple of the number of processes, see
`shard_batches`); batch-normalisation statistics are computed per process (moving statistics drift apart); compiled
metrics and their logs are per process (the task losses, weights and gradient norms logged by the model are the
global ones); dropout masks come from each process's seed state, which `broadcast_variables` makes identical.
On TensorFlow and JAX the engines' own data parallelism is used instead (`tf.distribute.MirroredStrategy`,
`keras.distribution.DataParallel`; see the README), with the same exactness; there `initialize`,
`broadcast_variables` and `shard_batches` are not needed.
"""

import keras
import numpy as np

from keras_dbmtl import gradients as gradient_backends
from keras_dbmtl._utils import unique

__all__ = ["initialize", "num_replicas", "replica_rank", "broadcast_variables", "shard_batches"]


def initialize(backend="gloo", **kwargs):
    """Initialises `torch.distributed` (unless already done) from the environment set by `torchrun`
    (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT). Returns `(rank, world_size)`.

    Args:
        backend: the torch.distributed backend: "gloo" on CPU (also works on GPU), "nccl" on GPUs.
        **kwargs: passed to `torch.distributed.init_process_group` (init_method, rank, world_size, timeout, ...).
    """
    return gradient_backends.init_process_group(backend, **kwargs)   # a ValueError on the other backends


def num_replicas():
    """The number of processes training together (1 without an initialised process group)."""
    return gradient_backends.num_replicas()


def replica_rank():
    """This process's rank (0 without an initialised process group)."""
    return gradient_backends.replica_rank()


def broadcast_variables(model, root=0):
    """Gives every variable of `model` the value it has on process `root`: weights, non-trainable state, the
    balancer's state and random streams, and the optimizer's variables if it is built. Call it once on every
    process, after the model is built and compiled and before `fit`. The identity on one process.

    `model` may also be a list of `keras.Variable`s.
    """
    if isinstance(model, keras.layers.Layer):
        if not model.built:
            raise ValueError(
                "broadcast_variables needs a built model: call model.build(input_shape) (or the model on a batch) "
                "first, so that its variables exist on every process."
            )
        variables = list(model.variables)
        optimizer = getattr(model, "optimizer", None)
        if optimizer is not None and getattr(optimizer, "built", False):
            variables += list(optimizer.variables)
    else:
        variables = list(model)
    variables = unique(variables)
    if gradient_backends.num_replicas() == 1:
        return
    values = gradient_backends.broadcast_from_root([v.value for v in variables], root)
    for v, value in zip(variables, values):
        v.assign(value)


def shard_batches(data, global_batch_size, rank=None, num_replicas=None, drop_remainder=False):
    """This process's shard of every global batch of in-memory data.

    `data` is an array or any nest of arrays (tuple, dict) with the same number of rows N. Global batch i holds
    rows [i*B, (i+1)*B) (B = global_batch_size); with R processes, process r keeps rows
    [i*B + r*B/R, i*B + (r+1)*B/R) of each. `fit(..., batch_size=B // R, shuffle=False)` on the result then
    trains, on every process together, on exactly the global batches that one process would see with
    `batch_size=B, shuffle=False`.

    The last global batch, if shorter, is split evenly when its size is a multiple of R; otherwise it is dropped
    with `drop_remainder=True` and a ValueError is raised without (unequal shards would not average to the global
    batch's mean loss).
    """
    rank = gradient_backends.replica_rank() if rank is None else int(rank)
    replicas = gradient_backends.num_replicas() if num_replicas is None else int(num_replicas)
    global_batch_size = int(global_batch_size)
    if global_batch_size % replicas:
        raise ValueError(
            f"global_batch_size={global_batch_size} is not a multiple of the {replicas} processes: every process "
            "needs a shard of the same size."
        )
    if not 0 <= rank < replicas:
        raise ValueError(f"rank={rank} is outside [0, {replicas}).")
    arrays = keras.tree.flatten(data)
    if not arrays:
        raise ValueError("shard_batches needs at least one array.")
    rows = {int(np.shape(a)[0]) for a in arrays}
    if len(rows) != 1:
        raise ValueError(f"All arrays must have the same number of rows; received {sorted(rows)}.")
    n = rows.pop()
    local = global_batch_size // replicas
    full = n // global_batch_size
    index = np.arange(full * global_batch_size).reshape(full, replicas, local)[:, rank, :].reshape(-1)
    last = n - full * global_batch_size
    if last:
        if last % replicas == 0:
            share = last // replicas
            start = full * global_batch_size + rank * share
            index = np.concatenate([index, np.arange(start, start + share)])
        elif not drop_remainder:
            raise ValueError(
                f"The last global batch has {last} rows, not a multiple of the {replicas} processes. Pass "
                "drop_remainder=True to drop it, or use a number of rows that splits evenly."
            )
    return keras.tree.map_structure(lambda a: np.asarray(a)[index], data)
