import numpy as np
from balancer_helpers import JACOBIAN, LOSSES, aggregate, built, random_jacobian
from scipy.optimize import minimize

from keras_dbmtl.balancers import CAGrad


def _cagrad_numpy(jacobian, c):
    """The dual solved by scipy's SLSQP (as the official code), then d = g0 + c||g0|| g_w / ||g_w||."""
    num = len(jacobian)
    gram = jacobian @ jacobian.T
    g0 = jacobian.mean(0)
    phi = c * np.linalg.norm(g0)
    objective = lambda w: w @ gram @ np.full(num, 1 / num) + phi * np.sqrt(w @ gram @ w + 1e-12)   # noqa: E731
    result = minimize(objective, np.full(num, 1 / num), bounds=[(0, 1)] * num, method="SLSQP",
                      constraints={"type": "eq", "fun": lambda w: w.sum() - 1}, options={"ftol": 1e-14})
    gw = result.x @ jacobian
    return g0 + phi * gw / np.linalg.norm(gw)


def test_against_scipy_dual():
    rng = np.random.default_rng(0)
    for jacobian, c in ((JACOBIAN, 0.5), (random_jacobian(rng, 4, 8), 0.9)):
        num = len(jacobian)
        direction, _, heads = aggregate(built(CAGrad(c=c, rescale=0), num, jacobian.shape[1]), jacobian, np.ones(num))
        expected = _cagrad_numpy(jacobian, c)
        np.testing.assert_allclose(direction, expected, atol=2e-4 * np.linalg.norm(expected))
        assert heads is None


def test_primal_property_by_sampling():
    # d maximises min_t g_t . d over the ball ||d - g0|| <= c ||g0||: no sampled point of the ball does better.
    rng = np.random.default_rng(1)
    c = 0.5
    direction, _, _ = aggregate(built(CAGrad(c=c, rescale=0), 2), JACOBIAN, LOSSES)
    g0 = JACOBIAN.mean(0)
    assert np.linalg.norm(direction - g0) <= c * np.linalg.norm(g0) * (1 + 1e-5)
    samples = rng.normal(size=(20000, 3))
    samples = g0 + c * np.linalg.norm(g0) * samples / np.linalg.norm(samples, axis=1, keepdims=True) \
        * rng.uniform(size=(20000, 1)) ** (1 / 3)
    assert np.min(JACOBIAN @ direction) >= np.max(np.min(samples @ JACOBIAN.T, axis=1)) - 1e-4


def test_rescale_and_c_zero_is_the_mean():
    d0, _, _ = aggregate(built(CAGrad(rescale=0), 2), JACOBIAN, LOSSES)
    d1, _, _ = aggregate(built(CAGrad(), 2), JACOBIAN, LOSSES)
    d2, _, _ = aggregate(built(CAGrad(rescale=2), 2), JACOBIAN, LOSSES)
    np.testing.assert_allclose(d1, d0 / 1.25, rtol=1e-5)
    np.testing.assert_allclose(d2, d0 / 1.5, rtol=1e-5)
    direction, weights, _ = aggregate(built(CAGrad(c=0.0), 2), JACOBIAN, LOSSES)
    np.testing.assert_allclose(weights, [0.5, 0.5])
    np.testing.assert_allclose(direction, JACOBIAN.mean(0), rtol=1e-6)
    direction, _, _ = aggregate(built(CAGrad(rescale=0), 1), JACOBIAN[:1], LOSSES[:1])
    np.testing.assert_allclose(direction, 1.5 * JACOBIAN[0], rtol=1e-4)       # g + c ||g|| g / ||g||
