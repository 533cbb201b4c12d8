"""Tasks that train nothing without a step being skipped are reported (issue 28): a task whose loss is exactly 0
on every step of an epoch (no labels), and a task whose shared gradient is exactly zero (a dead ReLU branch),
which stops MGDA (its min-norm point is zero) and, before, every FairGrad and Nash-MTL step (infinite weights)."""

import warnings

import keras
import numpy as np
import pytest

import keras_dbmtl

BATCHES, BATCH = 4, 16


def _data(tasks, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(BATCHES * BATCH, 4)).astype("float32")
    return x, {t: (x @ rng.normal(size=(4, 1)) + 1.0).astype("float32") for t in tasks}


def _model(heads):
    keras.utils.set_random_seed(0)
    encoder = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu")])
    return keras_dbmtl.MultiTaskModel(encoder=encoder, heads=heads)


def _masked_mse(y_true, y_pred):
    """MSE over the labelled samples (label -1: none); exactly 0 on a batch without labels."""
    labelled = keras.ops.cast(keras.ops.not_equal(y_true, -1.0), y_pred.dtype)
    return keras.ops.mean(labelled * keras.ops.square(y_true - y_pred), axis=-1)


def _messages(record, text):
    return [str(w.message) for w in record if text in str(w.message)]


def test_a_task_without_labels_is_warned_each_epoch_and_steps_are_counted_per_task():
    x, y = _data(("full", "sparse", "empty"))
    y["sparse"][BATCH:] = -1.0                                  # labels in the first batch only
    y["empty"][:] = -1.0                                        # no labels at all
    model = _model({t: keras.layers.Dense(1) for t in y})
    model.compile(optimizer="adam", loss=_masked_mse, balancer="dbmtl")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        history = model.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0)
    # Steps each task took part in, counted from the data: every batch, the first one, none.
    assert history.history["full_steps"] == [BATCHES, BATCHES]
    assert history.history["sparse_steps"] == [1.0, 1.0]
    assert history.history["empty_steps"] == [0.0, 0.0]
    assert history.history["skipped_steps"] == [0.0, 0.0]       # nothing was skipped: only this report says so
    messages = _messages(record, "trained nothing")
    assert [m.split(":")[0] for m in messages] == ["Epoch 0", "Epoch 1"]
    for message in messages:
        assert "'empty'" in message and "'sparse'" not in message and "'full'" not in message
        assert f"{BATCHES} applied steps" in message and "'<task>_steps'" in message
    evaluated = model.evaluate(x, y, batch_size=BATCH, verbose=0, return_dict=True)
    assert not any(key.endswith("_steps") for key in evaluated)   # a training count, as the task weights


def test_validation_after_the_epoch_keeps_the_step_counts_and_warns_nothing():
    """The counts are the epoch's, not the validation run's: validation resets the trackers after the epoch's
    logs were taken (on torch the logged count was a view of the reset total: 0, and a false warning)."""
    x, y = _data(("a", "b"))
    model = _model({t: keras.layers.Dense(1) for t in y})
    model.compile(optimizer="sgd", loss="mse", balancer="dbmtl")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        history = model.fit(x, y, batch_size=BATCH, epochs=2, validation_data=(x, y), verbose=0)
    assert history.history["a_steps"] == [BATCHES, BATCHES] and history.history["b_steps"] == [BATCHES, BATCHES]
    assert not _messages(record, "trained nothing")


def _dead_heads():
    """Task 'dead' reads the trunk through a ReLU that is off for every input: its loss is not 0, its gradient on
    the shared variables is exactly 0."""
    dead = keras.Sequential([
        keras.layers.Dense(4, activation="relu", kernel_initializer="zeros",
                           bias_initializer=keras.initializers.Constant(-1.0)),
        keras.layers.Dense(1),
    ])
    return {"a": keras.layers.Dense(1), "b": keras.layers.Dense(1), "dead": dead}


@pytest.mark.parametrize("balancer", ["fairgrad", "nash_mtl", "mgda"])
def test_a_task_with_a_dead_shared_gradient(balancer):
    x, y = _data(("a", "b", "dead"), seed=1)
    model = _model(_dead_heads())
    model.compile(optimizer="adam", loss="mse", balancer=balancer)
    before = [keras.ops.convert_to_numpy(v) for v in model.encoder.trainable_variables]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        history = model.fit(x, y, batch_size=BATCH, epochs=2, verbose=0)
    moved = max(np.abs(keras.ops.convert_to_numpy(v) - b).max()
                for v, b in zip(model.encoder.trainable_variables, before))
    assert history.history["skipped_steps"] == [0.0, 0.0]
    assert history.history["dead_gradient_norm"] == [0.0, 0.0]
    assert history.history["dead_loss"][0] > 0.0
    for task in ("a", "b", "dead"):
        assert np.all(np.isfinite(history.history[f"{task}_weight"]))
    stalls = _messages(record, "is exactly zero while the loss is not")
    if balancer == "mgda":          # the zero gradient is the min-norm point: the trunk does not train; said once
        assert moved == 0.0
        assert len(stalls) == 1 and "task(s) 'dead'" in stalls[0] and "MGDA" in stalls[0]
    else:                           # the dead task is left out of the equation; the others train the trunk
        assert moved > 1e-4
        assert stalls == []
        weights = [history.history[f"{t}_weight"][-1] for t in ("a", "b", "dead")]
        assert 0.0 < weights[2] < np.inf
