import numpy as np
from balancer_helpers import JACOBIAN, LOSSES, aggregate, built, numpy

from keras_dbmtl.balancers import GradVac


def _cos(a, b):
    return a @ b / np.linalg.norm(a) / np.linalg.norm(b)


def test_first_step_with_zero_targets_is_pcgrad():
    balancer = built(GradVac(beta=0.5), 2)
    direction, _, _ = aggregate(balancer, JACOBIAN, LOSSES)
    g1, g2 = JACOBIAN
    expected = (g1 - (g1 @ g2) / (g2 @ g2) * g2) + (g2 - (g1 @ g2) / (g1 @ g1) * g1)
    np.testing.assert_allclose(direction, expected, rtol=1e-5)
    phi = _cos(g1, g2)
    np.testing.assert_allclose(numpy(balancer.targets), [[0, 0.5 * phi], [0.5 * phi, 0]], rtol=1e-5)


def test_raises_similarity_to_the_target():
    balancer = built(GradVac(beta=0.01), 2)
    balancer.targets.assign(np.array([[0.0, 0.3], [0.3, 0.0]], "float32"))
    g1, g2 = JACOBIAN
    direction, weights, _ = aggregate(balancer, JACOBIAN, LOSSES)
    # Closed form of the update for g_1 (then g_2), computed on the vectors.
    def vaccinate(gi, gj, target):
        phi = _cos(gi, gj)
        step = np.linalg.norm(gi) * (target * np.sqrt(1 - phi**2) - phi * np.sqrt(1 - target**2))
        return gi + gj * step / (np.linalg.norm(gj) * np.sqrt(1 - target**2))
    new1, new2 = vaccinate(g1, g2, 0.3), vaccinate(g2, g1, 0.3)
    np.testing.assert_allclose(_cos(new1, g2), 0.3, atol=1e-6)               # the property GradVac claims
    np.testing.assert_allclose(direction, new1 + new2, rtol=1e-4)
    np.testing.assert_allclose(numpy(balancer.targets)[0, 1], 0.99 * 0.3 + 0.01 * _cos(g1, g2), rtol=1e-5)


def test_above_target_is_untouched_and_single_task():
    jacobian = np.array([[1.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
    direction, _, _ = aggregate(built(GradVac(), 2), jacobian, LOSSES)
    np.testing.assert_allclose(direction, jacobian.sum(0), rtol=1e-6)
    direction, _, _ = aggregate(built(GradVac(), 1), JACOBIAN[:1], LOSSES[:1])
    np.testing.assert_allclose(direction, JACOBIAN[0], rtol=1e-6)
