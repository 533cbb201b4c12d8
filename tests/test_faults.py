"""Faults: a step with an unusable task loss or gradient is skipped exactly, counted, and TerminateOnNaN still stops.

"Exactly": a run with one bad batch in the middle ends with the same weights, optimizer state (moments and
iteration count), balancer state (EMA, step counter, random stream) and batch-norm statistics as the same run with
that batch removed, on every backend (TensorFlow graph and eager, JAX jit and eager, torch).
"""

import keras
import numpy as np
import pytest

import keras_dbmtl
from tests.test_training_matches_reference import BATCH, D_HID, D_IN, SCALES, make_data, make_model

BACKEND = keras.backend.backend()
MODES = {
    "tensorflow": {"graph": {}, "eager": {"run_eagerly": True}},
    "jax": {"jit": {}, "eager": {"run_eagerly": True}},
    "torch": {"eager": {}},
}[BACKEND]
FIRST_MODE = list(MODES)[0]
SENTINEL = 1e6


def state(model):
    """Everything a step may change, as numpy: model variables (weights, batch-norm statistics, seeds, balancer
    state) and optimizer variables."""
    result = {}
    for i, v in enumerate(model.variables):
        result[f"model/{i}/{v.name}"] = keras.ops.convert_to_numpy(v)
    for i, v in enumerate(model.optimizer.variables):
        result[f"optimizer/{i}"] = keras.ops.convert_to_numpy(v)
    return result


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert np.all(np.isfinite(a[key])), key
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def with_bad_batch(X, Y, position, task, value=np.nan):
    """Inserts, before batch `position`, a copy of batch 0 whose targets of `task` are `value`."""
    bad_x = X[:BATCH]
    bad_y = [y[:BATCH].copy() for y in Y]
    bad_y[task][:] = value
    at = position * BATCH
    X2 = np.concatenate([X[:at], bad_x, X[at:]])
    Y2 = [np.concatenate([y[:at], b, y[at:]]) for y, b in zip(Y, bad_y)]
    return X2, Y2


def trap_loss(y_true, y_pred):
    """MSE + 1; on a batch whose targets are SENTINEL the loss is finite but its gradient is not."""
    mask = y_true > SENTINEL / 2
    diff = keras.ops.where(mask, 0.0, y_true - y_pred)
    base = keras.ops.mean(keras.ops.square(diff), axis=-1) + 1.0
    u = keras.ops.abs(y_pred - keras.ops.stop_gradient(y_pred)) + keras.ops.where(mask, 0.0, 1.0)
    trap = keras.ops.where(mask, keras.ops.sqrt(u), 0.0)  # d sqrt(u)/du at u = 0 is infinite
    return base + keras.ops.mean(trap, axis=-1)


def make_stateful_model(seed=3):
    """make_model with batch normalisation and dropout in the encoder: state that the forward pass changes."""
    keras.utils.set_random_seed(seed)
    encoder = keras.Sequential([
        keras.layers.Dense(D_HID, name="encoder_dense"),
        keras.layers.BatchNormalization(name="encoder_bn"),
        keras.layers.Dropout(0.3, seed=seed, name="encoder_dropout"),
    ])
    heads = {f"task{t}": keras.layers.Dense(1, name=f"head{t}") for t in range(len(SCALES))}
    model = keras_dbmtl.MultiTaskModel(encoder=encoder, heads=heads)
    model.build((None, D_IN))
    return model


def run(X, Y, mode, balancer=None, loss="mse", epochs=2, callbacks=None, model_fn=make_model, metrics=None):
    model = model_fn(seed=3)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=loss, metrics=metrics,
                  balancer=balancer or keras_dbmtl.balancers.DBMTL(beta=0.5, beta_sigma=0.5), **MODES[mode])
    history = model.fit(X, {t: y for t, y in zip(model.task_names, Y)}, batch_size=BATCH, epochs=epochs,
                        shuffle=False, verbose=0, callbacks=callbacks)
    return model, history


@pytest.mark.parametrize("mode", list(MODES))
def test_nan_target_batch_is_skipped_exactly(mode):
    X, Y = make_data(seed=4)
    metrics = {"task1": ["mae"]}
    reference, reference_history = run(X, Y, mode, metrics=metrics)
    X_bad, Y_bad = with_bad_batch(X, Y, position=1, task=1)
    with pytest.warns(RuntimeWarning, match=r"task\(s\) 'task1'.*skipped for every variable"):
        model, history = run(X_bad, Y_bad, mode, metrics=metrics)
    assert_same_state(state(model), state(reference))
    assert int(keras.ops.convert_to_numpy(model.optimizer.iterations)) == 6
    assert int(keras.ops.convert_to_numpy(model.balancer.iterations)) == 6
    # Counted per epoch; the epoch means (loss, task weights, compiled metrics) count the applied steps only.
    assert history.history["skipped_steps"] == [1.0, 1.0]
    assert reference_history.history["skipped_steps"] == [0.0, 0.0]
    for key in ("loss", "task1_loss", "task0_weight", "task0_gradient_norm", "task1_mae"):
        np.testing.assert_allclose(history.history[key], reference_history.history[key], rtol=1e-6, err_msg=key)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("balancer", ["dbmtl", "rlw"])
