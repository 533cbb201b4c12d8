"""TaskBalanceMonitor and GradientStatistics against a float64 numpy computation of the task gradients."""

import glob
import importlib.util
import itertools
import os

import keras
import numpy as np
import pytest

import keras_dbmtl
from keras_dbmtl.callbacks import TaskBalanceMonitor
from keras_dbmtl.metrics import GradientStatistics

TASKS = ["a", "b", "c"]


def make_model(d=5, h=4):
    encoder = keras.Sequential([keras.Input((d,)), keras.layers.Dense(h, activation="tanh", name="shared")])
    # small equal heads: the sign of each task's gradient is set by its target (a and b conflict, a and c agree)
    heads = {t: keras.layers.Dense(1, kernel_initializer=keras.initializers.Constant(0.01), name=f"{t}_head")
             for t in TASKS}
    return keras_dbmtl.MultiTaskModel(encoder=encoder, heads=heads)


def data(rng, n=24, d=5):
    x = rng.normal(size=(n, d)).astype("float32")
    base = x[:, :1] + 0.5 * x[:, 1:2]
    # b conflicts with a; c is nearly collinear with a (loss scales about 1, 10 and 0.1)
    y = {"a": base, "b": -3.0 * base + 0.1 * x[:, 2:3], "c": 0.3 * base + 0.05 * x[:, 3:4]}
    return x, {t: v.astype("float32") for t, v in y.items()}


def numpy_task_gradients(model, x, y):
    """Per-task gradients of the MSE losses on the shared Dense (kernel, bias), float64, by hand."""
    shared = model.encoder.get_layer("shared")
    W, b = (keras.ops.convert_to_numpy(v).astype("float64") for v in (shared.kernel, shared.bias))
    x = x.astype("float64")
    z = np.tanh(x @ W + b)
    rows = []
    for t in TASKS:
        head = model.heads[t]
        v, c = (keras.ops.convert_to_numpy(p).astype("float64") for p in (head.kernel, head.bias))
        residual = z @ v + c - y[t].astype("float64")
        d_pre = (2.0 / residual.size) * residual @ v.T * (1.0 - z ** 2)
        rows.append(np.concatenate([(x.T @ d_pre).ravel(), d_pre.sum(axis=0)]))
    return np.stack(rows)


def cosine_matrix(jacobian):
    norms = np.linalg.norm(jacobian, axis=1)
    return jacobian @ jacobian.T / np.outer(norms, norms)


def frozen_fit(model, x, y, callbacks, batch_size, epochs=1):
    """SGD with learning rate 0: the weights stay those the numpy reference reads."""
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse", balancer="dbmtl")
    return model.fit(x, y, batch_size=batch_size, epochs=epochs, shuffle=False, verbose=0, callbacks=callbacks)


def test_epoch_cosines_and_conflicts_match_numpy(rng):
    x, y = data(rng)
    model = make_model()
    monitor = TaskBalanceMonitor()
    history = frozen_fit(model, x, y, [monitor], batch_size=len(x), epochs=2)
    reference = cosine_matrix(numpy_task_gradients(model, x, y))
    assert reference[0, 1] < 0 < reference[0, 2]                     # the data set up a conflict
    for i, j in itertools.combinations(range(3), 2):
        np.testing.assert_allclose(history.history[f"cosine_{TASKS[i]}_{TASKS[j]}"], [reference[i, j]] * 2,
                                   atol=2e-5)
    expected_conflicts = sum(reference[i, j] < 0 for i, j in itertools.combinations(range(3), 2))
    assert history.history["conflicting_pairs"] == [float(expected_conflicts)] * 2
    np.testing.assert_allclose(history.history["mean_cosine"][0], reference[np.triu_indices(3, 1)].mean(), atol=2e-5)
    np.testing.assert_allclose(monitor.cosines[-1], reference, atol=2e-5)
    # the model's own gradient norms are those of the log-transformed losses: |grad L_t| / L_t
    losses = np.array([np.mean((keras.ops.convert_to_numpy(model(x)[t]) - y[t]) ** 2) for t in TASKS])
    norms = np.linalg.norm(numpy_task_gradients(model, x, y), axis=1) / losses
    for t, norm in zip(TASKS, norms):
        np.testing.assert_allclose(history.history[f"{t}_gradient_norm"][0], norm, rtol=2e-4)
    # the statistics' matrices are not step or epoch logs
    assert not {"gramian", "cosine", "steps"} & set(history.history)


def test_every_n_steps_averages_the_window(rng):
    x, y = data(rng, n=32)
    model = make_model()
    monitor = TaskBalanceMonitor(every_n_steps=2)
    frozen_fit(model, x, y, [monitor], batch_size=8)                   # 4 steps -> records at steps 2 and 4
    assert [r["step"] for r in monitor.steps] == [2, 4]
    for record, batches in zip(monitor.steps, [(0, 1), (2, 3)]):
        cosines = [cosine_matrix(numpy_task_gradients(model, x[k * 8:(k + 1) * 8], {t: y[t][k * 8:(k + 1) * 8]
                                                                                      for t in TASKS}))
                   for k in batches]
        np.testing.assert_allclose(record["cosine"], np.mean(cosines, axis=0), atol=2e-5)
        assert record["conflicting_pairs"] == np.mean([np.sum(np.triu(c, 1) < 0) for c in cosines])
        assert "a_weight" in record


