import numpy as np
import pytest
from balancer_helpers import built, combine

from keras_dbmtl.balancers import RLW


@pytest.mark.parametrize("distribution", ["normal", "uniform"])
def test_random_softmax_weights(distribution):
    balancer = built(RLW(distribution=distribution, seed=3), 3)
    losses = np.array([2.0, 0.5, 1.5])
    draws = []
    for _ in range(200):
        loss, weights = combine(balancer, losses)
        assert np.all(weights > 0.0)
        np.testing.assert_allclose(weights.sum(), 1.0, rtol=1e-5)
        np.testing.assert_allclose(loss, weights @ losses, rtol=1e-5)
        draws.append(weights)
    draws = np.array(draws)
    assert np.std(draws[:, 0]) > 1e-3                                      # redrawn every step
    np.testing.assert_allclose(draws.mean(axis=0), np.full(3, 1.0 / 3.0), atol=0.04)   # exchangeable tasks


def test_softmax_of_standard_normal_spread():
    # softmax(z) of z ~ N(0, I) for T = 2 is sigmoid(z1 - z2), z1 - z2 ~ N(0, 2): E[w1^2] from quadrature.
    balancer = built(RLW(seed=0), 2)
    samples = np.array([combine(balancer, [1.0, 1.0])[1][0] for _ in range(400)])
    grid = np.linspace(-12, 12, 20001)
    density = np.exp(-grid**2 / 4.0) / np.sqrt(4.0 * np.pi)
    second_moment = np.trapezoid((1.0 / (1.0 + np.exp(-grid))) ** 2 * density, grid)
    np.testing.assert_allclose(np.mean(samples**2), second_moment, atol=0.03)


def test_same_seed_same_stream():
    a, b = built(RLW(seed=7), 3), built(RLW(seed=7), 3)
    for _ in range(3):
        np.testing.assert_array_equal(combine(a, [1.0, 2.0, 3.0])[1], combine(b, [1.0, 2.0, 3.0])[1])
