import keras
import numpy as np
import pytest
from balancer_helpers import built, combine, tiny_model

from keras_dbmtl.balancers import STCH


def _authors_phase(epoch, warmup_epochs):
    """The authors' STCH (LibMTL extension, 0-based epochs): `epoch < W` log-EW, `epoch == W` log-EW while
    averaging the losses into the nadir point, else STCH."""
    if epoch < warmup_epochs:
        return "warmup"
    return "collect" if epoch == warmup_epochs else "stch"


def test_warmup_then_smooth_tchebycheff():
    # warmup_epochs=2: epochs 0, 1 log-EW, epoch 2 log-EW collecting z, STCH from epoch 3 (issue 16: the switch
    # came one epoch early, with z from epoch 1).
    balancer = built(STCH(mu=0.5, warmup_epochs=2), 2)
    epoch_losses = {0: [[2.0, 0.5]], 1: [[5.0, 5.0]], 2: [[2.0, 1.0], [4.0, 3.0]]}
    for epoch in range(3):
        assert _authors_phase(epoch, 2) != "stch"
        for losses in epoch_losses[epoch]:
            loss, weights = combine(balancer, losses)
            np.testing.assert_allclose(loss, np.sum(np.log(losses)), rtol=1e-5)       # sum_t log l_t
            np.testing.assert_allclose(weights, 1.0 / np.asarray(losses), rtol=1e-5)
        balancer.on_epoch_end(epoch)
    assert _authors_phase(3, 2) == "stch"
    reference = np.array([3.0, 2.0])                                               # mean over epoch 2 only
    np.testing.assert_allclose(keras.ops.convert_to_numpy(balancer.reference), reference, rtol=1e-6)
    losses = np.array([1.5, 0.4])
    loss, weights = combine(balancer, losses)
    f = np.log(losses / reference)
    np.testing.assert_allclose(loss, 2 * 0.5 * np.log(np.sum(np.exp(f / 0.5))), rtol=1e-5)
    softmax = np.exp(f / 0.5) / np.sum(np.exp(f / 0.5))
    np.testing.assert_allclose(weights, 2 * softmax / losses, rtol=1e-5)      # dL/dl_t


def test_zero_warmup_epochs_collects_in_the_first_epoch():
    balancer = built(STCH(warmup_epochs=0), 2)
    loss, _ = combine(balancer, [2.0, 0.5])                                     # epoch 0: log-EW, collecting
    np.testing.assert_allclose(loss, np.log(2.0) + np.log(0.5), rtol=1e-5)
    balancer.on_epoch_end(0)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(balancer.reference), [2.0, 0.5], rtol=1e-6)
    loss, _ = combine(balancer, [2.0, 0.5])                                     # epoch 1: STCH, f = 0
    np.testing.assert_allclose(loss, 2 * np.log(2.0), rtol=1e-5)


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
    # z is the mean training loss of epoch 1 (0-based; the authors' `epoch == warmup_epoch`), not epoch 0's.
    np.testing.assert_allclose(reference, [history[f"{t}_loss"][1] for t in "abc"], rtol=1e-4)
