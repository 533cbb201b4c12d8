"""Run by tests/test_multi_device.py in a subprocess: one device vs two data-parallel replicas, same global batches.

The device set-up must happen before the backend initialises, hence a separate process:
- jax: XLA_FLAGS=--xla_force_host_platform_device_count=2 (set by the caller) and keras.distribution.DataParallel;
- tensorflow: two logical CPU devices and tf.distribute.MirroredStrategy.

Prints one JSON line: for each balancer the max absolute weight / balancer-state differences between the runs.
With `--control` (tensorflow only) the non-linear balancers run again on two replicas without the all-reduce (each
replica balances its own share, the optimizer then averages the balanced updates): the control the test uses to
show that it detects a missing all-reduce. On jax the step's partitioning is reported (the batch's shards and the
number of all-reduces in the compiled step).
"""

import json
import os
import sys

import numpy as np

BACKEND = os.environ.get("KERAS_BACKEND", "tensorflow")
NUM_REPLICAS = 2

if __name__ == "__main__":   # the worker process (tests/test_functional_distributed.py imports its helpers only)
    if BACKEND != "tensorflow":
        # A JAX worker never needs TensorFlow; `keras.utils.set_random_seed` would import it only to seed it (about
        # 3 s of CPU time per process).
        sys.modules["tensorflow"] = None
    else:
        import tensorflow as tf

        _cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            _cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(NUM_REPLICAS)]
        )

import keras  # noqa: E402

import keras_dbmtl  # noqa: E402
from tests.test_training_matches_reference import BATCH, EPOCHS, make_data, make_model  # noqa: E402


# Balancers whose step is non-linear in the losses or gradients: without the all-reduce they must differ.
CONTROL = ("gls", "dbmtl")
DEFAULT = ("ew", "uw", "gls", "dbmtl", "pcgrad", "mgda")


def balancers():
    return {
        "ew": (lambda: keras_dbmtl.balancers.EW(), 1e-4),
        "uw": (lambda: keras_dbmtl.balancers.UW(), 1e-4),
        # (balancer, learning rate, vectorize_jacobian, L2 penalty on the shared kernel)
        "gls": (lambda: keras_dbmtl.balancers.GLS(), 1e-3, None, 0.1),
        "dbmtl": (lambda: keras_dbmtl.balancers.DBMTL(beta=0.5, beta_sigma=0.5), 0.05, None, 0.01),
        "pcgrad": (lambda: keras_dbmtl.balancers.PCGrad(seed=7), 1e-4),
        "mgda": (lambda: keras_dbmtl.balancers.MGDA(), 1e-3),
        # Not in DEFAULT (run by name): the vectorised Jacobian and FAMO's after-update forward.
        "dbmtl-vectorized": (lambda: keras_dbmtl.balancers.DBMTL(beta=0.5, beta_sigma=0.5), 0.05, True),
        "famo": (lambda: keras_dbmtl.balancers.FAMO(), 1e-3),
    }


def train(make_balancer, lr, vectorize=None, l2=0.0):
    X, Y = make_data()
    model = make_model(l2=l2)
    initial = [np.array(keras.ops.convert_to_numpy(v)) for v in model.trainable_variables]
    model.compile(
        optimizer=keras.optimizers.SGD(lr), loss="mse", balancer=make_balancer(), vectorize_jacobian=vectorize
    )
    targets = {t: y for t, y in zip(model.task_names, Y)}
    model.fit(X, targets, batch_size=BATCH, epochs=EPOCHS, shuffle=False, verbose=0)
    return model, initial


def component_values(variable):
    """Every replica's copy of a variable (one on a single device)."""
    value = variable.value
    if BACKEND == "tensorflow" and hasattr(value, "values"):
        return [np.array(v.numpy()) for v in value.values]
    if BACKEND == "jax":
        return [np.array(shard.data) for shard in value.addressable_shards]
    return [np.array(keras.ops.convert_to_numpy(value))]


def state_of(model):
    """Trainable weights and the balancer's variables, each as the list of its replica copies."""
    return {
        "weights": [component_values(v) for v in model.trainable_variables],
        "balancer": [component_values(v) for v in model.balancer.variables],
    }


def max_difference(one, many):
    worst = 0.0
    for single, copies in zip(one, many):
        for copy in copies:
            worst = max(worst, float(np.max(np.abs(single[0].astype(np.float64) - copy.astype(np.float64)))))
    return worst


def magnitude(one):
    return max([float(np.max(np.abs(single[0]))) for single in one if single[0].size] + [0.0])


