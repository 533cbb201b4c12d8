"""Task gradients with a persistent `tf.GradientTape`."""

import tensorflow as tf

from keras_dbmtl.gradients import TaskGradients

DEFAULT_VECTORIZE = False


def _gradient(tape, target, variables):
    # Unconnected gradients as zeros (tf's UnconnectedGradients.ZERO does not accept Keras variables).
    grads = tape.gradient(target, variables)
    return [tf.zeros(v.shape, dtype=v.dtype) if g is None else g for g, v in zip(grads, variables)]


def loss_gradients(forward, variables):
    with tf.GradientTape() as tape:
        loss, aux = forward()
    return aux, _gradient(tape, loss, variables)


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
    return TaskGradients(aux, task_losses, shared_blocks, task_grads, extra_grads, regularization_grads)
