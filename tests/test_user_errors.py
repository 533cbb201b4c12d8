"""Nothing silent, nothing lost: the user's mistakes raise errors that name them, valid input that Keras
dislikes works, and one balancer object reused by a second model starts afresh."""

import os

import keras
import numpy as np
import pytest

import keras_dbmtl
from keras_dbmtl.balancers import DBMTL, STL

RNG = np.random.default_rng(0)
X = RNG.normal(size=(32, 4)).astype("float32")
Y1 = (X[:, :1] * 2.0).astype("float32")
Y2 = (X[:, 1:2] - X[:, 2:3]).astype("float32")


def make(names=("a", "b"), outputs=(1, 1), hidden=8, per_task_inputs=False, seed=0):
    """An unbuilt model, as a user writes it (no call, no build)."""
    keras.utils.set_random_seed(seed)
    heads = {n: keras.layers.Dense(o) for n, o in zip(names, outputs)}
    return keras_dbmtl.MultiTaskModel(keras.layers.Dense(hidden, activation="tanh"), heads,
                                      per_task_inputs=per_task_inputs)


def fit(model, x, y, balancer="dbmtl", loss="mse", **kwargs):
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=loss, balancer=balancer)
    return model.fit(x, y, batch_size=8, epochs=kwargs.pop("epochs", 1), verbose=0, shuffle=False, **kwargs)


def weights(model):
    return [keras.ops.convert_to_numpy(v) for v in model.trainable_variables]


# ---------------------------------------------------------------- targets
def test_target_shape_is_checked_against_the_head():
    with pytest.raises(ValueError, match=r"target of task 'a' has shape \(N, 2\) but its head outputs \(N, 1\)"):
        fit(make(), X, {"a": np.zeros((32, 2), "float32"), "b": Y2})
    with pytest.raises(ValueError, match=r"target of task 'a' has shape \(N, 1\) but its head outputs \(N, 3\)"):
        fit(make(outputs=(3, 1)), X, {"a": Y1, "b": Y2})
    # Shapes the losses read correctly: (N,) for a one-output head; class indices for sparse cross-entropy.
    history = fit(make(), X, {"a": Y1[:, 0], "b": Y2})
    assert np.isfinite(history.history["loss"][0])
    labels = (X[:, :1] > 0).astype("int32")
    for target in (labels, labels[:, 0]):
        history = fit(make(outputs=(3, 1)), X, {"a": target, "b": Y2},
                      loss={"a": keras.losses.SparseCategoricalCrossentropy(from_logits=True), "b": "mse"})
        assert np.isfinite(history.history["loss"][0])
    with pytest.raises(ValueError, match=r"target of task 'a' has shape \(N, 3\).*\(N, 3\)"):
        fit(make(outputs=(3, 1)), X, {"a": np.zeros((32, 3), "int32"), "b": Y2},
            loss={"a": "sparse_categorical_crossentropy", "b": "mse"})


def test_target_none_names_the_task():
    with pytest.raises(ValueError, match=r"target of task 'b' is None.*sample_weight"):
        fit(make(), X, {"a": Y1, "b": None})
    with pytest.raises(ValueError, match=r"sample weights carry unknown task\(s\) \['zz'\]"):
        fit(make(), X, {"a": Y1, "b": Y2}, sample_weight={"a": np.ones(32), "zz": np.ones(32)})


def test_empty_data_is_a_clear_error():
    import tensorflow as tf

    empty = {"a": Y1[:0], "b": Y2[:0]}
    with pytest.raises(ValueError, match="yielded no batch"):
        fit(make(), X[:0], empty)
    with pytest.raises(ValueError, match="yielded no batch"):
        fit(make(), tf.data.Dataset.from_tensor_slices((X[:0], empty)).batch(8), None)
    with pytest.raises(ValueError, match="validation data yielded no batch"):
        fit(make(), X, {"a": Y1, "b": Y2}, validation_data=(X[:0], empty))
    # A model already built and fitted once: the second fit on an empty dataset does not return an empty History.
    model = make()
    fit(model, X, {"a": Y1, "b": Y2})
    with pytest.raises(ValueError, match="yielded no batch"):
        model.fit(tf.data.Dataset.from_tensor_slices((X[:0], empty)).batch(8), epochs=1, verbose=0)
    with pytest.raises(ValueError, match="evaluation data yielded no batch"):
        model.evaluate(X[:0], empty, verbose=0)


