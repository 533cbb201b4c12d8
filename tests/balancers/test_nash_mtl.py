import numpy as np
from balancer_helpers import JACOBIAN, LOSSES, aggregate, built, numpy, random_jacobian
from scipy.optimize import fsolve

from keras_dbmtl.balancers import NashMTL


def _nash_numpy(jacobian):
    gram = jacobian @ jacobian.T
    gram = gram / np.linalg.norm(gram)
    alpha = fsolve(lambda a: gram @ a - 1 / a, np.ones(len(gram)), xtol=1e-14)
    assert np.allclose(gram @ alpha, 1 / alpha, rtol=1e-8)
    return alpha


def test_bargaining_solution_and_clipping():
    rng = np.random.default_rng(0)
    for jacobian in (JACOBIAN, random_jacobian(rng, 4, 10)):
        num = len(jacobian)
        alpha = _nash_numpy(jacobian)
        direction, weights, heads = aggregate(built(NashMTL(max_norm=0.0), num, 10), jacobian, np.ones(num))
        np.testing.assert_allclose(weights, alpha, rtol=1e-4)
        np.testing.assert_allclose(heads, alpha, rtol=1e-4)                   # heads get alpha_t grad l_t
        direction, weights, heads = aggregate(built(NashMTL(), num, 10), jacobian, np.ones(num))
        norm = np.linalg.norm(alpha @ jacobian)
        np.testing.assert_allclose(np.linalg.norm(direction), min(norm, 1.0), rtol=1e-4)
        np.testing.assert_allclose(heads, alpha, rtol=1e-4)


def test_warm_start_state_and_update_period():
    balancer = built(NashMTL(max_norm=0.0, update_weights_every=2), 2)
    _, first, _ = aggregate(balancer, JACOBIAN, LOSSES)
    np.testing.assert_allclose(numpy(balancer.alpha), first)
    _, second, _ = aggregate(balancer, 2.0 * JACOBIAN, LOSSES)               # not recomputed on step 2
    np.testing.assert_allclose(second, first)
    _, third, _ = aggregate(balancer, 2.0 * JACOBIAN, LOSSES)
    np.testing.assert_allclose(third, _nash_numpy(2.0 * JACOBIAN), rtol=1e-4)


def test_single_task():
    direction, weights, _ = aggregate(built(NashMTL(max_norm=0.0), 1), JACOBIAN[:1], LOSSES[:1])
    # G = [[||g||^2]] normalised to [[1]]: alpha = 1, d = g.
    np.testing.assert_allclose(direction, JACOBIAN[0], rtol=1e-5)
