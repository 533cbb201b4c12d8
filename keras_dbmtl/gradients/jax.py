"""Task gradients with `jax.vjp` inside the (jitted) stateless train step.

The model's train step runs inside a `keras.StatelessScope` holding the whole training state. Here the forward
pass runs again inside an inner scope in which the differentiated variables map to the `jax.vjp` primals; any
other state the forward pass updates (batch-norm statistics, dropout seeds) is carried out as auxiliary output
and written back into the outer scope. One forward pass; the backward passes reuse its residuals.
"""

import jax
import jax.numpy as jnp
from keras.src.backend.common.stateless_scope import StatelessScope, get_stateless_scope

from keras import ops

from keras_dbmtl.gradients import TaskGradients

DEFAULT_VECTORIZE = False   # looped vjp: faster than jax.vmap on every model measured (benchmarks/RESULTS.md)


def _functional(forward, variables):
    """forward as a pure function of the variables' values; returns (outputs, (aux, state_updates))."""
    outer = get_stateless_scope()
    base = dict(outer.state_mapping) if outer is not None else {}
    variable_ids = [id(v) for v in variables]

    def pure(values):
        scope = StatelessScope(collect_losses=True)
        scope.state_mapping = dict(base)
        scope.state_mapping.update(zip(variable_ids, values))
        with scope:
            outputs, aux = forward()
        updates = {
            key: value
            for key, value in scope.state_mapping.items()
            if key not in variable_ids and (key not in base or value is not base[key])
        }
        return outputs, (aux, updates)

    def write_back(updates):
        if outer is not None:
            outer.state_mapping.update(updates)

    def current_values():
        return [base[i] if i in base else v.value for i, v in zip(variable_ids, variables)]

    return pure, write_back, current_values


def loss_gradients(forward, variables):
    pure, write_back, current_values = _functional(forward, variables)
    loss, vjp_fn, (aux, updates) = jax.vjp(pure, current_values(), has_aux=True)
    (grads,) = vjp_fn(jnp.ones_like(loss))
    write_back(updates)
    return aux, list(grads)


def task_gradients(forward, shared_variables, task_variables, extra_variables, vectorize):
    num_tasks = len(task_variables)
    task_flat = [v for group in task_variables for v in group]
    everything = shared_variables + task_flat + extra_variables
    num_shared = len(shared_variables)

    def losses_and_regularization():
        task_losses, regularization_loss, aux = forward()
        return (task_losses, jnp.asarray(regularization_loss, dtype=task_losses.dtype)), aux

    pure, write_back, current_values = _functional(losses_and_regularization, everything)
    (task_losses, regularization_loss), vjp_fn, (aux, updates) = jax.vjp(
        pure, current_values(), has_aux=True
    )
    zero = jnp.zeros_like(regularization_loss)

    def shared_row(cotangent):
        return vjp_fn((cotangent, zero))[0][:num_shared]

    eye = jnp.eye(num_tasks, dtype=task_losses.dtype)
    if vectorize:
        shared_blocks = list(jax.vmap(shared_row)(eye))
    else:
        rows = [shared_row(eye[t]) for t in range(num_tasks)]
        shared_blocks = [jnp.stack([row[i] for row in rows]) for i in range(num_shared)]
    # Task-specific variables only reach their own loss: the gradient of the sum is each task's own gradient.
    own = vjp_fn((jnp.ones_like(task_losses), zero))[0][num_shared:]
    task_grads, start = [], 0
    for group in task_variables:
        task_grads.append(list(own[start : start + len(group)]))
        start += len(group)
    extra_grads = list(own[start:])
    regularization_grads = list(vjp_fn((jnp.zeros_like(task_losses), jnp.ones_like(regularization_loss)))[0])
    write_back(updates)
    return TaskGradients(aux, task_losses, shared_blocks, task_grads, extra_grads, regularization_grads)


# ---------------------------------------------------------------- data parallelism
# With `keras.distribution.DataParallel` the jitted train step is written on global arrays: the batch is one
# array sharded over the mesh's batch axis and GSPMD partitions the computation, inserting the all-reduces of the
# batch means itself. The task losses, the Jacobian and the balancer therefore already see the global batch and
# the replicated balancer state is updated once (tests/test_multi_device.py checks it against one device).


def num_replicas():
    return 1


def replica_mean(values):
    return values


def global_losses(task_losses):
    return task_losses


def optimizer_gradients(grads):
    return grads


def replica_rank():
    return 0


def broadcast_from_root(tensors, root=0):
    return list(tensors)   # replicated arrays: one value


def snapshot(variables):
    return [v.value for v in variables]             # immutable values: nothing to copy


def keep_where(flag, variables, previous):
    for v, old in zip(variables, previous):
        v.assign(ops.where(flag, v.value, old))