def test_per_task_inputs_errors_name_the_mistake():
    with pytest.raises(ValueError, match=r"per_task_inputs=True.*missing task\(s\) \['b'\]"):
        fit(make(per_task_inputs=True), {"a": X}, {"a": Y1, "b": Y2})
    with pytest.raises(ValueError, match=r"per_task_inputs=True: x must be a dict.*ndarray of shape \(32, 4\)"):
        fit(make(per_task_inputs=True), X, {"a": Y1, "b": Y2})
    with pytest.raises(ValueError, match=r"x is a dict keyed by task names.*per_task_inputs=True"):
        fit(make(), {"a": X, "b": X}, {"a": Y1, "b": Y2})
    history = fit(make(per_task_inputs=True), {"a": X, "b": X[::-1].copy()}, {"a": Y1, "b": Y2[::-1].copy()})
    assert np.isfinite(history.history["loss"][0])


def test_stl_unknown_task_keeps_its_value_error():
    with pytest.raises(ValueError, match=r"Unknown task 'zzz'; the tasks are \['a', 'b'\]"):
        fit(make(), X, {"a": Y1, "b": Y2}, balancer=STL(task="zzz"))


# ---------------------------------------------------------------- task names
def test_any_string_is_a_task_name(tmp_path):
    # '/' is refused by Keras names, ' ', ':' and non-ASCII by TensorFlow's name scopes.
    names = ("depth/1", "a b", "c:d", "tiefe_ü")
    model = make(names=names, outputs=(1, 1, 1, 1))
    y = {n: Y1 * (i + 1) for i, n in enumerate(names)}
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse", balancer="dbmtl",
                  metrics={n: ["mae"] for n in names})
    history = model.fit(X, y, batch_size=8, epochs=2, verbose=0, validation_data=(X, y))
    for n in names:
        assert {f"{n}_loss", f"{n}_weight", f"{n}_mae", f"val_{n}_loss"} <= set(history.history)
        assert history.history[f"{n}_loss"][1] < history.history[f"{n}_loss"][0]
    path = str(tmp_path / "names.keras")
    model.save(path)
    reloaded = keras.models.load_model(path)
    assert reloaded.task_names == list(names)
    for a, b in zip(weights(reloaded), weights(model)):
        np.testing.assert_array_equal(a, b)
    # A later model in the same process is unaffected (TensorFlow used to keep a broken name scope open).
    history = fit(make(), X, {"a": Y1, "b": Y2})
    assert np.isfinite(history.history["loss"][0])


# ---------------------------------------------------------------- balancer reuse
def test_balancer_reused_by_a_second_model_starts_afresh():
    data = {"a": Y1, "b": Y2 * 100.0}
    shared = DBMTL(beta=0.5, beta_sigma=0.5)
    fit(make(seed=1), X, data, balancer=shared, epochs=2)
    assert int(keras.ops.convert_to_numpy(shared.iterations)) == 8

    second = make(seed=2)
    fit(second, X, data, balancer=shared, epochs=2)
    fresh = make(seed=2)
    fit(fresh, X, data, balancer=DBMTL(beta=0.5, beta_sigma=0.5), epochs=2)
    assert int(keras.ops.convert_to_numpy(second.balancer.iterations)) == 8
    for a, b in zip(weights(second), weights(fresh)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(second.balancer.ema_gradients),
                                  keras.ops.convert_to_numpy(fresh.balancer.ema_gradients))
    # The first model keeps its own balancer; recompiling a model with its own balancer keeps the state.
    assert int(keras.ops.convert_to_numpy(shared.iterations)) == 8
    second.compile(optimizer="sgd", loss="mse", balancer=second.balancer)
    assert int(keras.ops.convert_to_numpy(second.balancer.iterations)) == 8

    # A model of another size: its own state of its own size, not a backend shape error.
    bigger = make(hidden=16)
    history = fit(bigger, X, data, balancer=shared)
    assert np.isfinite(history.history["loss"][0])
    assert tuple(bigger.balancer.ema_gradients.shape) == (2, 4 * 16 + 16)


