import numpy as np
import pytest
from balancer_helpers import JACOBIAN, LOSSES, aggregate, built, random_jacobian
from scipy.optimize import minimize

from keras_dbmtl.balancers import MGDA


def _min_norm_by_grid(vectors):
    """T = 2: the min-norm point of the segment, by a dense grid of convex combinations."""
    gamma = np.linspace(0.0, 1.0, 200001)
    points = gamma[:, None] * vectors[0] + (1 - gamma)[:, None] * vectors[1]
    best = np.argmin(np.sum(points**2, axis=1))
    return np.array([gamma[best], 1 - gamma[best]])


def _min_norm_by_slsqp(vectors):
    num = len(vectors)
    gram = vectors @ vectors.T
    result = minimize(lambda w: w @ gram @ w, np.full(num, 1.0 / num), jac=lambda w: 2 * gram @ w,
                      bounds=[(0, 1)] * num, constraints={"type": "eq", "fun": lambda w: w.sum() - 1},
                      method="SLSQP", options={"ftol": 1e-15, "maxiter": 1000})
    return result.x


def test_min_norm_point_without_normalisation():
    direction, weights, heads = aggregate(built(MGDA(normalization="none"), 2), JACOBIAN, LOSSES)
    expected = _min_norm_by_grid(JACOBIAN)
    np.testing.assert_allclose(weights, expected, atol=1e-5)
    np.testing.assert_allclose(direction, expected @ JACOBIAN, atol=1e-4)
    np.testing.assert_allclose(heads, weights)                                  # heads scaled too


def test_default_loss_plus_normalisation():
    direction, weights, _ = aggregate(built(MGDA(), 2), JACOBIAN, LOSSES)
    normalizer = LOSSES * np.linalg.norm(JACOBIAN, axis=1)
    expected = _min_norm_by_grid(JACOBIAN / normalizer[:, None])
    np.testing.assert_allclose(weights, expected, atol=1e-5)
    np.testing.assert_allclose(direction, expected @ JACOBIAN, atol=1e-4)      # applied to the raw gradients


@pytest.mark.parametrize("normalization", ["l2", "loss"])
def test_other_normalisations(normalization):
    _, weights, _ = aggregate(built(MGDA(normalization=normalization), 2), JACOBIAN, LOSSES)
    normalizer = np.linalg.norm(JACOBIAN, axis=1) if normalization == "l2" else LOSSES
    np.testing.assert_allclose(weights, _min_norm_by_grid(JACOBIAN / normalizer[:, None]), atol=1e-5)


def test_min_norm_with_more_tasks_and_task_order_invariance():
    rng = np.random.default_rng(1)
    jacobian = random_jacobian(rng, 4, 7)
    _, weights, _ = aggregate(built(MGDA(normalization="none"), 4, 7), jacobian, np.ones(4))
    reference = _min_norm_by_slsqp(jacobian)
    np.testing.assert_allclose(weights @ jacobian, reference @ jacobian, atol=1e-4 * np.abs(jacobian).max())
    order = np.array([2, 0, 3, 1])
    _, permuted, _ = aggregate(built(MGDA(normalization="none"), 4, 7), jacobian[order], np.ones(4))
    np.testing.assert_allclose(permuted, weights[order], atol=1e-5)
    # KKT: every task improves at least as much as ||d||^2 along the min-norm direction.
    d = weights @ jacobian
    assert np.all(jacobian @ d >= d @ d - 1e-4)


def test_single_task_is_the_plain_gradient():
    direction, weights, _ = aggregate(built(MGDA(), 1), JACOBIAN[:1], LOSSES[:1])
    np.testing.assert_allclose(weights, [1.0])
    np.testing.assert_allclose(direction, JACOBIAN[0], rtol=1e-6)


def test_log_transform_uses_equivalent_normalisation():
    assert MGDA(loss_transform="log").resolved_normalization == "l2"
    with pytest.raises(ValueError, match="twice"):
        MGDA(normalization="loss+", loss_transform="log")


def test_no_eps_in_the_normaliser_for_tiny_gradients():
    # Issue 16: eps = 1e-8 added to ||g_t|| ~ 1e-5 was a 0.2 % error. T = 2, "l2": the min-norm point of two unit
    # vectors has the closed form w_1 = clip(v_2 . (v_2 - v_1) / ||v_1 - v_2||^2, 0, 1).
    jacobian = np.array([[1e-5, 0.0, 0.0], [-2e-6, 3e-6, 0.0]])
    units = jacobian / np.linalg.norm(jacobian, axis=1, keepdims=True)
    w1 = np.clip(units[1] @ (units[1] - units[0]) / np.sum((units[0] - units[1]) ** 2), 0.0, 1.0)
    _, weights, _ = aggregate(built(MGDA(normalization="l2"), 2), jacobian, LOSSES)
    np.testing.assert_allclose(weights, [w1, 1.0 - w1], rtol=1e-5)
