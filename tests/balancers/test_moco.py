import numpy as np
from balancer_helpers import JACOBIAN, LOSSES, aggregate, built, numpy

from keras_dbmtl.balancers import MoCo


def _project(v):
    u = np.sort(v)[::-1]
    css = np.cumsum(u) - 1
    rho = np.nonzero(u - css / np.arange(1, len(v) + 1) > 0)[0][-1]
    return np.maximum(v - css[rho] / (rho + 1), 0)


def test_three_steps_against_numpy():
    balancer = built(MoCo(rho=0.1), 2)
    y, lam = np.zeros((2, 3)), np.full(2, 0.5)
    rng = np.random.default_rng(0)
    for k in range(1, 4):
        jacobian = JACOBIAN + 0.3 * rng.normal(size=JACOBIAN.shape)
        losses = LOSSES * (1.0 - 0.1 * k)
        direction, weights, heads = aggregate(balancer, jacobian, losses)
        h = jacobian / np.linalg.norm(jacobian, axis=1, keepdims=True) * losses[:, None]
        y = y - 0.5 / k**0.5 * (y - h)
        lam = _project(lam - 0.1 / k**0.5 * (y @ y.T + 0.1 * np.eye(2)) @ lam)
        np.testing.assert_allclose(weights, lam, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(direction, lam @ y, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(numpy(balancer.tracked), y, rtol=1e-5, atol=1e-6)
        assert heads is None


def test_single_task_follows_the_normalised_gradient():
    balancer = built(MoCo(), 1)
    direction, weights, _ = aggregate(balancer, JACOBIAN[:1], LOSSES[:1])
    np.testing.assert_allclose(weights, [1.0])
    np.testing.assert_allclose(direction, 0.5 * JACOBIAN[0] / np.linalg.norm(JACOBIAN[0]) * 2.0, rtol=1e-5)
