"""The only backend-specific code: gradients of the task losses.

Each backend module exposes the same two functions:

    loss_gradients(forward, variables) -> (aux, gradients)
        forward() -> (scalar_loss, aux); one backward pass of the scalar.

    task_gradients(forward, shared_variables, task_variables, extra_variables, vectorize) -> TaskGradients
        forward() -> (task_losses (T,), regularization_loss (scalar), aux); one forward pass, then
        - the per-task gradients of the shared variables, one (T, *shape) block per variable (the task Jacobian),
        - for each task t, the gradients of its own task-specific variables `task_variables[t]`,
        - the gradients of sum_t task_losses[t] for `extra_variables` (a balancer's learnable loss scales),
        - the gradients of the regularization loss for shared + task + extra variables (zeros where none).

Data parallelism (several replicas, each with a share of the global batch; see `keras_dbmtl.distributed`) keeps
balancing exact: every backend module also exposes

    global_losses(task_losses) -> task losses whose value is the global-batch loss and whose gradient is the
        replica's own share (`local + stop_gradient(replica_mean(local) - local)`); identity on one device.
    optimizer_gradients(grads) -> what to hand to `optimizer.apply` so that it applies the global-batch
        gradients once (TensorFlow's optimizer sums over replicas in `apply`: divided by the replica count).
    num_replicas(), replica_rank(), replica_mean(values): the replica count, this replica's index and the
        all-reduced mean (1, 0 and the identity on one device);
    broadcast_from_root(tensors, root=0): copies holding replica `root`'s values (torch processes; the identity
        where the engine keeps replicas in sync itself).

and `loss_gradients` / `task_gradients` return gradients already averaged over the replicas, so the balancer
sees the global Jacobian, runs identically on every replica and its state stays the same everywhere.

For the skipped steps of the model's train step (a select, not a branch: no host round trip):

    snapshot(variables) -> the variables' current values (copies where the backend updates in place)
    keep_where(flag, variables, previous): each variable keeps its new value where `flag`, else gets `previous`

`vectorize=True` computes the Jacobian with the backend's vectorised map (tf pfor, torch
`is_grads_batched`, `jax.vmap`), False with a loop of T backward passes. `DEFAULT_VECTORIZE` holds the faster
choice measured on each backend (benchmarks/jacobian.py).
"""

import keras


class TaskGradients:
    def __init__(self, aux, task_losses, shared_blocks, task_gradients, extra_gradients, regularization_gradients):
        self.aux = aux
        self.task_losses = task_losses
        self.shared_blocks = shared_blocks
        self.task_gradients = task_gradients
        self.extra_gradients = extra_gradients
        self.regularization_gradients = regularization_gradients


def backend_module(name=None):
    name = name or keras.backend.backend()
    if name == "tensorflow":
        from keras_dbmtl.gradients import tensorflow as module
    elif name == "torch":
        from keras_dbmtl.gradients import torch as module
    elif name == "jax":
        from keras_dbmtl.gradients import jax as module
    else:
        raise ValueError(
            f"keras-dbmtl supports the tensorflow, torch and jax backends; KERAS_BACKEND is {name!r}."
        )
    return module


def global_losses(task_losses):
    return backend_module().global_losses(task_losses)


def optimizer_gradients(grads):
    return backend_module().optimizer_gradients(grads)


def num_replicas():
    return backend_module().num_replicas()


def replica_mean(values):
    return backend_module().replica_mean(values)


def replica_rank():
    return backend_module().replica_rank()


def broadcast_from_root(tensors, root=0):
    return backend_module().broadcast_from_root(list(tensors), root)


def loss_gradients(forward, variables):
    return backend_module().loss_gradients(forward, variables)


def task_gradients(forward, shared_variables, task_variables, extra_variables=(), vectorize=None):
    module = backend_module()
    if vectorize is None:
        vectorize = module.DEFAULT_VECTORIZE
    return module.task_gradients(
        forward, list(shared_variables), [list(group) for group in task_variables], list(extra_variables), vectorize
    )


def snapshot(variables):
    return backend_module().snapshot(list(variables))


def keep_where(flag, variables, previous):
    backend_module().keep_where(flag, list(variables), list(previous))