def test_forward_state_is_restored_on_a_skipped_step(mode, balancer):
    # Batch-norm statistics and the dropout and RLW random streams advance in the forward pass, before the step
    # is known to be bad: they are put back too.
    X, Y = make_data(seed=4)
    reference, _ = run(X, Y, mode, balancer=balancer, model_fn=make_stateful_model)
    X_bad, Y_bad = with_bad_batch(X, Y, position=2, task=0, value=np.inf)
    with pytest.warns(RuntimeWarning, match="'task0'"):
        model, history = run(X_bad, Y_bad, mode, balancer=balancer, model_fn=make_stateful_model)
    assert history.history["skipped_steps"] == [1.0, 1.0]
    assert_same_state(state(model), state(reference))


@pytest.mark.parametrize("balancer", ["dbmtl", "ew", "pcgrad", "mgda", "famo", "uw"])
def test_non_finite_gradient_with_finite_loss_is_skipped_exactly(balancer):
    X, Y = make_data(seed=6)
    loss = {"task0": "mse", "task1": "mse", "task2": trap_loss}
    reference, _ = run(X, Y, FIRST_MODE, balancer=balancer, loss=loss)
    X_bad, Y_bad = with_bad_batch(X, Y, position=2, task=2, value=SENTINEL)
    with pytest.warns(RuntimeWarning, match="a task gradient was not finite"):
        model, history = run(X_bad, Y_bad, FIRST_MODE, balancer=balancer, loss=loss)
    assert history.history["skipped_steps"] == [1.0, 1.0]
    assert_same_state(state(model), state(reference))


@pytest.mark.parametrize("mode", list(MODES))
def test_terminate_on_nan_still_stops_the_run(mode):
    X, Y = make_data(seed=4)
    X_bad, Y_bad = with_bad_batch(X, Y, position=1, task=0, value=np.inf)
    with pytest.warns(RuntimeWarning):
        model, history = run(X_bad, Y_bad, mode, callbacks=[keras.callbacks.TerminateOnNaN()])
    assert len(history.history["loss"]) == 1  # stopped in the first epoch, on the bad batch
    # Only the first (good) batch was applied: the same state as one step on it.
    one_step, _ = run(X[:BATCH], [y[:BATCH] for y in Y], mode, epochs=1)
    assert_same_state(state(model), state(one_step))


def test_every_step_skipped_logs_nan_loss_and_keeps_the_model():
    X, Y = make_data(seed=4)
    Y = [y.copy() for y in Y]
    Y[2][:] = np.nan
    model = make_model(seed=3)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse", balancer="dbmtl")
    model.optimizer.build(model.trainable_variables)
    before = state(model)
    with pytest.warns(RuntimeWarning, match="'task2'"):
        history = model.fit(X, {t: y for t, y in zip(model.task_names, Y)}, batch_size=BATCH, epochs=2,
                            verbose=0)
    assert history.history["skipped_steps"] == [3.0, 3.0]
    assert np.all(np.isnan(history.history["loss"]))
    assert_same_state(state(model), before)
    assert int(keras.ops.convert_to_numpy(model.optimizer.iterations)) == 0
    assert int(keras.ops.convert_to_numpy(model.balancer.iterations)) == 0


@pytest.mark.skipif(BACKEND == "torch", reason="steps_per_execution must be 1 with the PyTorch backend")
def test_skips_are_counted_with_steps_per_execution():
    # 4 batches, 2 per execution, one of them bad: counted once; the epoch still has a loss (3 applied steps).
    X, Y = make_data(seed=4)
    reference, reference_history = run(X, Y, FIRST_MODE, epochs=1)
    X_bad, Y_bad = with_bad_batch(X, Y, position=1, task=1)
    model = make_model(seed=3)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse", steps_per_execution=2,
                  balancer=keras_dbmtl.balancers.DBMTL(beta=0.5, beta_sigma=0.5), **MODES[FIRST_MODE])
    with pytest.warns(RuntimeWarning, match="skipped for every variable"):
        history = model.fit(X_bad, {t: y for t, y in zip(model.task_names, Y_bad)}, batch_size=BATCH, epochs=1,
                            shuffle=False, verbose=0)
    assert history.history["skipped_steps"] == [1.0]
    np.testing.assert_allclose(history.history["loss"], reference_history.history["loss"], rtol=1e-6)
    assert_same_state(state(model), state(reference))
