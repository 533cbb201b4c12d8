"""Task gradients with a persistent `tf.GradientTape`.

Under `tf.distribute` (MirroredStrategy, MultiWorkerMirroredStrategy) the train step runs once per replica on its
share of the global batch. Keras scales each mean-reduced loss by 1/num_replicas (so that the sum over replicas is
the global loss) and the optimizer sums the gradients over the replicas in `apply`. Here:

- `global_losses` gives every replica the global task losses as values (all-reduced), with the gradient of its
  own share `local = num_replicas * keras_loss` (its batch mean, or num_replicas * its sum for sum-reduced losses,
  so that the replica mean of `local` is the global loss for every reduction);
- `task_gradients` / `loss_gradients` all-reduce (mean) the per-replica gradients of those losses: the global
  Jacobian blocks, head, extra and regularisation gradients, in one collective per step;
- `optimizer_gradients` divides by num_replicas, because the optimizer sums over the replicas in `apply`.

The balancer then runs on identical inputs on every replica and its state stays identical. With one replica (no
strategy) every function is the identity.
"""

import tensorflow as tf

from keras import ops

from keras_dbmtl.gradients import TaskGradients

DEFAULT_VECTORIZE = False


def _gradient(tape, target, variables):
    # Unconnected gradients as zeros (tf's UnconnectedGradients.ZERO does not accept Keras variables).
    grads = tape.gradient(target, variables)
    return [tf.zeros(v.shape, dtype=v.dtype) if g is None else g for g, v in zip(grads, variables)]


def _replica_context():
    """The replica context when the step runs on more than one replica, else None."""
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return None
    return context


def num_replicas():
    context = tf.distribute.get_replica_context()
    return 1 if context is None else context.num_replicas_in_sync


def replica_rank():
    context = tf.distribute.get_replica_context()
    if context is None:
        return 0
    return int(tf.get_static_value(context.replica_id_in_sync_group) or 0)


def broadcast_from_root(tensors, root=0):
    # MirroredStrategy creates every replica's copy of a variable from the same initial value: nothing to copy.
    return list(tensors)


def replica_mean(values):
    """The mean over the replicas of a tensor or a (nested) list of tensors, in one all-reduce."""
    context = _replica_context()
    if context is None:
        return values
    return context.all_reduce(tf.distribute.ReduceOp.MEAN, values)


def global_losses(task_losses):
    context = _replica_context()
    if context is None:
        return task_losses
    local = task_losses * tf.cast(context.num_replicas_in_sync, task_losses.dtype)
    global_value = context.all_reduce(tf.distribute.ReduceOp.MEAN, tf.stop_gradient(local))
    return local + tf.stop_gradient(global_value - local)


def optimizer_gradients(grads):
    context = _replica_context()
    if context is None:
        return grads
    scale = 1.0 / context.num_replicas_in_sync
    return [None if g is None else g * tf.cast(scale, g.dtype) for g in grads]


def _replica_mean_with_nones(values):
    present = [v for v in values if v is not None]
    reduced = iter(replica_mean(present) if present else [])
    return [None if v is None else next(reduced) for v in values]


def loss_gradients(forward, variables):
    with tf.GradientTape() as tape:
        loss, aux = forward()
    return aux, replica_mean(_gradient(tape, loss, variables))


def task_gradients(forward, shared_variables, task_variables, extra_variables, vectorize):
    num_tasks = len(task_variables)
    with tf.GradientTape(persistent=True) as tape:
        task_losses, regularization_loss, aux = forward()
        # Slice inside the tape so the slices are recorded.
        per_task_losses = tf.unstack(task_losses, num=num_tasks)
        total_loss = tf.reduce_sum(task_losses)
    task_flat = [v for group in task_variables for v in group]
    if vectorize:
        shared_blocks = tape.jacobian(
            task_losses, shared_variables, unconnected_gradients=tf.UnconnectedGradients.ZERO,
            experimental_use_pfor=True,
        )
        own = _gradient(tape, total_loss, task_flat)
        task_grads, start = [], 0
        for group in task_variables:
            task_grads.append(own[start : start + len(group)])
            start += len(group)
    else:
        rows, task_grads = [], []
        for t in range(num_tasks):
            grads = _gradient(tape, per_task_losses[t], shared_variables + task_variables[t])
            rows.append(grads[: len(shared_variables)])
            task_grads.append(grads[len(shared_variables) :])
        shared_blocks = [tf.stack([row[i] for row in rows]) for i in range(len(shared_variables))]
    extra_grads = _gradient(tape, total_loss, extra_variables) if extra_variables else []
    everything = shared_variables + task_flat + extra_variables
    if isinstance(regularization_loss, tf.Tensor):
        regularization_grads = _gradient(tape, regularization_loss, everything)
    else:
        regularization_grads = [None] * len(everything)
    del tape
    if _replica_context() is not None:
        # One all-reduce for everything the balancer and the update need: the global-batch means.
        sizes = [len(shared_blocks)] + [len(g) for g in task_grads] + [len(extra_grads)]
        flat = _replica_mean_with_nones(
            list(shared_blocks) + [g for group in task_grads for g in group] + list(extra_grads)
            + list(regularization_grads)
        )
        shared_blocks, start = flat[: sizes[0]], sizes[0]
        task_grads = []
        for size in sizes[1:-1]:
            task_grads.append(flat[start : start + size])
            start += size
        extra_grads = flat[start : start + sizes[-1]]
        regularization_grads = flat[start + sizes[-1] :]
    return TaskGradients(aux, task_losses, shared_blocks, task_grads, extra_grads, regularization_grads)


def snapshot(variables):
    return [tf.identity(v.value) for v in variables]   # (the train step branches with tf.cond on TensorFlow instead)


def keep_where(flag, variables, previous):
    for v, old in zip(variables, previous):
        v.assign(ops.where(flag, v.value, old))
