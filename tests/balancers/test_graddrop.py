import numpy as np
from balancer_helpers import JACOBIAN, LOSSES, aggregate, built, random_jacobian

from keras_dbmtl.balancers import GradDrop


def test_each_entry_keeps_one_sign():
    rng = np.random.default_rng(0)
    jacobian = random_jacobian(rng, 3, 50)
    balancer = built(GradDrop(seed=1), 3, 50)
    positive, negative = np.maximum(jacobian, 0).sum(0), np.minimum(jacobian, 0).sum(0)
    kept_positive = []
    for _ in range(40):
        direction, weights, _ = aggregate(balancer, jacobian, np.ones(3))
        is_positive = np.isclose(direction, positive, atol=1e-5)
        assert np.all(is_positive | np.isclose(direction, negative, atol=1e-5))
        assert np.all((weights >= 0) & (weights <= 1))
        kept_positive.append(is_positive)
    # P(keep the positive side) = sign purity P = (1 + sum g / sum |g|) / 2.
    purity = 0.5 * (1 + jacobian.sum(0) / np.abs(jacobian).sum(0))
    np.testing.assert_allclose(np.mean(kept_positive), np.mean(purity), atol=0.05)


def test_consistent_signs_and_single_task_are_kept_whole():
    jacobian = np.array([[1.0, -2.0, 3.0], [0.5, -1.0, 0.1]])
    direction, _, _ = aggregate(built(GradDrop(seed=0), 2), jacobian, LOSSES)
    np.testing.assert_allclose(direction, jacobian.sum(0), rtol=1e-6)
    direction, _, _ = aggregate(built(GradDrop(), 1), JACOBIAN[:1], LOSSES[:1])
    np.testing.assert_allclose(direction, JACOBIAN[0], rtol=1e-6)


def test_full_leak_is_the_sum():
    direction, _, _ = aggregate(built(GradDrop(leak=1.0), 2), JACOBIAN, LOSSES)
    np.testing.assert_allclose(direction, JACOBIAN.sum(0), rtol=1e-6)