# ---------------------------------------------------------------- BackupAndRestore
class _Interrupt(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        if epoch == 2:
            raise RuntimeError("interrupted")


def test_backup_and_restore_as_the_readme_shows_it(tmp_path):
    """No call or build before fit, on every backend; the resumed run ends on the uninterrupted run's weights."""
    data = {"a": Y1, "b": Y2}
    reference = make(seed=5)
    fit(reference, X, data, epochs=3)
    backup = str(tmp_path / "backup")
    with pytest.raises(RuntimeError, match="interrupted"):
        fit(make(seed=5), X, data, epochs=3, callbacks=[keras.callbacks.BackupAndRestore(backup), _Interrupt()])
    resumed = make(seed=9)
    history = fit(resumed, X, data, epochs=3, callbacks=[keras.callbacks.BackupAndRestore(backup)])
    assert len(history.history["loss"]) == 1
    for a, b in zip(weights(resumed), weights(reference)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _truncate(path):
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])


def test_truncated_backup_names_the_file(tmp_path):
    data = {"a": Y1, "b": Y2}
    backup = str(tmp_path / "backup")
    fit(make(), X, data, epochs=2, callbacks=[keras.callbacks.BackupAndRestore(backup, delete_checkpoint=False)])
    weights_file = os.path.join(backup, "latest.weights.h5")
    _truncate(weights_file)
    with pytest.raises(OSError, match=r"weights file '.*latest\.weights\.h5'.*truncated.*double_checkpoint=True"):
        fit(make(), X, data, epochs=3, callbacks=[keras.callbacks.BackupAndRestore(backup)])


def test_double_checkpoint_falls_back_to_the_previous_backup(tmp_path):
    data = {"a": Y1, "b": Y2}
    backup = str(tmp_path / "backup")
    first = make(seed=3)
    fit(first, X, data, epochs=2,
        callbacks=[keras.callbacks.BackupAndRestore(backup, double_checkpoint=True, delete_checkpoint=False)])
    _truncate(os.path.join(backup, "latest.weights.h5"))
    resumed = make(seed=4)
    history = fit(resumed, X, data, epochs=3,
                  callbacks=[keras.callbacks.BackupAndRestore(backup, double_checkpoint=True)])
    # The previous backup is the end of epoch 1: epochs 2 and 3 run again.
    assert len(history.history["loss"]) == 2


def test_a_full_disk_while_backing_up_names_the_file_and_keeps_the_last_backup(tmp_path, monkeypatch):
    """A write that fails part-way (ENOSPC, simulated: the copy into place writes half the file, then fails) raises
    an OSError naming the file, leaves the previous backup whole and no partial file. (On a real 64 KiB tmpfs,
    `benchmarks/fault_soak.py`, Keras' own save segfaulted in h5py when the disk filled in the middle of a file.)"""
    import errno

    from keras_dbmtl import model as model_module

    data = {"a": Y1, "b": Y2}
    backup = str(tmp_path / "backup")
    fit(make(), X, data, epochs=1, callbacks=[keras.callbacks.BackupAndRestore(backup, delete_checkpoint=False)])
    weights_file = os.path.join(backup, "latest.weights.h5")
    before = open(weights_file, "rb").read()

    def copy_then_fail(source, target):
        with open(source, "rb") as s, open(target, "wb") as t:
            t.write(s.read()[:100])
        raise OSError(errno.ENOSPC, "No space left on device", target)

    monkeypatch.setattr(model_module.shutil, "copyfile", copy_then_fail)
    with pytest.raises(OSError, match=r"Could not write the weights file '.*latest\.weights\.h5': No space left") \
            as error:
        fit(make(seed=2), X, data, epochs=3,
            callbacks=[keras.callbacks.BackupAndRestore(backup, save_freq=1, delete_checkpoint=False)])
    assert error.value.errno == errno.ENOSPC
    assert open(weights_file, "rb").read() == before                  # the last good backup, whole
    assert not os.path.exists(weights_file + ".partial")
    monkeypatch.undo()
    resumed = fit(make(seed=3), X, data, epochs=3, callbacks=[keras.callbacks.BackupAndRestore(backup)])
    assert len(resumed.history["loss"]) == 2                          # and it still resumes after epoch 0
