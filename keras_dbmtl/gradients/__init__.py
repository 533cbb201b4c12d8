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


def loss_gradients(forward, variables):
    return backend_module().loss_gradients(forward, variables)


def task_gradients(forward, shared_variables, task_variables, extra_variables=(), vectorize=None):
    module = backend_module()
    if vectorize is None:
        vectorize = module.DEFAULT_VECTORIZE
    return module.task_gradients(
        forward, list(shared_variables), [list(group) for group in task_variables], list(extra_variables), vectorize
    )
