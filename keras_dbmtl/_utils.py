"""Small helpers shared by the model, the backends and `keras_dbmtl.distributed` (and the tests and benchmarks)."""

import keras


def is_dict(value):
    """A dict or a mapping-like object (Keras' tracked dicts)."""
    return isinstance(value, dict) or (hasattr(value, "keys") and hasattr(value, "items"))


def unique(variables):
    """`variables` without repeats (by identity), first occurrences in order."""
    seen, result = set(), []
    for v in variables:
        if id(v) not in seen:
            seen.add(id(v))
            result.append(v)
    return result


def compile_like_a_train_step(function):
    """`function` compiled as the train step compiles a balancer's aggregation: `jax.jit` on JAX, `tf.function`
    with XLA on TensorFlow (no autograph: `keras.ops` and `ops.fori_loop` only), as is on torch (eager). For the
    tests and benchmarks that call balancers and solvers outside a model."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return jax.jit(function)
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.function(function, jit_compile=True, autograph=False)
    return function
