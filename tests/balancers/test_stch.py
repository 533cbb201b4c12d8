import keras
import numpy as np
import pytest
from balancer_helpers import built, combine, tiny_model

from keras_dbmtl.balancers import STCH


def test_warmup_then_smooth_tchebycheff():
    balancer = built(STCH(mu=0.5, warmup_epochs=2), 2)
    loss, weights = combine(balancer, [2.0, 0.5])
    np.testing.assert_allclose(loss, np.log(2.0) + np.log(0.5), atol=1e-6)    # sum_t log l_t
    np.testing.assert_allclose(weights, [0.5, 2.0], rtol=1e-5)
    balancer.on_epoch_end(0)
    for losses in ([2.0, 1.0], [4.0, 3.0]):                                   # the last warm-up epoch
        combine(balancer, losses)
    balancer.on_epoch_end(1)
    reference = np.array([3.0, 2.0])
    losses = np.array([1.5, 0.4])
    loss, weights = combine(balancer, losses)
    f = np.log(losses / reference)
    np.testing.assert_allclose(loss, 2 * 0.5 * np.log(np.sum(np.exp(f / 0.5))), rtol=1e-5)
    softmax = np.exp(f / 0.5) / np.sum(np.exp(f / 0.5))
    np.testing.assert_allclose(weights, 2 * softmax / losses, rtol=1e-5)      # dL/dl_t


def test_log_transform_rejected():
    with pytest.raises(ValueError):
        STCH(loss_transform="log")


def test_reaches_stch_phase_in_fit(tiny_data):
    x, y = tiny_data
    model = tiny_model()
    model.compile(optimizer=keras.optimizers.Adam(0.02), loss="mse", balancer=STCH(warmup_epochs=1))
    history = model.fit(x, y, batch_size=16, epochs=3, verbose=0).history
    assert np.all(np.isfinite(history["loss"]))
    reference = np.asarray(keras.ops.convert_to_numpy(model.balancer.reference))
    np.testing.assert_allclose(reference, [history[f"{t}_loss"][0] for t in "abc"], rtol=1e-4)
