"""Test helpers: drive a metric through jit-compiled update/result calls.

JAX: ``jax.jit`` of ``stateless_update_state`` / ``stateless_result``;
TensorFlow: ``tf.function(jit_compile=True)`` (XLA); PyTorch: eager.  So the
unit tests also check that the metrics compile under jit.
"""

import numpy as np

import keras


def update(metric, y_true, y_pred, sample_weight=None):
    backend = keras.backend.backend()
    args = (y_true, y_pred) if sample_weight is None else (y_true, y_pred, sample_weight)
    if backend == "jax":
        import jax

        fn = metric.__dict__.get("_test_jit_update")
        if fn is None:
            fn = jax.jit(metric.stateless_update_state)
            metric.__dict__["_test_jit_update"] = fn
        new = fn([v.value for v in metric.variables], *args)
        for var, value in zip(metric.variables, new):
            var.assign(value)
    elif backend == "tensorflow":
        import tensorflow as tf

        fn = metric.__dict__.get("_test_jit_update")
        if fn is None:
            fn = tf.function(metric.update_state, jit_compile=True)
            metric.__dict__["_test_jit_update"] = fn
        fn(*args)
    else:
        metric.update_state(*args)


def result(metric):
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        value = jax.jit(metric.stateless_result)([v.value for v in metric.variables])
    elif backend == "tensorflow":
        import tensorflow as tf

        value = tf.function(metric.result, jit_compile=True)()
    else:
        value = metric.result()
    return float(np.asarray(keras.ops.convert_to_numpy(value), dtype=np.float64))


def roundtrip(metric):
    """Serialize and deserialize; returns the clone."""
    clone = keras.metrics.deserialize(keras.metrics.serialize(metric))
    assert type(clone) is type(metric)
    assert clone.get_config() == metric.get_config()
    return clone