_STRATEGY = []


def distributed_scope():
    """Two replicas: a MirroredStrategy's scope (tensorflow) or a DataParallel distribution (jax)."""
    if BACKEND == "tensorflow":
        import tensorflow as tf

        # One strategy for the whole process: a second MirroredStrategy reuses the collective instance keys of
        # the first one and its all-reduces then collide with the previous model's.
        if not _STRATEGY:
            devices = [d.name for d in tf.config.list_logical_devices("CPU")]
            _STRATEGY.append(tf.distribute.MirroredStrategy(devices[:NUM_REPLICAS]))
        strategy = _STRATEGY[0]
        assert strategy.num_replicas_in_sync == NUM_REPLICAS
        return strategy.scope()
    import contextlib

    import jax

    devices = jax.devices()
    assert len(devices) == NUM_REPLICAS, devices
    distribution = keras.distribution.DataParallel(devices=devices)
    assert len(distribution.device_mesh.devices.ravel()) == NUM_REPLICAS
    # The batch is sharded over the two devices (not replicated): each holds BATCH / 2 rows.
    layout = distribution.get_data_layout((BATCH, 5))
    assert layout.axes[0] == "batch", layout.axes

    @contextlib.contextmanager
    def scope():
        keras.distribution.set_distribution(distribution)
        try:
            yield
        finally:
            keras.distribution.set_distribution(None)

    return scope()


def disable_allreduce():
    # The package calls into this module at call time (`keras_dbmtl.gradients.PRIMITIVES`): patching it is enough.
    from keras_dbmtl.gradients import tensorflow as module

    module.replica_mean = lambda values: values
    # Each replica's task losses are its own batch means (Keras scales them by 1 / num_replicas).
    module.global_losses = lambda losses: losses * float(module.num_replicas())


def jax_partitioning(model):
    """How the jitted step of `model` is partitioned: the batch's shards and the all-reduces GSPMD inserted."""
    import jax
    from keras.src.backend.jax import trainer as jax_trainer

    X, Y = make_data()
    x, y, _ = jax_trainer._distribute_data((X[:BATCH], {t: v[:BATCH] for t, v in zip(model.task_names, Y)}, None))
    state = tuple(
        [v.value for v in variables]
        for variables in (
            model.trainable_variables, model.non_trainable_variables, model.optimizer.variables,
            model.metrics_variables,
        )
    )
    compiled = jax.jit(model.train_step).lower(state, (x, y)).compile().as_text()
    return {
        "batch_shard_rows": sorted(s.data.shape[0] for s in x.addressable_shards),
        "all_reduces": compiled.count("all-reduce("),
    }


def run(name, single=None):
    spec = balancers()[name]
    if single is None:
        single = train(*spec)
    (one_model, initial), one = single, state_of(single[0])
    with distributed_scope():
        multi, initial_multi = train(*spec)
        extra = jax_partitioning(multi) if BACKEND == "jax" and name == "dbmtl" else {}
    if BACKEND == "jax":
        shardings = {len(v.value.sharding.device_set) for v in multi.trainable_variables}
        assert shardings == {NUM_REPLICAS}, shardings   # the variables live (replicated) on both devices
    many = state_of(multi)
    assert all(len(c) == NUM_REPLICAS for c in many["weights"]), [len(c) for c in many["weights"]]
    final = [w[0] for w in one["weights"]]
    result = {
        "weights": max_difference(one["weights"], many["weights"]),
        "balancer_state": max_difference(one["balancer"], many["balancer"]),
        "weights_magnitude": magnitude(one["weights"]),
        "balancer_state_magnitude": magnitude(one["balancer"]),
        "initial": max(float(np.max(np.abs(a - b))) for a, b in zip(initial, initial_multi)),
        "moved": max(float(np.max(np.abs(a - b))) for a, b in zip(initial, final)),
        "finite": bool(all(np.all(np.isfinite(w)) for w in final)),
        **extra,
    }
    return result, single


def main():
    names = [a for a in sys.argv[1:] if not a.startswith("--")] or list(DEFAULT)
    results, singles = {}, {}
    for name in names:
        results[name], singles[name] = run(name)
    control = {}
    if BACKEND == "tensorflow" and "--control" in sys.argv:
        # The same two-replica runs without the all-reduce, against the same one-device runs.
        disable_allreduce()
        for name in CONTROL:
            if name in singles:
                control[name], _ = run(name, singles[name])
    print("RESULT " + json.dumps({"results": results, "control": control}))


if __name__ == "__main__":
    main()
