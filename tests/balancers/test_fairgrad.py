import numpy as np
import pytest
from balancer_helpers import JACOBIAN, LOSSES, aggregate, built, random_jacobian
from scipy.optimize import least_squares

from keras_dbmtl.balancers import FairGrad


def _fairgrad_numpy(jacobian, alpha):
    """The official solve: scipy least_squares from 1/T, here with tight tolerances."""
    gram = jacobian @ jacobian.T
    num = len(gram)
    result = least_squares(lambda w: gram @ w - np.power(1 / w, 1 / alpha), np.full(num, 1 / num),
                           bounds=(1e-12, np.inf), xtol=1e-15, ftol=1e-15, gtol=1e-15)
    return result.x


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0, 5.0])
def test_against_least_squares(alpha):
    rng = np.random.default_rng(0)
    for jacobian in (JACOBIAN, random_jacobian(rng, 3, 7)):
        num = len(jacobian)
        direction, weights, heads = aggregate(built(FairGrad(alpha=alpha), num, 7), jacobian, np.ones(num))
        expected = _fairgrad_numpy(jacobian, alpha)
        gram = jacobian @ jacobian.T
        np.testing.assert_allclose(gram @ weights, weights ** (-1 / alpha), rtol=1e-4)   # the fairness equation
        np.testing.assert_allclose(weights, expected, rtol=1e-4)
        np.testing.assert_allclose(heads, weights)


def test_single_task():
    # ||g||^2 w = w^(-1/alpha): w = ||g||^(-2 alpha / (alpha + 1)).
    _, weights, _ = aggregate(built(FairGrad(alpha=2.0), 1), JACOBIAN[:1], LOSSES[:1])
    np.testing.assert_allclose(weights, [18.0 ** (-2.0 / 3.0)], rtol=1e-5)


@pytest.mark.parametrize("alpha", [1.0, 2.0])
def test_a_task_with_a_zero_gradient_does_not_stop_the_others(alpha):
    """A dead task (an exactly zero gradient: a dead ReLU branch) has no solution of its row of G w = w^(-1/alpha);
    it is left out: the live tasks' weights solve their own equation (scipy on the live rows), and the dead task
    gets their mean weight, finite (before: infinite weights, every step skipped)."""
    rng = np.random.default_rng(3)
    live = random_jacobian(rng, 3, 7) * np.array([[0.5], [1.0], [3.0]])    # (the battery covers wide spreads)
    jacobian = np.insert(live, 1, 0.0, axis=0)                              # task 1 dead
    direction, weights, heads = aggregate(built(FairGrad(alpha=alpha), 4, 7), jacobian, np.ones(4))
    expected = _fairgrad_numpy(live, alpha)
    np.testing.assert_allclose(weights[[0, 2, 3]], expected, rtol=1e-3)
    np.testing.assert_allclose(weights[1], np.mean(expected), rtol=1e-3)
    np.testing.assert_allclose(direction, expected @ live, rtol=1e-3, atol=1e-6 * np.abs(expected @ live).max())
    np.testing.assert_allclose(heads, weights)
