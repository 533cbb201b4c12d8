"""The `gradient_statistics` hook: a Metric assigned to the model receives the T x T Gramian of the per-task
gradients on the shared variables every applied step, is reset every epoch like the other metrics, and stays out
of the logs. Checked against numpy's Gramian of the analytic per-task gradients of a linear model."""

import keras
import numpy as np
import pytest
from keras import ops

import keras_dbmtl

N, D_IN, D_HID, BATCH = 32, 4, 3, 16
TASKS = ("a", "b", "c")


class MeanGramian(keras.metrics.Metric):
    """The mean of the Gramians it was given."""

    def __init__(self, num_tasks, name="mean_gramian"):
        super().__init__(name=name)
        self.total = self.add_variable(shape=(num_tasks, num_tasks), initializer="zeros", name="total")
        self.count = self.add_variable(shape=(), initializer="zeros", name="count")

    def update_state(self, gramian):
        self.total.assign_add(ops.cast(gramian, "float32"))
        self.count.assign_add(1.0)

    def result(self):
        return self.total / ops.maximum(self.count, 1.0)


def make_data():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(N, D_IN)).astype("float32")
    y = {t: rng.normal(size=(N, 1)).astype("float32") * (10.0 ** i) for i, t in enumerate(TASKS)}
    return x, y


def make_model(balancer):
    keras.utils.set_random_seed(0)
    model = keras_dbmtl.MultiTaskModel(
        encoder=keras.layers.Dense(D_HID), heads={t: keras.layers.Dense(1) for t in TASKS}
    )
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse", balancer=balancer)
    model.build((None, D_IN))
    return model


def numpy_gramian(model, x, y):
    """Mean over the batches of G G^T, G the (T, P) per-task gradients of the MSE losses on (kernel, bias)."""
    kernel, bias = (np.asarray(ops.convert_to_numpy(v), "float64") for v in model.shared_variables())
    gramians = []
    for start in range(0, N, BATCH):
        xb = x[start : start + BATCH].astype("float64")
        hidden = xb @ kernel + bias
        rows = []
        for t in TASKS:
            head_kernel, head_bias = (np.asarray(ops.convert_to_numpy(v), "float64") for v in model.heads[t].weights)
            residual = hidden @ head_kernel + head_bias - y[t][start : start + BATCH]
            d_hidden = 2.0 / len(xb) * residual @ head_kernel.T                       # dl_t / d hidden
            rows.append(np.concatenate([(xb.T @ d_hidden).ravel(), d_hidden.sum(axis=0)]))
        jacobian = np.stack(rows)
        gramians.append(jacobian @ jacobian.T)
    return np.mean(gramians, axis=0), len(gramians)


def test_gradient_statistics_receive_the_gramian_of_every_step():
    x, y = make_data()
    model = make_model("mgda")
    statistics = MeanGramian(len(TASKS))
    model.gradient_statistics = statistics
    assert statistics in model.metrics
    history = model.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0).history
    expected, steps = numpy_gramian(model, x, y)           # SGD(0): the same weights at every step
    np.testing.assert_allclose(ops.convert_to_numpy(statistics.result()), expected, rtol=1e-4)
    assert float(ops.convert_to_numpy(statistics.count)) == steps          # reset at the start of epoch 2
    assert "mean_gramian" not in history and "loss" in history


def test_gradient_statistics_are_not_updated_by_loss_level_balancers():
    x, y = make_data()
    model = make_model("ew")
    model.gradient_statistics = MeanGramian(len(TASKS))
    model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)
    assert float(ops.convert_to_numpy(model.gradient_statistics.count)) == 0.0


def test_gradient_statistics_must_be_a_metric():
    model = make_model("mgda")
    with pytest.raises(ValueError, match="keras.metrics.Metric"):
        model.gradient_statistics = "gramian"
    assert model.gradient_statistics is None
