import numpy as np
from balancer_helpers import JACOBIAN, LOSSES, aggregate, built, numpy, random_jacobian, tensor

from keras_dbmtl.balancers import PCGrad
from keras_dbmtl.balancers.pcgrad import pcgrad_coefficients


def _pcgrad_numpy(gradients, order):
    """Algorithm 1 on the vectors themselves, float64."""
    projected = []
    for i, g in enumerate(gradients):
        g = g.copy()
        for j in order[i]:
            if j == i:
                continue
            inner = g @ gradients[j]
            if inner < 0:
                g = g - inner / (gradients[j] @ gradients[j]) * gradients[j]
        projected.append(g)
    return np.array(projected)


def test_fixed_example():
    direction, weights, heads = aggregate(built(PCGrad(seed=0), 2), JACOBIAN, LOSSES)
    g1, g2 = JACOBIAN
    expected = (g1 - (g1 @ g2) / (g2 @ g2) * g2) + (g2 - (g1 @ g2) / (g1 @ g1) * g1)
    np.testing.assert_allclose(direction, expected, rtol=1e-5)
    assert heads is None


def test_two_tasks_leave_no_conflict():
    rng = np.random.default_rng(0)
    for _ in range(20):
        jacobian = random_jacobian(rng, 2, 5)
        coefficients = numpy(pcgrad_coefficients(tensor(jacobian @ jacobian.T), _order([[0, 1], [1, 0]])))
        projected = coefficients @ jacobian
        assert projected[0] @ jacobian[1] >= -1e-5 and projected[1] @ jacobian[0] >= -1e-5
        assert projected[0] @ projected[1] >= -1e-5                              # no pair in conflict


def _order(rows):
    from keras import ops

    return ops.convert_to_tensor(np.array(rows, dtype="int32"))


def test_three_tasks_match_algorithm_1():
    rng = np.random.default_rng(1)
    jacobian = random_jacobian(rng, 3, 6)
    jacobian[2] = -0.5 * jacobian[1] + 0.2 * rng.normal(size=6)
    order = [[2, 1, 0], [0, 2, 1], [1, 0, 2]]
    coefficients = numpy(pcgrad_coefficients(tensor(jacobian @ jacobian.T), _order(order)))
    np.testing.assert_allclose(coefficients @ jacobian, _pcgrad_numpy(jacobian, order), rtol=1e-4, atol=1e-5)


def test_random_order_is_one_of_the_orders_and_single_task():
    import itertools

    rng = np.random.default_rng(2)
    jacobian = random_jacobian(rng, 3, 4)
    jacobian[2] = -0.6 * jacobian[1] + 0.3 * rng.normal(size=4)
    balancer = built(PCGrad(seed=5), 3, 4)
    per_task = [[[j for j in p if j != i] for p in itertools.permutations(range(3))] for i in range(3)]
    candidates = []
    for orders in itertools.product(*[[o for k, o in enumerate(opts) if o not in opts[:k]] for opts in per_task]):
        rows = [o + [i] for i, o in enumerate(orders)]
        candidates.append(_pcgrad_numpy(jacobian, rows).sum(0))
    for _ in range(5):
        direction, _, _ = aggregate(balancer, jacobian, np.ones(3))
        assert min(np.abs(direction - c).max() for c in candidates) < 1e-4
    direction, weights, _ = aggregate(built(PCGrad(), 1), JACOBIAN[:1], LOSSES[:1])
    np.testing.assert_allclose(direction, JACOBIAN[0], rtol=1e-6)


def test_no_conflict_is_the_sum():
    jacobian = np.array([[1.0, 2.0, 0.0], [0.5, 0.0, 1.0]])
    direction, _, _ = aggregate(built(PCGrad(), 2), jacobian, LOSSES)
    np.testing.assert_allclose(direction, jacobian.sum(0), rtol=1e-6)
