import numpy as np
import pytest
from balancer_helpers import built, combine

from keras_dbmtl.balancers import GLS


def test_geometric_mean_and_weights():
    losses = np.array([2.0, 0.5, 3.0])
    loss, weights = combine(built(GLS(), 3), losses)
    expected = np.prod(losses) ** (1.0 / 3.0)
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    np.testing.assert_allclose(weights, expected / (3.0 * losses), rtol=1e-6)   # dL/dl_t


def test_fixed_example_and_task_order_invariance():
    loss, weights = combine(built(GLS(), 2), [2.0, 0.5])
    np.testing.assert_allclose(loss, 1.0, rtol=1e-6)
    np.testing.assert_allclose(weights, [0.25, 1.0], rtol=1e-6)
    loss_swapped, weights_swapped = combine(built(GLS(), 2), [0.5, 2.0])
    np.testing.assert_allclose(loss_swapped, loss, rtol=1e-6)
    np.testing.assert_allclose(weights_swapped, weights[::-1], rtol=1e-6)


def test_single_task_is_the_loss():
    loss, weights = combine(built(GLS(), 1), [0.7])
    np.testing.assert_allclose([loss, weights[0]], [0.7, 1.0], rtol=1e-6)


def test_log_transform_rejected():
    with pytest.raises(ValueError, match="logarithm twice"):
        GLS(loss_transform="log")
