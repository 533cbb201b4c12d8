import numpy as np
from balancer_helpers import JACOBIAN, LOSSES, aggregate, built, random_jacobian
from scipy.optimize import minimize

from keras_dbmtl.balancers import UPGrad


def _upgrad_numpy(jacobian, reg=1e-4):
    gram = jacobian @ jacobian.T
    gram = gram / np.trace(gram) + reg * np.eye(len(gram))
    num = len(gram)
    total = np.zeros(num)
    for t in range(num):
        lower = np.eye(num)[t] / num
        result = minimize(lambda v: v @ gram @ v, lower + 0.1, jac=lambda v: 2 * gram @ v, method="SLSQP",
                          bounds=[(lo, None) for lo in lower], options={"ftol": 1e-15, "maxiter": 500})
        total += result.x
    return total


def test_against_qp_and_no_conflict():
    rng = np.random.default_rng(0)
    cases = [JACOBIAN, random_jacobian(rng, 5, 12), random_jacobian(rng, 4, 3)]
    for jacobian in cases:
        num, size = jacobian.shape
        direction, weights, _ = aggregate(built(UPGrad(), num, size), jacobian, np.ones(num))
        np.testing.assert_allclose(weights, _upgrad_numpy(jacobian), rtol=2e-3, atol=2e-4)
        # J d >= 0 up to the ridge: the QP guarantees (G + reg_eps tr(G) I) w >= 0, i.e. J d >= -reg_eps tr(G) w.
        trace = np.sum(jacobian**2)
        assert np.all(jacobian @ direction >= -1e-4 * trace * weights - 1e-6 * trace), jacobian @ direction
        if np.linalg.matrix_rank(jacobian) == num:
            exact, _, _ = aggregate(built(UPGrad(reg_eps=0.0), num, size), jacobian, np.ones(num))
            assert np.all(jacobian @ exact >= -1e-6 * trace), jacobian @ exact              # no conflict at all


def test_no_conflict_is_the_mean_and_single_task():
    jacobian = np.array([[1.0, 2.0, 0.0], [0.5, 0.0, 1.0]])
    direction, _, _ = aggregate(built(UPGrad(reg_eps=0.0), 2), jacobian, LOSSES)
    np.testing.assert_allclose(direction, jacobian.mean(0), rtol=1e-5)
    direction, _, _ = aggregate(built(UPGrad(), 1), JACOBIAN[:1], LOSSES[:1])
    np.testing.assert_allclose(direction, JACOBIAN[0], rtol=1e-5)
