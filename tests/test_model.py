"""MultiTaskModel: Keras conventions (save/load, resume, export, data formats, logs) and clear errors."""

import os

import keras
import numpy as np
import pytest

import keras_dbmtl
from tests.test_training_matches_reference import BATCH, D_IN, make_data, make_model

BACKEND = keras.backend.backend()


def to_numpy(variables):
    return [keras.ops.convert_to_numpy(v) for v in variables]


def targets(model, Y):
    return {t: y for t, y in zip(model.task_names, Y)}


def compiled(model, balancer="dbmtl", **kwargs):
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse", balancer=balancer, **kwargs)
    return model


# ---------------------------------------------------------------- saving and resuming
def test_save_load_round_trip_continues_identically(tmp_path):
    X, Y = make_data()
    uninterrupted = compiled(make_model(seed=3), keras_dbmtl.balancers.DBMTL(beta=0.5, beta_sigma=0.5))
    uninterrupted.fit(X, targets(uninterrupted, Y), batch_size=BATCH, epochs=3, shuffle=False, verbose=0)

    first = compiled(make_model(seed=3), keras_dbmtl.balancers.DBMTL(beta=0.5, beta_sigma=0.5))
    first.fit(X, targets(first, Y), batch_size=BATCH, epochs=2, shuffle=False, verbose=0)
    path = str(tmp_path / "run.keras")
    first.save(path)
    reloaded = keras.models.load_model(path)
    assert isinstance(reloaded.balancer, keras_dbmtl.balancers.DBMTL)
    assert reloaded.balancer.get_config() == first.balancer.get_config()
    np.testing.assert_array_equal(to_numpy([reloaded.balancer.ema_gradients])[0],
                                  to_numpy([first.balancer.ema_gradients])[0])
    assert int(keras.ops.convert_to_numpy(reloaded.balancer.iterations)) == 6
    reloaded.fit(X, targets(reloaded, Y), batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    for a, b in zip(to_numpy(reloaded.trainable_variables), to_numpy(uninterrupted.trainable_variables)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(to_numpy([reloaded.balancer.ema_gradients])[0],
                               to_numpy([uninterrupted.balancer.ema_gradients])[0], rtol=1e-5, atol=1e-7)


class _Interrupt(keras.callbacks.Callback):
    def __init__(self, at_epoch):
        super().__init__()
        self.at_epoch = at_epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.at_epoch:
            raise RuntimeError("interrupted")


def test_backup_and_restore_resumes_the_same_trajectory(tmp_path):
    X, Y = make_data(seed=4)
    reference = compiled(make_model(seed=5))
    reference.fit(X, targets(reference, Y), batch_size=BATCH, epochs=3, shuffle=False, verbose=0)

    backup = str(tmp_path / "backup")
    interrupted = compiled(make_model(seed=5))
    with pytest.raises(RuntimeError, match="interrupted"):
        interrupted.fit(X, targets(interrupted, Y), batch_size=BATCH, epochs=3, shuffle=False, verbose=0,
                        callbacks=[keras.callbacks.BackupAndRestore(backup), _Interrupt(2)])
    # A fresh process would build a fresh model: different initial weights, zero balancer state.
    resumed = compiled(make_model(seed=77))
    history = resumed.fit(X, targets(resumed, Y), batch_size=BATCH, epochs=3, shuffle=False, verbose=0,
                          callbacks=[keras.callbacks.BackupAndRestore(backup)])
    assert len(history.history["loss"]) == 1  # only the third epoch ran
    for a, b in zip(to_numpy(resumed.trainable_variables), to_numpy(reference.trainable_variables)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(to_numpy([resumed.balancer.ema_gradients])[0],
                               to_numpy([reference.balancer.ema_gradients])[0], rtol=1e-5, atol=1e-7)
    assert int(keras.ops.convert_to_numpy(resumed.balancer.iterations)) == 9


@pytest.mark.skipif(BACKEND == "torch", reason="Keras cannot export a SavedModel from torch (tested below)")
def test_export_tf_saved_model(tmp_path):
    import tensorflow as tf

    X, Y = make_data()
    model = compiled(make_model())
    model.fit(X, targets(model, Y), batch_size=BATCH, epochs=1, verbose=0)
    expected = {t: keras.ops.convert_to_numpy(v) for t, v in model.predict(X[:4], verbose=0).items()}
    model.export(str(tmp_path / "served"), format="tf_saved_model", verbose=False)
    served = tf.saved_model.load(str(tmp_path / "served"))
    outputs = served.serve(tf.constant(X[:4]))
    for t in model.task_names:
        np.testing.assert_allclose(outputs[t].numpy(), expected[t], rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(BACKEND != "torch", reason="torch-specific message")
def test_torch_export_error_gives_the_command(tmp_path):
    model = compiled(make_model())
    with pytest.raises(ValueError, match="KERAS_BACKEND=tensorflow python -m keras_dbmtl.export"):
        model.export(str(tmp_path / "served"))


def test_export_command_through_tensorflow(tmp_path):
    """The command the torch error names: a .keras file saved on any backend exported through TensorFlow."""
    import subprocess
    import sys

    X, Y = make_data()
    model = compiled(make_model())
    model.fit(X, targets(model, Y), batch_size=BATCH, epochs=1, verbose=0)
    model.save(tmp_path / "m.keras")
    expected = keras.ops.convert_to_numpy(model.predict(X[:2], verbose=0)["task1"])
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="3")
    subprocess.run([sys.executable, "-m", "keras_dbmtl.export", str(tmp_path / "m.keras"), str(tmp_path / "out")],
                   check=True, env=env, capture_output=True)
    check = ("import numpy as np, tensorflow as tf; m = tf.saved_model.load(%r); "
             "print(repr(m.serve(tf.constant(np.load(%r)))['task1'].numpy().tolist()))")
    np.save(tmp_path / "x.npy", X[:2])
    out = subprocess.run([sys.executable, "-c", check % (str(tmp_path / "out"), str(tmp_path / "x.npy"))],
                         check=True, env=env, capture_output=True, text=True).stdout
    np.testing.assert_allclose(np.array(eval(out.strip().splitlines()[-1])), expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- data formats and logs
def test_numpy_tf_data_pydataset_and_torch_dataloader_agree():
    X, Y = make_data(seed=8)
    names = [f"task{t}" for t in range(3)]
    ys = dict(zip(names, Y))
    base_model = compiled(make_model(seed=11))
    base_model.fit(X, ys, batch_size=BATCH, epochs=1, verbose=0, shuffle=False)
    expected = to_numpy(base_model.trainable_variables)

    class Batches(keras.utils.PyDataset):
        def __len__(self):
            return len(X) // BATCH

        def __getitem__(self, i):
            sl = slice(i * BATCH, (i + 1) * BATCH)
            return X[sl], {t: y[sl] for t, y in ys.items()}

    import tensorflow as tf
    import torch

    class TorchData(torch.utils.data.Dataset):
        def __len__(self):
            return len(X)

        def __getitem__(self, i):
            return X[i], {t: y[i] for t, y in ys.items()}

    sources = {
        "tf.data": tf.data.Dataset.from_tensor_slices((X, ys)).batch(BATCH),
        "PyDataset": Batches(),
        "torch DataLoader": torch.utils.data.DataLoader(TorchData(), batch_size=BATCH, shuffle=False),
    }
    for name, data in sources.items():
        model = compiled(make_model(seed=11))
        model.fit(data, epochs=1, verbose=0, shuffle=False)
        for a, b in zip(to_numpy(model.trainable_variables), expected):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=name)


def test_history_keys_evaluate_and_predict():
    X, Y = make_data()
    model = compiled(make_model(), metrics={"task0": ["mae"]})
    history = model.fit(X, targets(model, Y), batch_size=BATCH, epochs=2, verbose=0,
                        validation_data=(X, targets(model, Y)))
    keys = set(history.history)
    for t in model.task_names:
        assert {f"{t}_loss", f"{t}_weight", f"{t}_gradient_norm", f"val_{t}_loss"} <= keys
    assert {"loss", "val_loss", "task0_mae", "val_task0_mae"} <= keys
    assert not any(k.startswith("_") or k.startswith("val__") for k in keys)
    assert "val_task0_weight" not in keys
    assert "skipped_steps" in keys and "val_skipped_steps" not in keys
    assert history.history["skipped_steps"] == [0.0, 0.0]
    results = model.evaluate(X, targets(model, Y), batch_size=len(X), verbose=0, return_dict=True)
    predictions = model.predict(X, verbose=0)
    for t, y in zip(model.task_names, Y):
        mse = np.mean((keras.ops.convert_to_numpy(predictions[t]).astype(np.float64) - y) ** 2)
        np.testing.assert_allclose(results[f"{t}_loss"], mse, rtol=1e-4)
    np.testing.assert_allclose(results["loss"], sum(results[f"{t}_loss"] for t in model.task_names), rtol=1e-5)
    mae = np.mean(np.abs(keras.ops.convert_to_numpy(predictions["task0"]) - Y[0]))
    np.testing.assert_allclose(results["task0_mae"], mae, rtol=1e-4)


def test_gradient_norms_are_logged():
    from tests import reference

    X, Y = make_data()
    model = make_model()
    W0, b0, heads0 = [keras.ops.convert_to_numpy(v) for v in model.encoder.weights] + [None]
    heads0 = [tuple(keras.ops.convert_to_numpy(v) for v in model.heads[t].weights) for t in model.task_names]
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse", balancer="dbmtl")
    history = model.fit(X, targets(model, Y), batch_size=len(X), epochs=1, verbose=0)
    _, G, _ = reference.linear_mtl_gradients(X, Y, W0, b0, heads0, log_transform=True)
    for t, name in enumerate(model.task_names):
        np.testing.assert_allclose(history.history[f"{name}_gradient_norm"][0], np.linalg.norm(G[t]), rtol=1e-4)


@pytest.mark.skipif(BACKEND != "tensorflow", reason="TensorFlow compile modes")
@pytest.mark.parametrize("jit_compile", [True, False])
def test_tensorflow_jit_and_graph_modes_match(jit_compile):
    X, Y = make_data()
    results = []
    for mode in (dict(jit_compile=jit_compile), dict(run_eagerly=True)):
        model = compiled(make_model(seed=2), **mode)
        model.fit(X, targets(model, Y), batch_size=BATCH, epochs=1, verbose=0, shuffle=False)
        results.append(to_numpy(model.trainable_variables))
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- bad input
def test_empty_heads_is_an_error():
    with pytest.raises(ValueError, match="non-empty dict"):
        keras_dbmtl.MultiTaskModel(encoder=keras.layers.Dense(2), heads={})


def test_unknown_balancer_name():
    model = make_model()
    with pytest.raises(ValueError, match=r"Unknown balancer 'dbmt'.*dbmtl"):
        model.compile(optimizer="sgd", loss="mse", balancer="dbmt")


def test_targets_missing_or_unknown_task():
    X, Y = make_data()
    model = compiled(make_model())
    with pytest.raises(ValueError, match=r"missing task\(s\) \['task2'\]"):
        model.fit(X, {"task0": Y[0], "task1": Y[1]}, batch_size=BATCH, epochs=1, verbose=0)
    model = compiled(make_model())
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['extra'\]"):
        model.fit(X, {**targets(model, Y), "extra": Y[0]}, batch_size=BATCH, epochs=1, verbose=0)


def test_loss_weights_with_dbmtl_is_an_error():
    model = make_model()
    with pytest.raises(ValueError, match="loss_weights has no effect|has no effect with balancer DBMTL"):
        model.compile(optimizer="sgd", loss="mse", balancer="dbmtl", loss_weights={"task0": 2.0})


# A loss of exactly 0 with a zero gradient is a task without labels in the batch: not skipped
# (tests/test_partial_labels.py).
@pytest.mark.parametrize("bad", ["negative", "nan"])
def test_non_positive_or_nan_loss_under_log_transform(bad):
    X, Y = make_data()
    model = make_model()

    def task1_loss(y_true, y_pred):
        mse = keras.ops.mean(keras.ops.square(y_true - y_pred), axis=-1)
        if bad == "negative":
            return -mse
        return mse * float("nan")

    model.compile(optimizer=keras.optimizers.SGD(0.01), balancer="dbmtl",
                  loss={"task0": "mse", "task1": task1_loss, "task2": "mse"})
    before = to_numpy(model.variables)
    with pytest.warns(RuntimeWarning, match=r"task\(s\) 'task1' is not positive and finite.*skipped"):
        history = model.fit(X, targets(model, Y), batch_size=BATCH, epochs=1, verbose=0)
    # Every step was skipped and counted: nothing applied, no NaN model, no training loss to report.
    assert history.history["skipped_steps"] == [len(X) // BATCH]
    assert np.isnan(history.history["loss"][0])
    after = to_numpy(model.variables)
    assert all(np.all(np.isfinite(a)) for a in after)
    for a, b in zip(after, before):
        np.testing.assert_array_equal(a, b)
    assert int(keras.ops.convert_to_numpy(model.optimizer.iterations)) == 0
    assert int(keras.ops.convert_to_numpy(model.balancer.iterations)) == 0
