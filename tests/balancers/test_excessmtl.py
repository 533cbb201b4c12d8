import numpy as np
from balancer_helpers import JACOBIAN, LOSSES, aggregate, built

from keras_dbmtl.balancers import ExcessMTL


def test_three_steps_against_numpy():
    rng = np.random.default_rng(0)
    balancer = built(ExcessMTL(robust_step_size=0.5), 2)
    squares, weights, initial = np.zeros((2, 3)), np.ones(2), None
    for step in range(3):
        jacobian = JACOBIAN * [[1.0], [0.3 + step]] + 0.1 * rng.normal(size=(2, 3))
        squares += jacobian**2
        risks = np.sum(jacobian**2 / np.sqrt(squares + 1e-7), axis=1)
        if initial is None:
            initial = risks
        else:
            weights = weights * np.exp(0.5 * risks / initial)
            weights = 2 * weights / weights.sum()
        direction, got, heads = aggregate(balancer, jacobian, LOSSES)
        np.testing.assert_allclose(got, weights, rtol=1e-5)
        np.testing.assert_allclose(heads, weights, rtol=1e-5)
        np.testing.assert_allclose(direction, weights @ jacobian, rtol=1e-5)
    assert weights[1] > weights[0]                                            # the growing task gains weight


def test_single_task():
    balancer = built(ExcessMTL(), 1)
    for _ in range(2):
        direction, weights, _ = aggregate(balancer, JACOBIAN[:1], LOSSES[:1])
        np.testing.assert_allclose(direction, JACOBIAN[0], rtol=1e-5)
