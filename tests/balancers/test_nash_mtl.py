import numpy as np
from balancer_helpers import JACOBIAN, LOSSES, aggregate, built, numpy, random_jacobian
from scipy.optimize import fsolve

from keras_dbmtl.balancers import NashMTL


def _nash_numpy(jacobian):
    gram = jacobian @ jacobian.T                                              # the real Gramian (Section 3.1)
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
    # ||g||^2 alpha = 1 / alpha: alpha = 1 / ||g||, d = g / ||g||.
    np.testing.assert_allclose(direction, JACOBIAN[0] / np.linalg.norm(JACOBIAN[0]), rtol=1e-5)


def test_weights_solve_the_real_gramian_and_are_scale_equivariant():
    # Issue 16: alpha was sqrt(||G||_F) times the paper's (7x on this example) and d too short (0.51 for 0.05 J).
    for scale in (0.05, 1.0, 1e4):
        jacobian = scale * JACOBIAN
        _, weights, heads = aggregate(built(NashMTL(max_norm=0.0), 2), jacobian, LOSSES)
        gram = jacobian @ jacobian.T
        np.testing.assert_allclose(gram @ weights, 1.0 / weights, rtol=1e-4)   # G alpha = 1 / alpha
        np.testing.assert_allclose(weights * scale, _nash_numpy(JACOBIAN), rtol=1e-4)
        np.testing.assert_allclose(heads, weights, rtol=1e-6)
    direction, _, _ = aggregate(built(NashMTL(), 2), 0.05 * JACOBIAN, LOSSES)
    # alpha^T G alpha = T = 2 for the exact solution: ||d|| = sqrt(2) > 1, clipped to exactly 1.
    np.testing.assert_allclose(np.linalg.norm(direction), 1.0, rtol=1e-5)


def test_first_step_reaches_a_task_a_million_times_smaller():
    rng = np.random.default_rng(1)
    jacobian = rng.normal(size=(3, 6)) * np.array([[1.0], [1e-6], [1e-3]])
    _, weights, _ = aggregate(built(NashMTL(max_norm=0.0), 3, 6), jacobian, np.ones(3))
    alpha = _nash_numpy(jacobian / np.linalg.norm(jacobian, axis=1, keepdims=True)) / np.linalg.norm(jacobian, axis=1)
    np.testing.assert_allclose(weights, alpha, rtol=1e-4)                     # was 13x short on the small task


def test_clipping_norm_of_anti_collinear_gradients():
    g = np.array([0.6, -0.8, 0.0, 0.0])
    jacobian = np.stack([g, -3.0 * g])                                       # no positive solution: alpha grows
    direction, weights, _ = aggregate(built(NashMTL(max_norm=1.0), 2, 4), jacobian, np.ones(2))
    norm = np.linalg.norm(weights @ jacobian)                                # float64, from the vectors
    assert np.all(np.isfinite(weights)) and norm <= 1.0 + 1e-5, norm


def test_a_task_with_a_zero_gradient_does_not_stop_the_others():
    """A dead task (exactly zero gradient) has no positive solution of its row of G alpha = 1/alpha: it is left out,
    the live tasks get the bargaining solution of their own Gramian (fsolve) and the dead one their mean alpha;
    two steps, so the warm start from the stored alpha also holds (before: infinite alpha, every step skipped)."""
    rng = np.random.default_rng(4)
    live = random_jacobian(rng, 3, 9) * np.array([[1e2], [1.0], [1e-2]])
    jacobian = np.insert(live, 3, 0.0, axis=0)                                 # task 3 dead
    alpha = _nash_numpy(live)
    balancer = built(NashMTL(max_norm=0.0), 4, 9)
    for _ in range(2):
        direction, weights, heads = aggregate(balancer, jacobian, np.ones(4))
        np.testing.assert_allclose(weights[:3], alpha, rtol=1e-3)
        np.testing.assert_allclose(weights[3], np.mean(alpha), rtol=1e-3)
        np.testing.assert_allclose(heads, weights)
        np.testing.assert_allclose(direction, alpha @ live, rtol=1e-3, atol=1e-6 * np.abs(alpha @ live).max())
