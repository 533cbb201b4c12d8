import keras
import numpy as np
from balancer_helpers import built, combine, numpy, tiny_model

from keras_dbmtl.balancers import DWA


def _softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def test_weights_from_epoch_averages():
    balancer = built(DWA(), 2)
    epochs = [[[2.0, 0.5], [4.0, 1.5]], [[1.0, 0.8], [2.0, 1.2]], [[1.0, 0.1], [1.0, 0.9]]]
    logged = []
    for batches in epochs:
        for losses in batches:
            loss, weights = combine(balancer, losses)
            np.testing.assert_allclose(loss, weights @ np.array(losses), rtol=1e-6)
            logged.append(weights)
        balancer.on_epoch_end(len(logged))
    averages = np.array([np.mean(e, axis=0) for e in epochs])
    np.testing.assert_allclose(logged[:4], 1.0)                               # w(1) = w(2) = 1
    expected = 2 * _softmax(averages[1] / averages[0] / 2.0)                 # Eq. (7), tau = 2
    np.testing.assert_allclose(logged[4], expected, rtol=1e-5)
    np.testing.assert_allclose(logged[5], expected, rtol=1e-5)
    np.testing.assert_allclose(numpy(balancer.current_weights), 2 * _softmax(averages[2] / averages[1] / 2.0),
                               rtol=1e-5)


def test_single_task_weight_is_one():
    balancer = built(DWA(temperature=0.5), 1)
    for epoch in range(3):
        combine(balancer, [3.0 - epoch])
        balancer.on_epoch_end(epoch)
    np.testing.assert_allclose(combine(balancer, [1.0])[1], [1.0], rtol=1e-6)


def test_epoch_boundary_inside_fit(tiny_data):
    # The weights are rolled by on_epoch_end outside the compiled step: this checks it on the current backend
    # (on JAX the model's variables must be synced in and out of the stateless training state around it).
    x, y = tiny_data
    model = tiny_model()
    model.compile(optimizer=keras.optimizers.Adam(0.02), loss="mse", balancer="dwa")
    history = model.fit(x, y, batch_size=16, epochs=4, verbose=0, shuffle=False).history
    losses = np.array([history[f"{t}_loss"] for t in "abc"]).T                 # (epochs, T)
    weights = np.array([history[f"{t}_weight"] for t in "abc"]).T
    np.testing.assert_allclose(weights[:2], 1.0, rtol=1e-6)
    np.testing.assert_allclose(weights[2], 3 * _softmax(losses[1] / losses[0] / 2.0), rtol=1e-4)
    np.testing.assert_allclose(weights[3], 3 * _softmax(losses[2] / losses[1] / 2.0), rtol=1e-4)
    np.testing.assert_allclose(numpy(model.balancer.current_weights), 3 * _softmax(losses[3] / losses[2] / 2.0),
                               rtol=1e-4)
