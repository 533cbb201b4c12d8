"""A step whose gradients are finite but whose optimizer update is not (Adam's second moment of a ~1e30 loss's
gradient overflows float32) is skipped like a step with a non-finite gradient, and the warning says so."""

import keras
import numpy as np
import pytest

from tests.test_training_matches_reference import make_data, make_model


def _values(variables):
    return [keras.ops.convert_to_numpy(v) for v in variables]


def test_overflowing_adam_update_is_skipped():
    X, Y = make_data(seed=3)
    model = make_model(seed=4)

    def huge(y_true, y_pred):                      # finite loss (~1e30) and finite gradients; g^2 is not
        return 1e30 * keras.ops.mean(keras.ops.square(y_true - y_pred), axis=-1)

    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss={"task0": huge, "task1": "mse", "task2": "mse"},
                  balancer="ew")
    model.optimizer.build(model.trainable_variables)
    weights, slots = _values(model.trainable_variables), _values(model.optimizer.variables)
    # The warning names the task whose loss is the likely cause and says what to do about it.
    with pytest.warns(RuntimeWarning) as warned:
        history = model.fit(X, dict(zip(model.task_names, Y)), batch_size=len(X), epochs=2, verbose=0)
    messages = [str(w.message) for w in warned if "skipped" in str(w.message)]
    assert len(messages) == 2, messages
    for message in messages:
        assert "every task loss was finite, but the update made from them was not" in message
        assert "task 'task0' has a loss of 1e16 or more" in message and "'task1'" not in message
        assert "Scale that task's loss down" in message and "lower the learning rate" in message
        assert "balancer='dbmtl'" in message
    assert history.history["skipped_steps"] == [1.0, 1.0]
    assert all(np.isnan(history.history["loss"]))           # TerminateOnNaN stops on it
    for a, b in zip(_values(model.trainable_variables), weights):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(_values(model.optimizer.variables), slots):   # iteration counter and moments included
        np.testing.assert_array_equal(a, b)

    # The same model with a usable loss trains normally afterwards.
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse", balancer="ew")
    history = model.fit(X, dict(zip(model.task_names, Y)), batch_size=len(X), epochs=1, verbose=0)
    assert history.history["skipped_steps"] == [0.0]
