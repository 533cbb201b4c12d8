"""Helpers for the balancer tests: fixed inputs, eager calls, a tiny multi-task model."""

import keras
import numpy as np
from keras import ops

from keras_dbmtl._utils import compile_like_a_train_step as compiled  # noqa: F401  (the tests' name)
from keras_dbmtl.balancers import TaskJacobian

# The brief's fixed example: two conflicting task gradients and their losses.
JACOBIAN = np.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
LOSSES = np.array([2.0, 0.5])


def tensor(x):
    return ops.convert_to_tensor(np.asarray(x, dtype="float32"))


def numpy(x):
    return np.asarray(ops.convert_to_numpy(x), dtype="float64")


def built(balancer, num_tasks, num_parameters=3, task_names=None):
    balancer.build(num_tasks, num_parameters, task_names)
    return balancer


def aggregate(balancer, jacobian=JACOBIAN, losses=LOSSES, blocks=None):
    """One eager aggregation; returns (direction (P,), task weights, head weights or None) as float64 arrays.

    `losses` are raw losses: they go through the balancer's loss transform first, as in the model.
    """
    jacobian = np.asarray(jacobian, dtype="float64")
    num_tasks = jacobian.shape[0]
    if blocks is None:
        blocks = [jacobian]
    task_losses = balancer.task_losses(tensor(losses))
    result = balancer.aggregate(task_losses, TaskJacobian([tensor(b) for b in blocks], num_tasks))
    weights = numpy(result.task_weights)
    if result.shared_direction is None:
        direction = weights @ np.concatenate([np.reshape(b, (num_tasks, -1)) for b in blocks], axis=1)
    else:
        direction = numpy(result.shared_direction)
    heads = None if result.head_weights is None else numpy(result.head_weights)
    return direction, weights, heads


def combine(balancer, losses=LOSSES):
    loss, weights = balancer.combine_losses(balancer.task_losses(tensor(losses)))
    return float(numpy(loss)), numpy(weights)


def random_jacobian(rng, num_tasks, num_parameters, conflict=True):
    jacobian = rng.normal(size=(num_tasks, num_parameters))
    if conflict:
        jacobian[1] = -0.7 * jacobian[0] + 0.3 * rng.normal(size=num_parameters)
    return jacobian


def make_tiny_data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 6)).astype("float32")
    y = {
        "a": (x[:, :1] * 2.0 + 0.1 * rng.normal(size=(32, 1))).astype("float32"),
        "b": (x[:, 1:2] - x[:, 2:3] + 0.1 * rng.normal(size=(32, 1))).astype("float32"),
        "c": (np.abs(x[:, 3:4]) + 0.1 * rng.normal(size=(32, 1))).astype("float32"),
    }
    return x, y


def tiny_model(tasks=("a", "b", "c"), seed=0):
    keras.utils.set_random_seed(seed)
    from keras_dbmtl import MultiTaskModel

    encoder = keras.Sequential([keras.layers.Dense(8, activation="relu")])
    return MultiTaskModel(encoder=encoder, heads={t: keras.layers.Dense(1) for t in tasks})


_TRACED = {}


def first_step(name, num_tasks, num_parameters, **kwargs):
    """`_trace_first_step`, traced once per balancer, shape and arguments for the session."""
    key = (name, num_tasks, num_parameters, tuple(sorted(kwargs.items())))
    if key not in _TRACED:
        _TRACED[key] = _trace_first_step(name, num_tasks, num_parameters, **kwargs)
    return _TRACED[key]


def _trace_first_step(name, num_tasks, num_parameters, **kwargs):
    """`(jacobian, losses) -> (direction, weights)` of a fresh balancer's first step, traced once (jax.jit,
    tf.function; eager on torch): the solvers' fixed iterations are slow op by op in eager JAX. A loss balancer's
    direction is its weights times the Jacobian, read as the gradients of the transformed losses."""
    import keras
    from keras.src.backend.common.stateless_scope import StatelessScope

    from keras_dbmtl import balancers

    balancer = built(balancers.get(name, **kwargs), num_tasks, num_parameters)
    initial = [v.value for v in balancer.variables]

    def step(jacobian, losses):
        with StatelessScope(state_mapping=list(zip(balancer.variables, initial))):
            if not balancer.uses_task_gradients:
                loss, weights = balancer.combine_losses(balancer.task_losses(losses))
                return keras.ops.matmul(weights[None, :], jacobian)[0] + 0.0 * loss, weights
            result = balancer.aggregate(balancer.task_losses(losses), TaskJacobian([jacobian], num_tasks))
            weights = result.task_weights
            if result.shared_direction is None:
                return keras.ops.matmul(weights[None, :], jacobian)[0], weights
            return result.shared_direction, weights

    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        step = jax.jit(step)
    elif backend == "tensorflow":
        import tensorflow as tf

        step = tf.function(step)
    return lambda jacobian, losses: tuple(numpy(v) for v in step(tensor(jacobian), tensor(losses)))
