import keras
import numpy as np
import pytest
from balancer_helpers import built, combine, numpy, tensor, tiny_model

from keras_dbmtl.balancers import FAMO


def _adam_step(x, m, v, g, k, lr, wd):
    g = g + wd * x
    m = 0.9 * m + 0.1 * g
    v = 0.999 * v + 0.001 * g * g
    return x - lr * (m / (1 - 0.9**k)) / (np.sqrt(v / (1 - 0.999**k)) + 1e-8), m, v


def _logit_update(xi, m, v, before, after, k):
    delta = np.log(before) - np.log(after)
    z = np.exp(xi) / np.exp(xi).sum()
    gradient = z * (delta - np.sum(z * delta))                               # J_softmax^T delta
    return _adam_step(xi, m, v, gradient, k, 0.025, 1e-3)


def test_weighting_and_logit_updates_against_numpy():
    balancer = built(FAMO(), 3)
    first = np.array([2.0, 0.5, 1.0])
    loss, weights = combine(balancer, first)
    z = np.full(3, 1.0 / 3.0)
    c = 1.0 / np.sum(z / first)
    np.testing.assert_allclose(loss, c * np.sum(z * np.log(first)), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(weights, c * z / first, rtol=1e-5)

    xi, m, v = np.zeros(3), np.zeros(3), np.zeros(3)
    pairs = [([2.0, 0.5, 1.0], [1.0, 0.45, 1.2]), ([1.1, 0.4, 1.3], [0.9, 0.41, 1.25])]
    for k, (before, after) in enumerate(pairs, start=1):
        balancer.update_after_step(tensor(before), tensor(after))
        xi, m, v = _logit_update(xi, m, v, np.array(before), np.array(after), k)
        np.testing.assert_allclose(numpy(balancer.logits), xi, rtol=1e-4, atol=1e-7)
        if k == 1:   # the task that improved least (the third, whose loss rose) gains weight
            assert np.argmax(xi) == 2 and np.argmin(xi) == 0
    assert int(numpy(balancer.iterations)) == 2
    second = np.array([1.0, 0.45, 1.2])
    _, weights = combine(balancer, second)
    z = np.exp(xi) / np.exp(xi).sum()
    np.testing.assert_allclose(weights, z / second / np.sum(z / second), rtol=1e-4)


def test_model_makes_the_extra_forward_on_the_same_batch(tiny_data):
    """One fit step: the logits move by the decrease of the losses of *that* batch, measured after the update."""
    x, y = tiny_data
    model = tiny_model()
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse", balancer=FAMO())
    model.predict(x[:1], verbose=0)

    def task_losses():
        predictions = model.predict(x, verbose=0, batch_size=len(x))
        return np.array([np.mean((predictions[t] - y[t]) ** 2, dtype="float64") for t in ("a", "b", "c")])

    before = task_losses()
    model.fit(x, y, batch_size=len(x), epochs=1, verbose=0, shuffle=False)
    after = task_losses()
    assert np.all(after != before)
    xi, _, _ = _logit_update(np.zeros(3), np.zeros(3), np.zeros(3), before, after, 1)
    np.testing.assert_allclose(numpy(model.balancer.logits), xi, rtol=2e-3, atol=1e-6)


def test_log_transform_rejected():
    with pytest.raises(ValueError):
        FAMO(loss_transform="log")