def test_statistics_metric_closed_form():
    metric = GradientStatistics(3)
    jacobians = [np.array([[1.0, 0.0], [-1.0, 1.0], [0.0, 0.0]]), np.array([[1e4, 1e4], [1e-4, 0.0], [2.0, -3.0]])]
    for jacobian in jacobians:
        metric.update_state(keras.ops.convert_to_tensor(jacobian @ jacobian.T, "float32"))
    result = {k: keras.ops.convert_to_numpy(v) for k, v in metric.result().items()}
    expected = []
    for jacobian in jacobians:
        norms = np.linalg.norm(jacobian, axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            c = jacobian @ jacobian.T / np.outer(norms, norms)
        expected.append(np.nan_to_num(c))                        # a zero gradient has cosine 0 with everything
    np.testing.assert_allclose(result["cosine"], np.mean(expected, axis=0), atol=1e-6)
    assert result["conflicting_pairs"] == np.mean([np.sum(np.triu(c, 1) < 0) for c in expected])   # (1 + 2) / 2
    assert result["steps"] == 2


def test_loss_level_balancer_warns(rng):
    x, y = data(rng)
    model = make_model()
    model.compile(optimizer="sgd", loss="mse", balancer="ew")
    with pytest.warns(RuntimeWarning, match="no per-task gradients"):
        history = model.fit(x, y, epochs=1, verbose=0, callbacks=[TaskBalanceMonitor()])
    assert "mean_cosine" not in history.history


def test_not_a_multitask_model():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    with pytest.raises(ValueError, match="MultiTaskModel"):
        TaskBalanceMonitor().set_model(model)


def _tensorboard_available():
    if importlib.util.find_spec("tensorflow") is None or importlib.util.find_spec("tensorboard") is None:
        return False
    return True


@pytest.mark.skipif(not _tensorboard_available(), reason="needs tensorflow and tensorboard to write event files")
def test_tensorboard_event_files_hold_the_scalars(rng, tmp_path):
    import tensorflow as tf

    x, y = data(rng, n=16)
    model = make_model()
    tensorboard = keras.callbacks.TensorBoard(log_dir=str(tmp_path))
    monitor = TaskBalanceMonitor(every_n_steps=1, tensorboard=tensorboard)
    history = frozen_fit(model, x, y, [tensorboard, monitor], batch_size=8, epochs=2)
    values = {}
    for path in glob.glob(os.path.join(str(tmp_path), "train", "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                values.setdefault(value.tag, []).append(float(tf.make_ndarray(value.tensor)))
    np.testing.assert_allclose(values["task_balance/cosine_a_b"], history.history["cosine_a_b"], atol=1e-6)
    np.testing.assert_allclose(values["task_balance/a_weight"], history.history["a_weight"], rtol=1e-6)
    np.testing.assert_allclose(values["task_balance/c_gradient_norm"], history.history["c_gradient_norm"], rtol=1e-6)
    assert values["task_balance/conflicting_pairs"] == history.history["conflicting_pairs"]
    assert len(values["task_balance_steps/cosine_b_c"]) == 4


def test_validation_does_not_erase_the_epoch(rng):
    x, y = data(rng)
    model = make_model()
    monitor = TaskBalanceMonitor()
    history = frozen_fit_with_validation(model, x, y, monitor)
    reference = cosine_matrix(numpy_task_gradients(model, x, y))
    np.testing.assert_allclose(history.history["cosine_a_b"], [reference[0, 1]], atol=2e-5)
    assert "val_cosine_a_b" not in history.history


def frozen_fit_with_validation(model, x, y, monitor):
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse", balancer="dbmtl")
    return model.fit(x, y, batch_size=len(x), epochs=1, verbose=0, validation_data=(x, y), callbacks=[monitor])


def test_skipped_steps_are_not_counted(rng):
    x, y = data(rng, n=16)
    y["a"][12, 0] = np.nan                                   # the second batch of 8 is unusable: skipped
    model = make_model()
    monitor = TaskBalanceMonitor()
    with pytest.warns(RuntimeWarning):
        history = frozen_fit(model, x, y, [monitor], batch_size=8)
    assert history.history["skipped_steps"] == [1.0]
    totals = keras.ops.convert_to_numpy(model.gradient_statistics.totals)
    assert totals[-1] == 1.0                                 # one applied step
    reference = cosine_matrix(numpy_task_gradients(model, x[:8], {t: v[:8] for t, v in y.items()}))
    np.testing.assert_allclose(monitor.cosines[-1], reference, atol=2e-5)
